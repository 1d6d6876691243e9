// fxquant HLS library: moving integers without arithmetic (format kept).
//   gather: y[i0..i5] = x[i0*s0 + i1*s1 + ... + i5*s5] over the output dims d0..d5 (row major,
//           leading dims of 1 pad a lower rank). A transpose is the input strides permuted; nearest
//           upsampling by (sh, sw) is the output (C, H, sh, W, sw) read with strides
//           (H*W, W, 0, 1, 0): every pixel repeated. A slice x[..., start:stop:step, ...] reads from
//           offset start * stride(axis) with that axis' stride times step; a select (x[:, i]) drops
//           the axis and reads from offset i * stride(axis). transpose / upsample: offset 0.
//   copy (fxq_common.h): flatten, reshape and mul_pow2 (only FL changes) keep the flat CHW order.
// All elements in parallel (II = 1).
#ifndef FXQ_LAYOUT_H_
#define FXQ_LAYOUT_H_

#include "fxq_common.h"

namespace fxq {

template <class CONFIG>
void gather(const typename CONFIG::in_t x[CONFIG::n_in],
            typename CONFIG::out_t y[CONFIG::d0 * CONFIG::d1 * CONFIG::d2 * CONFIG::d3 * CONFIG::d4 * CONFIG::d5]) {
#pragma HLS PIPELINE II = 1
    unsigned o = 0;
    for (unsigned i0 = 0; i0 < CONFIG::d0; i0++)
        for (unsigned i1 = 0; i1 < CONFIG::d1; i1++)
            for (unsigned i2 = 0; i2 < CONFIG::d2; i2++)
                for (unsigned i3 = 0; i3 < CONFIG::d3; i3++)
                    for (unsigned i4 = 0; i4 < CONFIG::d4; i4++)
                        for (unsigned i5 = 0; i5 < CONFIG::d5; i5++) {
                            y[o++] = x[CONFIG::offset + i0 * CONFIG::s0 + i1 * CONFIG::s1 + i2 * CONFIG::s2 + i3 * CONFIG::s3 +
                                       i4 * CONFIG::s4 + i5 * CONFIG::s5];
                        }
}

}  // namespace fxq

#endif
