// fxquant HLS library: integer LayerNorm over the last axis (fixed_point.layernorm_rows, bit for bit).
// Rows of n integers k at <BW_in, FL_in>; gamma raw on FL_g, beta raw int32 on FL_g + FL_h
// (FL_h = 16). Per row, with Y = 50 (fixed_point.LAYERNORM_RECIP_BITS):
//   c_i   = n k_i - sum(k)                      (exact, centered_t)
//   D     = sum(c_i^2) + eps_D                  (exact, < 2^62: a legality rule)
//   t     = (62 - bit_length(D)) / 2            (D 4^t in [2^60, 2^62); 31 for D = 0)
//   sigma = isqrt64((D << 2t) / n)              (32-step restoring square root)
//   r     = sigma > 0 ? (2^(Y+1) + sigma) / (2 sigma) : 0
//   h_i   = round_half_even((c_i << t) r 2^(FL_h - Y))       (|c_i| 2^t < 2^31, product < 2^60)
//   y_i   = requantize(gamma_i h_i + beta_i) from FL_g + FL_h to the output format (+ ReLU)
#ifndef FXQ_LAYERNORM_H_
#define FXQ_LAYERNORM_H_

#include "fxq_common.h"

namespace fxq {

template <class CONFIG>
void layernorm(const typename CONFIG::in_t x[CONFIG::rows * CONFIG::n], typename CONFIG::out_t y[CONFIG::rows * CONFIG::n],
               const typename CONFIG::weight_raw_t gamma[CONFIG::n], const typename CONFIG::bias_raw_t beta[CONFIG::n_bias]) {
#pragma HLS PIPELINE II = CONFIG::reuse_factor
    for (unsigned row = 0; row < CONFIG::rows; row++) {
        const unsigned base = row * CONFIG::n;
        typename CONFIG::sum_t total = 0;
        for (unsigned i = 0; i < CONFIG::n; i++) total += x[base + i];
        typename CONFIG::centered_t c[CONFIG::n];
        ap_uint<64> d = CONFIG::eps;
        for (unsigned i = 0; i < CONFIG::n; i++) {
            c[i] = typename CONFIG::centered_t(x[base + i]) * CONFIG::n - total;
            d += ap_uint<64>(c[i] * c[i]);
        }
        const int t = (62 - bit_length64(d)) / 2;
        const ap_uint<64> sigma = isqrt64((d << (2 * t)) / CONFIG::n);
        const ap_uint<52> r = row_reciprocal<CONFIG::recip_bits, 52>(sigma);
        for (unsigned i = 0; i < CONFIG::n; i++) {
            const ap_int<64> p = (ap_int<64>(c[i]) << t) * ap_int<64>(r);
            const typename CONFIG::h_t h = typename CONFIG::h_t(round_shift<CONFIG::recip_bits - CONFIG::h_frac_bits>(p));
            typename CONFIG::accum_t acc = typename CONFIG::accum_t(h) * typename CONFIG::weight_t(gamma[i]);
            if (CONFIG::has_bias) acc += beta[i];
            y[base + i] = relu_if(requantize<CONFIG::out_bits, CONFIG::shift>(acc), CONFIG::relu);
        }
    }
}

}  // namespace fxq

#endif
