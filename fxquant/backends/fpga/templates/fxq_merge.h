// fxquant HLS library: merging two tensors. All elements in parallel (II = 1).
//   add: acc = (a << shift0) + (b << shift1) on grid FL = max(FL_a, FL_b), shift_i = FL - FL_i >= 0,
//        then requantize to the output format (+ ReLU); a and b have the same shape.
//   cat (channel axis, CHW): y = [requantize(a, shift0), requantize(b, shift1)] (+ ReLU), with
//        shift_i = FL_out - FL_i; the channel concatenation of CHW tensors is that of the flat arrays.
#ifndef FXQ_MERGE_H_
#define FXQ_MERGE_H_

#include "fxq_common.h"

namespace fxq {

template <class CONFIG>
void add(const typename CONFIG::in0_t a[CONFIG::n], const typename CONFIG::in1_t b[CONFIG::n],
         typename CONFIG::out_t y[CONFIG::n]) {
#pragma HLS PIPELINE II = 1
    for (unsigned i = 0; i < CONFIG::n; i++) {
        typename CONFIG::accum_t acc = typename CONFIG::accum_t(a[i]) << CONFIG::shift0;
        acc += typename CONFIG::accum_t(b[i]) << CONFIG::shift1;
        y[i] = relu_if(requantize<CONFIG::out_bits, CONFIG::shift>(acc), CONFIG::relu);
    }
}

template <class CONFIG>
void cat(const typename CONFIG::in0_t a[CONFIG::n0], const typename CONFIG::in1_t b[CONFIG::n1],
         typename CONFIG::out_t y[CONFIG::n0 + CONFIG::n1]) {
#pragma HLS PIPELINE II = 1
    for (unsigned i = 0; i < CONFIG::n0; i++) {
        y[i] = relu_if(requantize<CONFIG::out_bits, CONFIG::shift0>(a[i]), CONFIG::relu);
    }
    for (unsigned i = 0; i < CONFIG::n1; i++) {
        y[CONFIG::n0 + i] = relu_if(requantize<CONFIG::out_bits, CONFIG::shift1>(b[i]), CONFIG::relu);
    }
}

}  // namespace fxq

#endif
