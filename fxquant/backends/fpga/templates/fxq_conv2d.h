// fxquant HLS library: 2-D convolution (torch Conv2d: stride, zero padding, dilation, groups).
// Layout CHW (batch excluded); weights raw integers [out_c][in_c/groups][k_h][k_w]; bias raw int32
// on FL_acc = FL_in + FL_w.
//   acc[oc][oh][ow] = b[oc] + sum_{ic,kh,kw} x[g*cg+ic][oh*sh-ph+kh*dh][ow*sw-pw+kw*dw] * w[oc][ic][kh][kw]
// (out-of-range x are the zero padding), then requantize to the output format (+ ReLU).
// One output pixel (all output channels) per pipeline iteration of II = reuse_factor.
#ifndef FXQ_CONV2D_H_
#define FXQ_CONV2D_H_

#include "fxq_common.h"

namespace fxq {

template <class CONFIG>
void conv2d(const typename CONFIG::in_t x[CONFIG::in_c * CONFIG::in_h * CONFIG::in_w],
            typename CONFIG::out_t y[CONFIG::out_c * CONFIG::out_h * CONFIG::out_w],
            const typename CONFIG::weight_raw_t w[CONFIG::out_c * CONFIG::in_c / CONFIG::groups * CONFIG::k_h * CONFIG::k_w],
            const typename CONFIG::bias_raw_t b[CONFIG::n_bias]) {
#pragma HLS ARRAY_PARTITION variable = w cyclic factor = CONFIG::n_mult
    const unsigned cg = CONFIG::in_c / CONFIG::groups;
    const unsigned og = CONFIG::out_c / CONFIG::groups;
    for (unsigned oh = 0; oh < CONFIG::out_h; oh++) {
        for (unsigned ow = 0; ow < CONFIG::out_w; ow++) {
#pragma HLS PIPELINE II = CONFIG::reuse_factor
#pragma HLS ALLOCATION operation instances = mul limit = CONFIG::n_mult
            for (unsigned oc = 0; oc < CONFIG::out_c; oc++) {
                const unsigned g = oc / og;
                typename CONFIG::accum_t acc = CONFIG::has_bias ? typename CONFIG::accum_t(b[oc]) : typename CONFIG::accum_t(0);
                for (unsigned ic = 0; ic < cg; ic++) {
                    for (unsigned kh = 0; kh < CONFIG::k_h; kh++) {
                        const int ih = int(oh * CONFIG::stride_h + kh * CONFIG::dil_h) - int(CONFIG::pad_h);
                        for (unsigned kw = 0; kw < CONFIG::k_w; kw++) {
                            const int iw = int(ow * CONFIG::stride_w + kw * CONFIG::dil_w) - int(CONFIG::pad_w);
                            if (ih < 0 || ih >= int(CONFIG::in_h) || iw < 0 || iw >= int(CONFIG::in_w)) continue;
                            const unsigned xi = ((g * cg + ic) * CONFIG::in_h + ih) * CONFIG::in_w + iw;
                            const unsigned wi = ((oc * cg + ic) * CONFIG::k_h + kh) * CONFIG::k_w + kw;
                            acc += x[xi] * typename CONFIG::weight_t(w[wi]);
                        }
                    }
                }
                y[(oc * CONFIG::out_h + oh) * CONFIG::out_w + ow] =
                    relu_if(requantize<CONFIG::out_bits, CONFIG::shift>(acc), CONFIG::relu);
            }
        }
    }
}

}  // namespace fxq

#endif
