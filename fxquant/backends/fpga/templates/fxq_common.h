// fxquant HLS library: integer types and the requantize step (hand-written, not generated).
//
// A value <BW,FL> is an ap_int<BW> holding the integer k of k * 2^-FL. Requantizing an
// accumulator `acc` (an ap_int<W> on grid FL_acc) to <BW_out,FL_out> with SHIFT = FL_out - FL_acc:
//   SHIFT >= 0: y = clamp(acc * 2^SHIFT)                        (exact left shift, saturating)
//   SHIFT <  0: y = clamp((acc + 2^(s-1) - 1 + ((acc >> s) & 1)) >> s),  s = -SHIFT
//               = round-to-nearest, ties to even (AP_RND_CONV), arithmetic shifts
// clamp saturates to [-2^(BW_out-1), 2^(BW_out-1)-1] (AP_SAT); it never wraps. This is
// docs/number_format.md's requantize, bit for bit, for every shift (no intermediate overflow).
#ifndef FXQ_COMMON_H_
#define FXQ_COMMON_H_

#include "ap_int.h"

// The top function's intermediate arrays: local buffers under synthesis; static in the C
// simulation, so that a large model's activations do not overflow the host thread's stack (every
// element is written before it is read, so no state carries from one call to the next).
#ifdef __SYNTHESIS__
#define FXQ_BUFFER
#else
#define FXQ_BUFFER static
#endif

namespace fxq {

// 2^n as a 64-bit integer for 0 <= n <= 62 (larger n are clamped; callers only use them on 0).
constexpr long long pow2(int n) { return n <= 0 ? 1LL : (n >= 62 ? (1LL << 62) : (1LL << n)); }
constexpr long long qmax(int bits) { return pow2(bits - 1) - 1; }
constexpr long long qmin(int bits) { return -pow2(bits - 1); }
// floor(qmax / 2^s) and ceil(qmin / 2^s): the accumulator range that a left shift keeps in range.
constexpr long long shl_hi(int bits, int s) { return s >= bits - 1 ? 0 : qmax(bits) >> s; }
constexpr long long shl_lo(int bits, int s) { return s >= bits ? 0 : -(pow2(bits - 1) >> s); }

template <int BW, int W>
ap_int<BW> saturate(const ap_int<W> &v) {
#pragma HLS INLINE
    if (v > qmax(BW)) return ap_int<BW>(qmax(BW));
    if (v < qmin(BW)) return ap_int<BW>(qmin(BW));
    return ap_int<BW>(v);
}

template <int BW, int SHIFT, int W, bool LEFT = (SHIFT >= 0)>
struct requantizer;

template <int BW, int SHIFT, int W>
struct requantizer<BW, SHIFT, W, true> {
    static ap_int<BW> run(const ap_int<W> &acc) {
#pragma HLS INLINE
        if (acc > shl_hi(BW, SHIFT)) return ap_int<BW>(qmax(BW));
        if (acc < shl_lo(BW, SHIFT)) return ap_int<BW>(qmin(BW));
        // |acc| <= 2^(BW-1-SHIFT) here, so the product fits BW <= 16 bits (SHIFT < BW unless acc == 0).
        return ap_int<BW>(acc.to_int64() * pow2(SHIFT < BW ? SHIFT : 0));
    }
};

template <int BW, int SHIFT, int W>
struct requantizer<BW, SHIFT, W, false> {
    static ap_int<BW> run(const ap_int<W> &acc) {
#pragma HLS INLINE
        // s >= W: |acc| <= 2^(W-1) <= 2^(s-1), which rounds to 0 (the one tie, -2^(s-1), goes to even 0).
        if (-SHIFT >= W) return ap_int<BW>(0);
        const int s = (-SHIFT < W) ? -SHIFT : 1;
        ap_int<W + 1> t = acc;
        ap_int<W + 1> half_minus_one = (ap_int<W + 1>(1) << (s - 1)) - 1;
        t += half_minus_one + ((acc >> s) & 1);
        return saturate<BW>(ap_int<W + 1>(t >> s));
    }
};

template <int BW, int SHIFT, int W>
ap_int<BW> requantize(const ap_int<W> &acc) {
#pragma HLS INLINE
    return requantizer<BW, SHIFT, W>::run(acc);
}

template <int BW>
ap_int<BW> relu_if(const ap_int<BW> &v, bool relu) {
#pragma HLS INLINE
    return (relu && v < 0) ? ap_int<BW>(0) : v;
}

// round_half_even(x * 2^-S) for S >= 1, no saturation (fixed_point.shift_round_half_even):
// floor((x + 2^(S-1) - 1 + ((x >> S) & 1)) / 2^S) on arithmetic shifts, one bit wider than x.
template <int S, int W>
ap_int<W + 1> round_shift(const ap_int<W> &x) {
#pragma HLS INLINE
    ap_int<W + 1> t = x;
    t += ((ap_int<W + 1>(1) << (S - 1)) - 1) + ((x >> S) & 1);
    return t >> S;
}

// fixed_point.row_reciprocal: floor(2^K / s + 1/2) = (2^(K+1) + s) / (2 s) for s >= 1, 0 for s == 0;
// one division of wide unsigned integers (NUM_BITS holds 2^(K+1) + max s).
template <int K, int NUM_BITS, int W>
ap_uint<NUM_BITS> row_reciprocal(const ap_uint<W> &s) {
#pragma HLS INLINE
    if (s == 0) return ap_uint<NUM_BITS>(0);
    ap_uint<NUM_BITS> num = (ap_uint<NUM_BITS>(1) << (K + 1)) + s;
    ap_uint<NUM_BITS> den = ap_uint<NUM_BITS>(s) << 1;
    return num / den;
}

// fixed_point.bit_length64: bit length of a non-negative integer below 2^63 (0 for 0), a fixed
// 6-step binary search.
inline int bit_length64(const ap_uint<64> &x) {
#pragma HLS INLINE
    ap_uint<64> y = x;
    int n = 0;
    for (int s = 32; s >= 1; s >>= 1) {
#pragma HLS UNROLL
        if ((y >> s) != 0) {
            n += s;
            y >>= s;
        }
    }
    return n + (y != 0 ? 1 : 0);
}

// fixed_point.isqrt64: floor(sqrt(x)) for 0 <= x <= 2^62, the bitwise restoring square root in a
// fixed 32 steps of compare / subtract / shift (no multiply, no division).
inline ap_uint<64> isqrt64(const ap_uint<64> &x) {
#pragma HLS INLINE
    ap_uint<64> num = x, res = 0, bit = ap_uint<64>(1) << 62;
    for (int i = 0; i < 32; i++) {
#pragma HLS UNROLL
        const ap_uint<64> trial = res + bit;
        if (num >= trial) {
            num -= trial;
            res = (res >> 1) + bit;
        } else {
            res >>= 1;
        }
        bit >>= 2;
    }
    return res;
}

template <class T_IN, class T_OUT, unsigned N>
void copy(const T_IN in[N], T_OUT out[N]) {
    for (unsigned i = 0; i < N; i++) {
#pragma HLS UNROLL
        out[i] = in[i];
    }
}

}  // namespace fxq

#endif
