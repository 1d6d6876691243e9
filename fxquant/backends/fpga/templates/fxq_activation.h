// fxquant HLS library: element-wise ops. relu: max(x, 0) on the integers (format kept);
// requantize: x re-expressed in the output format (shift, round half even, saturate; + ReLU).
// All elements in parallel (II = 1).
#ifndef FXQ_ACTIVATION_H_
#define FXQ_ACTIVATION_H_

#include "fxq_common.h"

namespace fxq {

template <class CONFIG>
void relu(const typename CONFIG::in_t x[CONFIG::n], typename CONFIG::out_t y[CONFIG::n]) {
#pragma HLS PIPELINE II = 1
    for (unsigned i = 0; i < CONFIG::n; i++) {
        y[i] = x[i] < 0 ? typename CONFIG::out_t(0) : typename CONFIG::out_t(x[i]);
    }
}

template <class CONFIG>
void requantize_layer(const typename CONFIG::in_t x[CONFIG::n], typename CONFIG::out_t y[CONFIG::n]) {
#pragma HLS PIPELINE II = 1
    for (unsigned i = 0; i < CONFIG::n; i++) {
        y[i] = relu_if(requantize<CONFIG::out_bits, CONFIG::shift>(typename CONFIG::accum_t(x[i])), CONFIG::relu);
    }
}

}  // namespace fxq

#endif
