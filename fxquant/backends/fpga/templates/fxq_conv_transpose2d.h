// fxquant HLS library: 2-D transposed convolution (torch ConvTranspose2d: stride, padding,
// output_padding, dilation, groups), layout CHW. Weights raw integers [in_c][out_c/groups][k_h][k_w]
// (torch's order), bias raw int32 on FL_acc = FL_in + FL_w. In gather form, every output pixel sums
// the taps that scatter onto it:
//   acc[oc][oh][ow] = b[oc] + sum_{ic in oc's group, kh, kw : oh + pad_h - kh*dil_h = ih*stride_h,
//                                   ow + pad_w - kw*dil_w = iw*stride_w, (ih, iw) inside the input}
//                     x[ic][ih][iw] * w[ic][oc % og][kh][kw]
// then requantize to the output format (+ ReLU). The accumulator is exact (sized for every tap of a
// group), so the order of the sum does not matter.
// One output pixel (all output channels) per pipeline iteration of II = reuse_factor.
#ifndef FXQ_CONV_TRANSPOSE2D_H_
#define FXQ_CONV_TRANSPOSE2D_H_

#include "fxq_common.h"

namespace fxq {

template <class CONFIG>
void conv_transpose2d(const typename CONFIG::in_t x[CONFIG::in_c * CONFIG::in_h * CONFIG::in_w],
                      typename CONFIG::out_t y[CONFIG::out_c * CONFIG::out_h * CONFIG::out_w],
                      const typename CONFIG::weight_raw_t w[CONFIG::in_c * CONFIG::out_c / CONFIG::groups * CONFIG::k_h * CONFIG::k_w],
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
                for (unsigned kh = 0; kh < CONFIG::k_h; kh++) {
                    const int th = int(oh + CONFIG::pad_h) - int(kh * CONFIG::dil_h);
                    if (th < 0 || th % int(CONFIG::stride_h) != 0 || th / int(CONFIG::stride_h) >= int(CONFIG::in_h)) continue;
                    const unsigned ih = unsigned(th) / CONFIG::stride_h;
                    for (unsigned kw = 0; kw < CONFIG::k_w; kw++) {
                        const int tw = int(ow + CONFIG::pad_w) - int(kw * CONFIG::dil_w);
                        if (tw < 0 || tw % int(CONFIG::stride_w) != 0 || tw / int(CONFIG::stride_w) >= int(CONFIG::in_w)) continue;
                        const unsigned iw = unsigned(tw) / CONFIG::stride_w;
                        for (unsigned ic = 0; ic < cg; ic++) {
                            const unsigned ci = g * cg + ic;
                            const unsigned xi = (ci * CONFIG::in_h + ih) * CONFIG::in_w + iw;
                            const unsigned wi = ((ci * og + (oc - g * og)) * CONFIG::k_h + kh) * CONFIG::k_w + kw;
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
