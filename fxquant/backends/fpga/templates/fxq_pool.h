// fxquant HLS library: 2-D pooling, layout CHW (torch's output size: padding, dilation, ceil_mode
// are in out_h / out_w; a ceil-mode edge window overhangs the bottom/right edge).
//   max pooling: the largest integer of each window; padding and overhang cells never win (every
//   window holds an input cell, checked by the plan), dilation (dil_h, dil_w); format kept.
//   average pooling: per window, the sum of its in-bounds cells (padding counts as zeros) times
//   m[d] on grid FL_in + S, then requantize to the output format (+ ReLU). d = d_h * d_w is the
//   window's divisor as torch's count_include_pad counts it: per axis min(start + k, n + pad) -
//   start with start = o * stride - pad (fxquant.integer_graph.avg_divisors), and
//   m[d] = M_d * 2^(S - s_d) with (M_d, s_d) = fxquant.fixed_point.reciprocal(d), S = max s_d: the
//   same real value as the reference's sum * M_d on FL_in + s_d (an exact left shift), so one
//   requantize shift serves every window. A power-of-two d is M_d = 1, s_d = log2(d).
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
                    const int ih = int(oh * CONFIG::stride_h + kh * CONFIG::dil_h) - int(CONFIG::pad_h);
                    for (unsigned kw = 0; kw < CONFIG::k_w; kw++) {
                        const int iw = int(ow * CONFIG::stride_w + kw * CONFIG::dil_w) - int(CONFIG::pad_w);
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

// The divisor of the window starting at `start` on an axis of n cells padded by pad on each side.
constexpr int window_cells(int start, int k, int n, int pad) {
    return (start + k < n + pad ? start + k : n + pad) - start;
}

template <class CONFIG>
void avgpool2d(const typename CONFIG::in_t x[CONFIG::in_c * CONFIG::in_h * CONFIG::in_w],
               typename CONFIG::out_t y[CONFIG::in_c * CONFIG::out_h * CONFIG::out_w],
               const typename CONFIG::mult_raw_t m[CONFIG::k_h * CONFIG::k_w + 1]) {
    for (unsigned oh = 0; oh < CONFIG::out_h; oh++) {
        for (unsigned ow = 0; ow < CONFIG::out_w; ow++) {
#pragma HLS PIPELINE II = 1
            const int h0 = int(oh * CONFIG::stride_h) - int(CONFIG::pad_h);
            const int w0 = int(ow * CONFIG::stride_w) - int(CONFIG::pad_w);
            const int d = window_cells(h0, CONFIG::k_h, CONFIG::in_h, CONFIG::pad_h) *
                          window_cells(w0, CONFIG::k_w, CONFIG::in_w, CONFIG::pad_w);
            const typename CONFIG::mult_t mult = typename CONFIG::mult_t(m[d]);
            for (unsigned c = 0; c < CONFIG::in_c; c++) {
                typename CONFIG::sum_t sum = 0;
                for (unsigned kh = 0; kh < CONFIG::k_h; kh++) {
                    const int ih = h0 + int(kh);
                    for (unsigned kw = 0; kw < CONFIG::k_w; kw++) {
                        const int iw = w0 + int(kw);
                        if (ih < 0 || ih >= int(CONFIG::in_h) || iw < 0 || iw >= int(CONFIG::in_w)) continue;
                        sum += x[(c * CONFIG::in_h + ih) * CONFIG::in_w + iw];
                    }
                }
                const typename CONFIG::accum_t acc = typename CONFIG::accum_t(sum * mult);
                y[(c * CONFIG::out_h + oh) * CONFIG::out_w + ow] =
                    relu_if(requantize<CONFIG::out_bits, CONFIG::shift>(acc), CONFIG::relu);
            }
        }
    }
}

}  // namespace fxq

#endif
