// fxquant HLS library: integer softmax over the last axis (fixed_point.softmax_rows, bit for bit).
// The scores are rows of L integers at <BW_in, FL_in>; the leading dims, padded to three with 1s,
// are d0, d1, d2 (d2 is the query axis of a causal softmax). Per row, with E = exp_bits,
// K = E + FL_out + G (fixed_point.softmax_recip_bits) and T the exp table size:
//   keep_j = mask[...] != 0 (mask read with strides m0, m1, m2, mj: 0 on a broadcast dim; no mask:
//            a one-entry mask {1} read with strides 0) and, if causal, j <= the query index i2
//   m      = max(k_j over kept j)                 (qmin_in when none is kept)
//   e_j    = keep_j ? table[min(m - k_j, T - 1)] : 0        (the exp ROM, 0 <= e_j <= 2^E)
//   s      = sum_j e_j                            (exact, sum_t: at most L 2^E)
//   r      = s > 0 ? (2^(K+1) + s) / (2 s) : 0    (one division of wide ap_uint per row)
//   y_j    = saturate(round_half_even(e_j r 2^-(E+G)))       (requantize with shift = FL_out - K)
// Masked entries contribute exactly 0; an all-masked row is all 0.
#ifndef FXQ_SOFTMAX_H_
#define FXQ_SOFTMAX_H_

#include "fxq_common.h"

namespace fxq {

template <class CONFIG>
void softmax(const typename CONFIG::in_t x[CONFIG::d0 * CONFIG::d1 * CONFIG::d2 * CONFIG::len],
             const typename CONFIG::mask_t mask[CONFIG::n_mask],
             typename CONFIG::out_t y[CONFIG::d0 * CONFIG::d1 * CONFIG::d2 * CONFIG::len],
             const typename CONFIG::table_raw_t table[CONFIG::table_size]) {
#pragma HLS PIPELINE II = CONFIG::reuse_factor
    unsigned row = 0;
    for (unsigned i0 = 0; i0 < CONFIG::d0; i0++)
        for (unsigned i1 = 0; i1 < CONFIG::d1; i1++)
            for (unsigned i2 = 0; i2 < CONFIG::d2; i2++, row++) {
                const unsigned base = row * CONFIG::len;
                const unsigned mbase = i0 * CONFIG::m0 + i1 * CONFIG::m1 + i2 * CONFIG::m2;
                bool keep[CONFIG::len];
                long long top = qmin(CONFIG::in_bits);
                for (unsigned j = 0; j < CONFIG::len; j++) {
                    keep[j] = mask[mbase + j * CONFIG::mj] != 0 && (!CONFIG::causal || j <= i2);
                    const long long k = x[base + j].to_int64();
                    if (keep[j] && k > top) top = k;
                }
                typename CONFIG::exp_t e[CONFIG::len];
                typename CONFIG::sum_t s = 0;
                for (unsigned j = 0; j < CONFIG::len; j++) {
                    const long long d = top - x[base + j].to_int64();
                    const unsigned index = unsigned(d < (long long)(CONFIG::table_size - 1) ? d : CONFIG::table_size - 1);
                    e[j] = keep[j] ? typename CONFIG::exp_t(table[index]) : typename CONFIG::exp_t(0);
                    s += e[j];
                }
                const typename CONFIG::recip_t r =
                    row_reciprocal<CONFIG::recip_k, CONFIG::num_bits>(s);
                for (unsigned j = 0; j < CONFIG::len; j++) {
                    const typename CONFIG::accum_t p = typename CONFIG::accum_t(e[j] * r);
                    y[base + j] = requantize<CONFIG::out_bits, CONFIG::shift>(p);
                }
            }
}

}  // namespace fxq

#endif
