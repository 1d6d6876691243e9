// fxquant HLS library: matmul of two activations (Q K^T, attention x V), y = requantize(a @ b).
// a is (B0, B1, M, K) and b (B0, B1, K, N) in row-major order after padding the leading (batch and
// head) dims to two with 1s; numpy broadcasting of those dims: a's block of M*K integers for
// (i0, i1) starts at i0 * a0 + i1 * a1 (a stride 0 on a broadcast dim), b's likewise with b0, b1.
// acc = sum_k a[m, k] * b[k, n] on grid FL_a + FL_b, exact in CONFIG::accum_t (sized from the
// reference's bound 2^(BW_a-1) 2^(BW_b-1) K), then requantize to the output format (+ ReLU).
#ifndef FXQ_MATMUL_H_
#define FXQ_MATMUL_H_

#include "fxq_common.h"

namespace fxq {

template <class CONFIG>
void matmul(const typename CONFIG::in0_t a[CONFIG::n0], const typename CONFIG::in1_t b[CONFIG::n1],
            typename CONFIG::out_t y[CONFIG::d0 * CONFIG::d1 * CONFIG::m * CONFIG::n]) {
#pragma HLS PIPELINE II = CONFIG::reuse_factor
    unsigned o = 0;
    for (unsigned i0 = 0; i0 < CONFIG::d0; i0++)
        for (unsigned i1 = 0; i1 < CONFIG::d1; i1++) {
            const unsigned ab = i0 * CONFIG::a0 + i1 * CONFIG::a1, bb = i0 * CONFIG::b0 + i1 * CONFIG::b1;
            for (unsigned r = 0; r < CONFIG::m; r++)
                for (unsigned c = 0; c < CONFIG::n; c++) {
                    typename CONFIG::accum_t acc = 0;
                    for (unsigned k = 0; k < CONFIG::k; k++) {
                        acc += a[ab + r * CONFIG::k + k] * b[bb + k * CONFIG::n + c];
                    }
                    y[o++] = relu_if(requantize<CONFIG::out_bits, CONFIG::shift>(acc), CONFIG::relu);
                }
        }
}

}  // namespace fxq

#endif
