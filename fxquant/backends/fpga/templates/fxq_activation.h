// fxquant HLS library: element-wise ops. All elements in parallel (II = 1).
//   relu:       max(x, 0) on the integers (format kept).
//   requantize: x re-expressed in the output format (shift, round half even, saturate; + ReLU).
//   clamp:      requantize, then clip to [lo, hi] (integers on the output grid; has_lo / has_hi
//               false = unbounded): ReLU6, Hardtanh, torch.clamp.
//   lut:        y = table[x - qmin_in], a ROM of 2^BW_in output integers indexed by the input
//               integer (as hls4ml's activation tables), computed once by fxquant.fixed_point.
#ifndef FXQ_ACTIVATION_H_
#define FXQ_ACTIVATION_H_

#include "fxq_common.h"

namespace fxq {

template <class CONFIG>
void relu(const typename CONFIG::in_t x[CONFIG::n], typename CONFIG::out_t y[CONFIG::n]) {
#pragma HLS PIPELINE II = 1
    for (unsigned i = 0; i < CONFIG::n; i++) {
        y[i] = x[i] < 0 ? typename CONFIG::out_t(0) : typename CONFIG::out_t(x[i]);
    }
}

template <class CONFIG>
void requantize_layer(const typename CONFIG::in_t x[CONFIG::n], typename CONFIG::out_t y[CONFIG::n]) {
#pragma HLS PIPELINE II = 1
    for (unsigned i = 0; i < CONFIG::n; i++) {
        y[i] = relu_if(requantize<CONFIG::out_bits, CONFIG::shift>(typename CONFIG::accum_t(x[i])), CONFIG::relu);
    }
}

template <class CONFIG>
void clamp(const typename CONFIG::in_t x[CONFIG::n], typename CONFIG::out_t y[CONFIG::n]) {
#pragma HLS PIPELINE II = 1
    for (unsigned i = 0; i < CONFIG::n; i++) {
        typename CONFIG::out_t v = requantize<CONFIG::out_bits, CONFIG::shift>(typename CONFIG::accum_t(x[i]));
        if (CONFIG::has_lo && v.to_int64() < CONFIG::lo) v = typename CONFIG::out_t(CONFIG::lo);
        if (CONFIG::has_hi && v.to_int64() > CONFIG::hi) v = typename CONFIG::out_t(CONFIG::hi);
        y[i] = v;
    }
}

template <class CONFIG>
void lut(const typename CONFIG::in_t x[CONFIG::n], typename CONFIG::out_t y[CONFIG::n],
         const typename CONFIG::table_raw_t table[CONFIG::table_size]) {
#pragma HLS PIPELINE II = 1
    for (unsigned i = 0; i < CONFIG::n; i++) {
        // x - qmin_in lies in [0, 2^BW_in): an unsigned index of the table
        const unsigned index = unsigned(x[i].to_int64() - qmin(CONFIG::in_bits));
        y[i] = typename CONFIG::out_t(table[index]);
    }
}

}  // namespace fxq

#endif
