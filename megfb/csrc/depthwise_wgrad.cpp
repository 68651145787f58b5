// megfb custom CPU operator: the weight gradient of a stride-1 "same" depthwise convolution.
//
//   dw[c, i, j] = sum_{b, y, x} x[b, c, y + i - pad, x + j - pad] * dy[b, c, y, x]
//
// (zero outside x). MegEngine 1.13's CPU kernels compute this either as
// ConvolutionBackwardFilter or, as megfb/ops.py's plain fallback does, as a grouped forward
// conv whose "filter" is the whole gradient map; both run a generic loop several times slower
// than the forward conv of the same FLOPs. Here every (b, c, output row) pair is visited once:
// the k input rows it meets stay in the L1 cache while k x k row dot products, contiguous
// along x, are summed (vectorised by the compiler). Built and loaded by megfb/native.py;
// tests/test_native.py checks it against the fallback.
#include <algorithm>
#include <vector>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "megbrain/custom/custom.h"

CUSTOM_OP_REG_BEGIN(MegfbDepthwiseWGrad)

void wgrad_device_infer(const std::vector<Device>& inputs, const Param&, std::vector<Device>& outputs) {
    outputs[0] = inputs[0];
}

void wgrad_shape_infer(const std::vector<Shape>& inputs, const Param& params, std::vector<Shape>& outputs) {
    size_t k = static_cast<size_t>(params["k"].as<int32_t>());
    outputs[0] = Shape({inputs[0][1], k * k});
}

void wgrad_dtype_infer(const std::vector<DType>& inputs, const Param&, std::vector<DType>& outputs) {
    outputs[0] = inputs[0];
}

void wgrad_format_infer(const std::vector<Format>& inputs, const Param&, std::vector<Format>& outputs) {
    outputs[0] = inputs[0];
}

// sum of a[t] * b[t] over t < n, in 8 independent partial sums (so the compiler vectorises it
// without reassociating float additions on its own)
static inline float dot(const float* __restrict a, const float* __restrict b, long n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    long t = 0;
    for (; t + 8 <= n; t += 8)
        for (int l = 0; l < 8; ++l)
            acc[l] += a[t + l] * b[t + l];
    for (; t < n; ++t)
        acc[0] += a[t] * b[t];
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

// One (batch, channel) map: part[i * K + j] += sum_{y, x} x[y + i - pad, x + j - pad] * dy[y, x].
// Each output row is copied once, zero-padded to a multiple of 8 (dbuf), and each input row it
// meets once, with `pad` zeros either side (xbuf), so the inner loop has no bounds: for 8
// columns at a time, one load of dy feeds K multiply-adds into K x 8 accumulators, added per
// row into K x K x 8 running sums that are summed across their 8 lanes once per map.
struct Map {  // one (batch, channel) map: its origin and its row and column strides, in elements
    const float* p;
    long sh, sw;
};

static inline void copy_row(const Map& m, long row, long W, float* out) {
    const float* r = m.p + row * m.sh;
    if (m.sw == 1)
        std::copy(r, r + W, out);
    else
        for (long t = 0; t < W; ++t)
            out[t] = r[t * m.sw];
}

// output row y of dy into dbuf, zero-padded to W8 columns
static inline void load_dy_row(const Map& dc, long y, long W, long W8, float* dbuf) {
    copy_row(dc, y, W, dbuf);
    std::fill(dbuf + W, dbuf + W8, 0.f);
}

// input row `row` of x into xbuf with `pad` zeros before it and zeros up to W8 + k + 8 after
static inline void load_x_row(const Map& xc, long row, long W, long W8, long k, long pad, float* xbuf) {
    std::fill(xbuf, xbuf + pad, 0.f);
    copy_row(xc, row, W, xbuf + pad);
    std::fill(xbuf + pad + W, xbuf + W8 + k + 8, 0.f);
}

// For every output row y and tap row i whose input row exists: the two rows loaded into dbuf
// and xbuf, then body(i) sums their products.
template <typename Body>
static inline void for_each_row_pair(const Map& xc, const Map& dc, long H, long W, long k, long pad,
                                     float* xbuf, float* dbuf, Body body) {
    const long W8 = (W + 7) / 8 * 8;
    for (long y = 0; y < H; ++y) {
        load_dy_row(dc, y, W, W8, dbuf);
        for (long i = 0; i < k; ++i) {
            const long row = y + i - pad;
            if (row < 0 || row >= H)
                continue;
            load_x_row(xc, row, W, W8, k, pad, xbuf);
            body(i);
        }
    }
}

template <int K>
static void wgrad_map(const Map& xc, const Map& dc, long H, long W, long pad, float* part,
                      float* xbuf, float* dbuf) {
    const long W8 = (W + 7) / 8 * 8;
#ifdef __AVX2__
    __m256 sums[K * K];  // per tap, 8 lanes; summed across lanes once per map
    for (int t = 0; t < K * K; ++t)
        sums[t] = _mm256_setzero_ps();
#endif
    for_each_row_pair(xc, dc, H, W, K, pad, xbuf, dbuf, [&](long i) {
#ifdef __AVX2__
            __m256 a[K];
            for (int j = 0; j < K; ++j)
                a[j] = _mm256_setzero_ps();
            for (long x0 = 0; x0 < W8; x0 += 8) {
                const __m256 d = _mm256_loadu_ps(dbuf + x0);
                for (int j = 0; j < K; ++j)
                    a[j] = _mm256_fmadd_ps(_mm256_loadu_ps(xbuf + x0 + j), d, a[j]);
            }
            for (int j = 0; j < K; ++j)
                sums[i * K + j] = _mm256_add_ps(sums[i * K + j], a[j]);
#else
            for (int j = 0; j < K; ++j)
                part[i * K + j] += dot(xbuf + j, dbuf, W8);
#endif
    });
#ifdef __AVX2__
    for (int t = 0; t < K * K; ++t) {
        alignas(32) float v[8];
        _mm256_store_ps(v, sums[t]);
        part[t] += ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
    }
#endif
}

// any other kernel size: the same sums, without the fixed-size accumulators
static void wgrad_map_any(const Map& xc, const Map& dc, long H, long W, long k, long pad, float* part,
                          float* xbuf, float* dbuf) {
    const long W8 = (W + 7) / 8 * 8;
    for_each_row_pair(xc, dc, H, W, k, pad, xbuf, dbuf, [&](long i) {
        for (long j = 0; j < k; ++j)
            part[i * k + j] += dot(xbuf + j, dbuf, W8);
    });
}

void wgrad_compute(const std::vector<Tensor>& inputs, const Param& params, std::vector<Tensor>& outputs) {
    const Shape s = inputs[0].shape();
    const long B = s[0], C = s[1], H = s[2], W = s[3];
    const long k = params["k"].as<int32_t>(), pad = params["pad"].as<int32_t>();
    custom_assert(k % 2 == 1 && 2 * pad == k - 1, "MegfbDepthwiseWGrad: a same conv needs an odd k and pad (k - 1) / 2");
    const float* x = inputs[0].data<float>();
    const float* dy = inputs[1].data<float>();
    const std::vector<ptrdiff_t> xs = inputs[0].stride(), ds = inputs[1].stride();
    float* dw = outputs[0].data<float>();
    const long W8 = (W + 7) / 8 * 8;
    std::vector<float> xbuf(W8 + 2 * k + 16), dbuf(W8);
    std::vector<double> acc(k * k);
    std::vector<float> part(k * k);
    for (long c = 0; c < C; ++c) {
        std::fill(acc.begin(), acc.end(), 0.0);
        for (long b = 0; b < B; ++b) {
            const Map xc{x + b * xs[0] + c * xs[1], xs[2], xs[3]};
            const Map dc{dy + b * ds[0] + c * ds[1], ds[2], ds[3]};
            std::fill(part.begin(), part.end(), 0.f);
            if (k == 3)
                wgrad_map<3>(xc, dc, H, W, pad, part.data(), xbuf.data(), dbuf.data());
            else if (k == 5)
                wgrad_map<5>(xc, dc, H, W, pad, part.data(), xbuf.data(), dbuf.data());
            else
                wgrad_map_any(xc, dc, H, W, k, pad, part.data(), xbuf.data(), dbuf.data());
            for (long t = 0; t < k * k; ++t)
                acc[t] += part[t];
        }
        for (long t = 0; t < k * k; ++t)
            dw[c * k * k + t] = static_cast<float>(acc[t]);
    }
}

CUSTOM_OP_REG(MegfbDepthwiseWGrad)
        .set_description("weight gradient of a stride-1 same depthwise conv (megfb)")
        .add_input("x")
        .add_input("dy")
        .add_output("dw")
        .add_param("k", 3)
        .add_param("pad", 1)
        .set_device_infer(wgrad_device_infer)
        .set_shape_infer(wgrad_shape_infer)
        .set_dtype_infer(wgrad_dtype_infer)
        .set_format_infer(wgrad_format_infer)
        .set_compute(wgrad_compute);

CUSTOM_OP_REG_END(MegfbDepthwiseWGrad)
