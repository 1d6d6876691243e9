// fxquant HLS library: embedding (nn.Embedding), a gather from a ROM.
// The ids are integers <BW,0> in [0, V) (the host checks them before a call: ids are never clipped,
// fxq_model_raw's callers raise on any other id); table[id * dim + d] holds the raw row integers on
// grid FL_w. y[i * dim + d] = requantize(table[ids[i] * dim + d]) from FL_w to the output format
// (shift = FL_out - FL_w; 0 with the same format: an exact copy). An id outside [0, V) reads row 0,
// so the ROM is never read out of bounds.
#ifndef FXQ_EMBEDDING_H_
#define FXQ_EMBEDDING_H_

#include "fxq_common.h"

namespace fxq {

template <class CONFIG>
void embedding(const typename CONFIG::in_t ids[CONFIG::n_ids], typename CONFIG::out_t y[CONFIG::n_ids * CONFIG::dim],
               const typename CONFIG::table_raw_t table[CONFIG::vocab * CONFIG::dim]) {
#pragma HLS PIPELINE II = 1
    for (unsigned i = 0; i < CONFIG::n_ids; i++) {
        const long long id = ids[i].to_int64();
        const unsigned row = (id >= 0 && id < (long long)CONFIG::vocab) ? unsigned(id) : 0u;
        for (unsigned d = 0; d < CONFIG::dim; d++) {
            const ap_int<CONFIG::weight_bits> w = table[row * CONFIG::dim + d];
            y[i * CONFIG::dim + d] = requantize<CONFIG::out_bits, CONFIG::shift>(w);
        }
    }
}

}  // namespace fxq

#endif
