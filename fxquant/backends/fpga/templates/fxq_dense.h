// fxquant HLS library: fully connected layer (torch Linear), y = requantize(W x + b).
// Weights are raw integers w[o * n_in + i] (PyTorch [out, in] order) on grid FL_w; the bias is a
// raw int32 on FL_acc = FL_in + FL_w. The accumulator is exact (CONFIG::accum_t is sized by
// fxquant.fixed_point.accumulator_bits), so the sum order does not matter.
#ifndef FXQ_DENSE_H_
#define FXQ_DENSE_H_

#include "fxq_common.h"

namespace fxq {

template <class CONFIG>
void dense(const typename CONFIG::in_t x[CONFIG::rows * CONFIG::n_in], typename CONFIG::out_t y[CONFIG::rows * CONFIG::n_out],
           const typename CONFIG::weight_raw_t w[CONFIG::n_out * CONFIG::n_in],
           const typename CONFIG::bias_raw_t b[CONFIG::n_bias]) {
#pragma HLS PIPELINE II = CONFIG::reuse_factor
#pragma HLS ALLOCATION operation instances = mul limit = CONFIG::n_mult
#pragma HLS ARRAY_PARTITION variable = w cyclic factor = CONFIG::n_mult
    for (unsigned r = 0; r < CONFIG::rows; r++) {
        for (unsigned o = 0; o < CONFIG::n_out; o++) {
            typename CONFIG::accum_t acc = CONFIG::has_bias ? typename CONFIG::accum_t(b[o]) : typename CONFIG::accum_t(0);
            for (unsigned i = 0; i < CONFIG::n_in; i++) {
                acc += x[r * CONFIG::n_in + i] * typename CONFIG::weight_t(w[o * CONFIG::n_in + i]);
            }
            y[r * CONFIG::n_out + o] = relu_if(requantize<CONFIG::out_bits, CONFIG::shift>(acc), CONFIG::relu);
        }
    }
}

}  // namespace fxq

#endif
