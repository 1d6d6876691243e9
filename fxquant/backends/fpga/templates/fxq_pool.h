// fxquant HLS library: 2-D pooling, layout CHW.
//   max pooling: the largest integer of each window (out-of-range padding never wins), format kept.
//   average pooling over 2^p elements (no padding): acc = window sum on grid FL_in + p, then
//   requantize to the output format (+ ReLU); only power-of-two windows are integer-exact.
// One output pixel (all channels) per pipeline iteration, II = 1.
#ifndef FXQ_POOL_H_
#define FXQ_POOL_H_

#include "fxq_common.h"

namespace fxq {

template <class CONFIG>
void maxpool2d(const typename CONFIG::in_t x[CONFIG::in_c * CONFIG::in_h * CONFIG::in_w],
               typename CONFIG::out_t y[CONFIG::in_c * CONFIG::out_h * CONFIG::out_w]) {
    for (unsigned oh = 0; oh < CONFIG::out_h; oh++) {
        for (unsigned ow = 0; ow < CONFIG::out_w; ow++) {
#pragma HLS PIPELINE II = 1
            for (unsigned c = 0; c < CONFIG::in_c; c++) {
                typename CONFIG::in_t m = typename CONFIG::in_t(qmin(CONFIG::in_bits));
                for (unsigned kh = 0; kh < CONFIG::k_h; kh++) {
                    const int ih = int(oh * CONFIG::stride_h + kh) - int(CONFIG::pad_h);
                    for (unsigned kw = 0; kw < CONFIG::k_w; kw++) {
                        const int iw = int(ow * CONFIG::stride_w + kw) - int(CONFIG::pad_w);
                        if (ih < 0 || ih >= int(CONFIG::in_h) || iw < 0 || iw >= int(CONFIG::in_w)) continue;
                        const typename CONFIG::in_t v = x[(c * CONFIG::in_h + ih) * CONFIG::in_w + iw];
                        if (v > m) m = v;
                    }
                }
                y[(c * CONFIG::out_h + oh) * CONFIG::out_w + ow] = m;
            }
        }
    }
}

template <class CONFIG>
void avgpool2d(const typename CONFIG::in_t x[CONFIG::in_c * CONFIG::in_h * CONFIG::in_w],
               typename CONFIG::out_t y[CONFIG::in_c * CONFIG::out_h * CONFIG::out_w]) {
    for (unsigned oh = 0; oh < CONFIG::out_h; oh++) {
        for (unsigned ow = 0; ow < CONFIG::out_w; ow++) {
#pragma HLS PIPELINE II = 1
            for (unsigned c = 0; c < CONFIG::in_c; c++) {
                typename CONFIG::accum_t acc = 0;
                for (unsigned kh = 0; kh < CONFIG::k_h; kh++) {
                    for (unsigned kw = 0; kw < CONFIG::k_w; kw++) {
                        acc += x[(c * CONFIG::in_h + oh * CONFIG::stride_h + kh) * CONFIG::in_w + ow * CONFIG::stride_w + kw];
                    }
                }
                y[(c * CONFIG::out_h + oh) * CONFIG::out_w + ow] =
                    relu_if(requantize<CONFIG::out_bits, CONFIG::shift>(acc), CONFIG::relu);
            }
        }
    }
}

}  // namespace fxq

#endif
