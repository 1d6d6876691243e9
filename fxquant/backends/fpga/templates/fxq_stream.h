// fxquant: a minimal software stand-in for hls::stream, for g++ C-simulation only (Vitis HLS
// supplies the real hls_stream.h). FIFO semantics: write appends, read pops the oldest element.
#ifndef FXQ_STREAM_H_
#define FXQ_STREAM_H_

#include <cstdio>
#include <cstdlib>
#include <deque>

namespace hls {

template <class T>
class stream {
  public:
    void write(const T &v) { q_.push_back(v); }
    T read() {
        if (q_.empty()) {
            std::fprintf(stderr, "fxq_stream: read from an empty stream\n");
            std::abort();
        }
        T v = q_.front();
        q_.pop_front();
        return v;
    }
    bool empty() const { return q_.empty(); }
    bool full() const { return false; }
    unsigned size() const { return q_.size(); }
    stream &operator<<(const T &v) { write(v); return *this; }
    stream &operator>>(T &v) { v = read(); return *this; }

  private:
    std::deque<T> q_;
};

}  // namespace hls

#endif
