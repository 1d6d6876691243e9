// fxquant HLS library: merging tensors. All elements in parallel (II = 1).
//   add: acc = (a << shift0) + (b << shift1) on grid FL = max(FL_a, FL_b), shift_i = FL - FL_i >= 0,
//        then requantize to the output format (+ ReLU); a and b have the same shape.
//   mul: acc = a * b on grid FL_a + FL_b, exact in ap_int<BW_a + BW_b>, then requantize (+ ReLU).
//        numpy broadcasting: over the output dims d0..d3 (leading 1s pad a lower rank) a is read
//        with strides a0..a3 and b with b0..b3, a stride 0 on a broadcast dim (the SE gate
//        (C,H,W) x (C,1,1): b's H and W strides are 0).
//   cat_part: one input of a concatenation on any dim, requantized to the output format on its own
//        (shift = FL_out - FL_in, + ReLU): for each of the `outer` leading blocks, its `inner`
//        integers go to y[o * out_inner + offset ...]. In CHW order a channel cat has outer = 1.
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
void mul(const typename CONFIG::in0_t a[CONFIG::n0], const typename CONFIG::in1_t b[CONFIG::n1],
         typename CONFIG::out_t y[CONFIG::d0 * CONFIG::d1 * CONFIG::d2 * CONFIG::d3]) {
#pragma HLS PIPELINE II = 1
    unsigned o = 0;
    for (unsigned i0 = 0; i0 < CONFIG::d0; i0++)
        for (unsigned i1 = 0; i1 < CONFIG::d1; i1++)
            for (unsigned i2 = 0; i2 < CONFIG::d2; i2++)
                for (unsigned i3 = 0; i3 < CONFIG::d3; i3++) {
                    const unsigned ia = i0 * CONFIG::a0 + i1 * CONFIG::a1 + i2 * CONFIG::a2 + i3 * CONFIG::a3;
                    const unsigned ib = i0 * CONFIG::b0 + i1 * CONFIG::b1 + i2 * CONFIG::b2 + i3 * CONFIG::b3;
                    typename CONFIG::accum_t acc = typename CONFIG::accum_t(a[ia]) * typename CONFIG::accum_t(b[ib]);
                    y[o++] = relu_if(requantize<CONFIG::out_bits, CONFIG::shift>(acc), CONFIG::relu);
                }
}

template <class CONFIG>
void cat_part(const typename CONFIG::in_t x[CONFIG::outer * CONFIG::inner],
              typename CONFIG::out_t y[CONFIG::outer * CONFIG::out_inner]) {
#pragma HLS INLINE
    for (unsigned o = 0; o < CONFIG::outer; o++) {
        for (unsigned i = 0; i < CONFIG::inner; i++) {
            y[o * CONFIG::out_inner + CONFIG::offset + i] =
                relu_if(requantize<CONFIG::out_bits, CONFIG::shift>(x[o * CONFIG::inner + i]), CONFIG::relu);
        }
    }
}

}  // namespace fxq

#endif
