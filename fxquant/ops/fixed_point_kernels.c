/* Fused fixed-point quantize kernels for the training hot path (CPU).
 *
 * Implements the formula of fxquant/fixed_point.py on float32/float64 arrays in one pass:
 *   forward:  y = clamp(round(x * 2^FL), -2^(BW-1), 2^(BW-1)-1) * 2^-FL,  amax = max|x|
 *             round = nearest-even (rint under the default FE_TONEAREST mode) or stochastic
 *             floor(x*2^FL + u), u in [0,1) from a counter-based hash of (seed, index).
 *             BW <= 0 means off: y = x (callers map the spec's 32 = off to 0); BW = 32 saturates
 *             to int32 (biases).
 *             relu != 0 fuses a preceding ReLU: the lower clamp is 0 (q(relu(x)) == clamp(round(x*2^FL), 0, hi)
 *             exactly, for nearest and stochastic rounding) and amax = max(relu(x)).
 *   backward: g_in = g * [ -2^(BW-1) <= x*2^FL <= 2^(BW-1)-1 ]   (straight-through estimator;
 *             with relu: g * [ 0 < x*2^FL <= 2^(BW-1)-1 ], ReLU's own gradient included)
 *             then, if grad_bits > 0, g_in is quantized to grad_bits with the dynamic
 *             FL = grad_bits - 2 - floor(log2 max|g_in|)   (second pass).
 * Build: cc -O3 -march=native -fopenmp -fno-math-errno -shared -fPIC (see fxquant/ops/__init__.py).
 */
#include <math.h>
#include <stdint.h>

static inline uint64_t splitmix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* u in [0,1) with 24 random bits: exact in float and double. */
static inline double uniform01(uint64_t seed, int64_t i) {
    return (double)(splitmix64(seed ^ splitmix64((uint64_t)i)) >> 40) * (1.0 / 16777216.0);
}

static inline int fit_frac_bits(double max_abs, int bits) {
    if (!(max_abs > 0.0) || isinf(max_abs)) return bits - 1;
    int e;
    frexp(max_abs, &e);
    int fl = bits - 2 - (e - 1);
    return fl < -64 ? -64 : (fl > 64 ? 64 : fl);
}

#define DEFINE_KERNELS(T, SUF, RINT, FLOOR, FABS)                                                  \
static void quantize_core_##SUF(const T* x, T* y, int64_t n, int bits, int fl, int stochastic,   \
                                uint64_t seed, int nthreads) {                                    \
    const T s = (T)ldexp(1.0, fl), inv = (T)ldexp(1.0, -fl);                                      \
    const T lo = (T)(-ldexp(1.0, bits - 1)), hi = (T)(ldexp(1.0, bits - 1) - 1.0);                \
    if (!stochastic) {                                                                            \
        _Pragma("omp parallel for simd num_threads(nthreads) schedule(static)")                   \
        for (int64_t i = 0; i < n; ++i) {                                                         \
            T r = RINT(x[i] * s);                                                                 \
            r = r < lo ? lo : (r > hi ? hi : r);                                                  \
            y[i] = r * inv;                                                                       \
        }                                                                                         \
    } else {                                                                                      \
        _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                        \
        for (int64_t i = 0; i < n; ++i) {                                                         \
            T r = FLOOR(x[i] * s + (T)uniform01(seed, i));                                        \
            r = r < lo ? lo : (r > hi ? hi : r);                                                  \
            y[i] = r * inv;                                                                       \
        }                                                                                         \
    }                                                                                             \
}                                                                                                 \
                                                                                                  \
void fxq_quantize_##SUF(const T* x, T* y, int64_t n, int bits, int fl, int stochastic,           \
                        uint64_t seed, int relu, T* amax_out, int nthreads) {                     \
    T m = 0;                                                                                      \
    if (bits <= 0) {                                                                             \
        if (relu) {                                                                               \
            _Pragma("omp parallel for simd num_threads(nthreads) schedule(static) reduction(max:m)") \
            for (int64_t i = 0; i < n; ++i) { T v = x[i] > 0 ? x[i] : (T)0; m = v > m ? v : m; y[i] = v; } \
        } else {                                                                                  \
            _Pragma("omp parallel for simd num_threads(nthreads) schedule(static) reduction(max:m)") \
            for (int64_t i = 0; i < n; ++i) { T a = FABS(x[i]); m = a > m ? a : m; y[i] = x[i]; } \
        }                                                                                         \
        *amax_out = m;                                                                            \
        return;                                                                                   \
    }                                                                                             \
    const T s = (T)ldexp(1.0, fl), inv = (T)ldexp(1.0, -fl);                                      \
    const T lo = relu ? (T)0 : (T)(-ldexp(1.0, bits - 1)), hi = (T)(ldexp(1.0, bits - 1) - 1.0);  \
    if (!stochastic) {                                                                            \
        _Pragma("omp parallel for simd num_threads(nthreads) schedule(static) reduction(max:m)")  \
        for (int64_t i = 0; i < n; ++i) {                                                         \
            T a = relu ? x[i] : FABS(x[i]); m = a > m ? a : m;                                    \
            T r = RINT(x[i] * s);                                                                 \
            r = r < lo ? lo : (r > hi ? hi : r);                                                  \
            y[i] = r * inv;                                                                       \
        }                                                                                         \
    } else {                                                                                      \
        _Pragma("omp parallel for num_threads(nthreads) schedule(static) reduction(max:m)")       \
        for (int64_t i = 0; i < n; ++i) {                                                         \
            T a = relu ? x[i] : FABS(x[i]); m = a > m ? a : m;                                    \
            T r = FLOOR(x[i] * s + (T)uniform01(seed, i));                                        \
            r = r < lo ? lo : (r > hi ? hi : r);                                                  \
            y[i] = r * inv;                                                                       \
        }                                                                                         \
    }                                                                                             \
    *amax_out = m;                                                                                \
}                                                                                                 \
                                                                                                  \
void fxq_ste_backward_##SUF(const T* g, const T* x, T* gi, int64_t n, int bits, int fl,          \
                            int grad_bits, int stochastic, uint64_t seed, int relu, int nthreads) { \
    T m = 0;                                                                                      \
    const T s = bits <= 0 ? (T)1 : (T)ldexp(1.0, fl);                                             \
    const T hi = bits <= 0 ? (T)INFINITY : (T)(ldexp(1.0, bits - 1) - 1.0);                       \
    const T lo = bits <= 0 ? (T)-INFINITY : (T)(-ldexp(1.0, bits - 1));                           \
    if (relu) {                                                                                   \
        _Pragma("omp parallel for simd num_threads(nthreads) schedule(static) reduction(max:m)")  \
        for (int64_t i = 0; i < n; ++i) {                                                         \
            T xs = x[i] * s;                                                                      \
            T v = (xs > 0 && xs <= hi) ? g[i] : (T)0;                                             \
            gi[i] = v; T a = FABS(v); m = a > m ? a : m;                                          \
        }                                                                                         \
    } else {                                                                                      \
        _Pragma("omp parallel for simd num_threads(nthreads) schedule(static) reduction(max:m)")  \
        for (int64_t i = 0; i < n; ++i) {                                                         \
            T xs = x[i] * s;                                                                      \
            T v = (xs >= lo && xs <= hi) ? g[i] : (T)0;                                           \
            gi[i] = v; T a = FABS(v); m = a > m ? a : m;                                          \
        }                                                                                         \
    }                                                                                             \
    if (grad_bits > 0)                                                                           \
        quantize_core_##SUF(gi, gi, n, grad_bits, fit_frac_bits((double)m, grad_bits),            \
                            stochastic, seed ^ 0xA5A5A5A5DEADBEEFull, nthreads);                  \
}

DEFINE_KERNELS(float, f32, rintf, floorf, fabsf)
DEFINE_KERNELS(double, f64, rint, floor, fabs)
