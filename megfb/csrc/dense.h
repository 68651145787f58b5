// megfb custom operators' shared helpers: a tensor's values as one dense float array, and the
// device / dtype / format inference of operators whose outputs all follow their first input.
#pragma once
#include <algorithm>
#include <cstddef>
#include <thread>
#include <vector>

#include "megbrain/custom/custom.h"

namespace megfb {

// t's values as a dense array: t's own memory when it is contiguous, else a copy in buf
// (up to 4 dimensions, any strides)
inline const float* dense(const custom::Tensor& t, std::vector<float>& buf) {
    if (t.is_contiguous())
        return t.data<float>();
    const custom::Shape s = t.shape();
    const std::vector<ptrdiff_t> st = t.stride();
    long n[4] = {1, 1, 1, 1}, d[4] = {0, 0, 0, 0};
    const long nd = static_cast<long>(s.ndim());
    for (long i = 0; i < nd; ++i) {
        n[4 - nd + i] = static_cast<long>(s[i]);
        d[4 - nd + i] = static_cast<long>(st[i]);
    }
    buf.resize(n[0] * n[1] * n[2] * n[3]);
    const float* src = t.data<float>();
    float* out = buf.data();
    for (long a = 0; a < n[0]; ++a)
        for (long b = 0; b < n[1]; ++b)
            for (long c = 0; c < n[2]; ++c)
                for (long e = 0; e < n[3]; ++e)
                    *out++ = src[a * d[0] + b * d[1] + c * d[2] + e * d[3]];
    return buf.data();
}

// body(begin, end, part) over [0, n) cut into `threads` contiguous parts (at most n), part 0 on
// the calling thread and each other part on a thread of its own, all joined before returning.
// megfb's operators get threads > 1 only on MegEngine's inline CPU device, where nothing else
// runs meanwhile (megfb/native.py threads); parts are fixed by n and threads, so are results.
template <typename Body>
void parallel_for(long n, long threads, Body body) {
    threads = std::max(1L, std::min(threads, n));
    if (threads == 1) {
        body(0L, n, 0L);
        return;
    }
    std::vector<std::thread> others;
    for (long t = 1; t < threads; ++t)
        others.emplace_back(body, n * t / threads, n * (t + 1) / threads, t);
    body(0L, n / threads, 0L);
    for (auto& th : others)
        th.join();
}

// every output on the first input's device, with its dtype and format
inline void device_as_first(const std::vector<custom::Device>& inputs, const custom::Param&,
                            std::vector<custom::Device>& outputs) {
    for (auto& o : outputs)
        o = inputs[0];
}

inline void dtype_as_first(const std::vector<custom::DType>& inputs, const custom::Param&,
                           std::vector<custom::DType>& outputs) {
    for (auto& o : outputs)
        o = inputs[0];
}

inline void format_as_first(const std::vector<custom::Format>& inputs, const custom::Param&,
                            std::vector<custom::Format>& outputs) {
    for (auto& o : outputs)
        o = inputs[0];
}

}  // namespace megfb
