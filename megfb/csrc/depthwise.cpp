// megfb custom CPU operators: a stride-1 "same" depthwise convolution (MegfbDepthwiseConv;
// flip = 1: with its kernels rotated by 180 degrees, which is the conv's input gradient) and
// its weight gradient (MegfbDepthwiseWGrad):
//
//   y[b, g, y, x] = sum_{i, j} w[g / share, i, j] * x[b, g, y + i - pad, x + j - pad]
//   dw[c, i, j] = sum_{b, g / share = c, y, x} x[b, g, y + i - pad, x + j - pad] * dy[b, g, y, x]
//
// (zero outside x). `share` maps in a row use one kernel: the polyphase sub-images of a
// dilated conv (megfb/ops.py depthwise_on_phases) without broadcasting the weights. MegEngine
// 1.13's x86 depthwise kernels reach 8-17 GFLOP/s on FBRestormer's training shapes, its weight
// gradient less. Here each (batch, channel) map is copied once into a zero-bordered buffer, so
// the inner loops have no bounds checks; the conv computes R output rows together (each
// vector loaded from the buffer feeds every output row that reads it, from registers), the
// weight gradient sums k products per loaded vector of dy, one tap row at a time. Maps are split
// over `threads` threads (dense.h parallel_for). Built and loaded by megfb/native.py;
// tests/test_native.py checks both against MegEngine's conv and float64.
#include <algorithm>
#include <vector>

#include "megbrain/custom/custom.h"
#include "dense.h"
#include "simd.h"

CUSTOM_OP_REG_BEGIN(MegfbDepthwise)

using megfb::VL;
using megfb::vf;

namespace {

constexpr int R = 4;  // output rows per pass

// The zero-bordered copy of one H x W map: rows [pad, pad + H), columns [pad, pad + W) hold
// the map; everything else stays zero (set once per call, the maps all share the shape).
struct Padded {
    long H, W, pad, Wv, Wp, rows;
    std::vector<float> buf;
    Padded(long H_, long W_, long pad_, long extra_rows)
        : H(H_), W(W_), pad(pad_), Wv((W_ + VL - 1) / VL * VL) {
        Wp = (Wv + 2 * pad + VL - 1) / VL * VL;
        rows = H + 2 * pad + extra_rows;
        buf.assign(rows * Wp, 0.f);
    }
    void load(const float* map) {
        for (long y = 0; y < H; ++y)
            std::copy(map + y * W, map + (y + 1) * W, buf.data() + (y + pad) * Wp + pad);
    }
    const float* row(long r) const { return buf.data() + r * Wp; }
};

inline void store(float* out, long x0, long W, vf v) {
    if (x0 + VL <= W) {
        megfb::storeu(out + x0, v);
    } else {
        float lanes[VL];
        megfb::storeu(lanes, v);
        std::copy(lanes, lanes + (W - x0), out + x0);
    }
}

template <int K>
void conv_map(const Padded& P, const float* wk, float* out) {
    for (long y = 0; y < P.H; y += R) {
        for (long x0 = 0; x0 < P.Wv; x0 += VL) {
            vf acc[R];
#pragma GCC unroll 8
            for (int o = 0; o < R; ++o)
                acc[o] = vf{};
#pragma GCC unroll 16
            for (int r = 0; r < R + K - 1; ++r) {
                const float* row = P.row(y + r) + x0;
#pragma GCC unroll 8
                for (int j = 0; j < K; ++j) {
                    const vf v = megfb::loadu(row + j);
#pragma GCC unroll 8
                    for (int o = 0; o < R; ++o) {
                        const int i = r - o;
                        if (i >= 0 && i < K)
                            acc[o] = megfb::fmadd(megfb::splat(wk[i * K + j]), v, acc[o]);
                    }
                }
            }
            for (int o = 0; o < R && y + o < P.H; ++o)
                store(out + (y + o) * P.W, x0, P.W, acc[o]);
        }
    }
}

// any other odd kernel size: one output row at a time
void conv_map_any(const Padded& P, long k, const float* wk, float* out) {
    for (long y = 0; y < P.H; ++y)
        for (long x0 = 0; x0 < P.Wv; x0 += VL) {
            vf acc = vf{};
            for (long i = 0; i < k; ++i)
                for (long j = 0; j < k; ++j)
                    acc = megfb::fmadd(megfb::splat(wk[i * k + j]), megfb::loadu(P.row(y + i) + x0 + j), acc);
            store(out + y * P.W, x0, P.W, acc);
        }
}

void conv_shape_infer(const std::vector<Shape>& inputs, const Param&, std::vector<Shape>& outputs) {
    outputs[0] = inputs[0];
}

// inputs: x (B, G, H, W), w (G / share, k * k), any strides; output y (B, G, H, W)
void conv_compute(const std::vector<Tensor>& inputs, const Param& params, std::vector<Tensor>& outputs) {
    const Shape s = inputs[0].shape();
    const long B = s[0], G = s[1], H = s[2], W = s[3];
    const long k = params["k"].as<int32_t>(), pad = params["pad"].as<int32_t>();
    const long share = params["share"].as<int32_t>();
    const bool flip = params["flip"].as<int32_t>() != 0;
    custom_assert(k % 2 == 1 && 2 * pad == k - 1, "MegfbDepthwiseConv: a same conv needs an odd k and pad (k - 1) / 2");
    std::vector<float> bx, bw;
    const float* x = megfb::dense(inputs[0], bx);
    const float* w = megfb::dense(inputs[1], bw);
    float* y = outputs[0].data<float>();
    const long threads = params["threads"].as<int32_t>();
    megfb::parallel_for(B * G, threads, [&](long begin, long end, long) {
        Padded P(H, W, pad, R);
        std::vector<float> wk(k * k);  // the map's kernel, rotated when flip
        for (long m = begin; m < end; ++m) {
            const float* wg = w + ((m % G) / share) * k * k;
            for (long t = 0; t < k * k; ++t)
                wk[t] = wg[flip ? k * k - 1 - t : t];
            P.load(x + m * H * W);
            float* out = y + m * H * W;
            if (k == 3)
                conv_map<3>(P, wk.data(), out);
            else if (k == 5)
                conv_map<5>(P, wk.data(), out);
            else
                conv_map_any(P, k, wk.data(), out);
        }
    });
}

// one map's weight gradient: acc[i * K + j] += sum_{y, x} P[y + i, x + j] * D[y, x] (D: dy with
// zero columns up to Wv)
template <int K>
void wgrad_map(const Padded& P, const Padded& D, double* acc) {
    for (int i = 0; i < K; ++i) {
        vf a[K];
        for (int j = 0; j < K; ++j)
            a[j] = vf{};
        for (long y = 0; y < P.H; ++y) {
            const float* row = P.row(y + i);
            const float* d = D.row(y);
            for (long x0 = 0; x0 < P.Wv; x0 += VL) {
                const vf dv = megfb::loadu(d + x0);
#pragma GCC unroll 8
                for (int j = 0; j < K; ++j)
                    a[j] = megfb::fmadd(megfb::loadu(row + x0 + j), dv, a[j]);
            }
        }
        for (int j = 0; j < K; ++j)
            acc[i * K + j] += megfb::hsum(a[j]);
    }
}

void wgrad_map_any(const Padded& P, const Padded& D, long k, double* acc) {
    for (long i = 0; i < k; ++i)
        for (long j = 0; j < k; ++j) {
            vf a = vf{};
            for (long y = 0; y < P.H; ++y)
                for (long x0 = 0; x0 < P.Wv; x0 += VL)
                    a = megfb::fmadd(megfb::loadu(P.row(y + i) + x0 + j), megfb::loadu(D.row(y) + x0), a);
            acc[i * k + j] += megfb::hsum(a);
        }
}

void wgrad_shape_infer(const std::vector<Shape>& inputs, const Param& params, std::vector<Shape>& outputs) {
    const size_t k = static_cast<size_t>(params["k"].as<int32_t>());
    const size_t share = static_cast<size_t>(params["share"].as<int32_t>());
    outputs[0] = Shape({inputs[0][1] / share, k * k});
}

// inputs: x, dy (B, G, H, W), any strides; output dw (G / share, k * k)
void wgrad_compute(const std::vector<Tensor>& inputs, const Param& params, std::vector<Tensor>& outputs) {
    const Shape s = inputs[0].shape();
    const long B = s[0], G = s[1], H = s[2], W = s[3];
    const long k = params["k"].as<int32_t>(), pad = params["pad"].as<int32_t>();
    const long share = params["share"].as<int32_t>();
    custom_assert(k % 2 == 1 && 2 * pad == k - 1, "MegfbDepthwiseWGrad: a same conv needs an odd k and pad (k - 1) / 2");
    std::vector<float> bx, bdy;
    const float* x = megfb::dense(inputs[0], bx);
    const float* dy = megfb::dense(inputs[1], bdy);
    float* dw = outputs[0].data<float>();
    const long threads = std::max(1L, std::min<long>(params["threads"].as<int32_t>(), B * G));
    // each part sums its maps into its own kernels' sums; the parts are added in order after
    std::vector<double> parts(threads * (G / share) * k * k, 0.0);
    megfb::parallel_for(B * G, threads, [&](long begin, long end, long part) {
        Padded P(H, W, pad, 0), D(H, W, 0, 0);
        double* own = parts.data() + part * (G / share) * k * k;
        for (long m = begin; m < end; ++m) {
            P.load(x + m * H * W);
            D.load(dy + m * H * W);
            double* a = own + ((m % G) / share) * k * k;
            if (k == 3)
                wgrad_map<3>(P, D, a);
            else if (k == 5)
                wgrad_map<5>(P, D, a);
            else
                wgrad_map_any(P, D, k, a);
        }
    });
    std::vector<double> acc(parts.begin(), parts.begin() + (G / share) * k * k);
    for (long t = 1; t < threads; ++t)
        for (size_t i = 0; i < acc.size(); ++i)
            acc[i] += parts[t * acc.size() + i];
    std::copy(acc.begin(), acc.end(), dw);
}

}  // namespace

CUSTOM_OP_REG(MegfbDepthwiseConv)
        .set_description("stride-1 same depthwise conv, optionally with rotated kernels (megfb)")
        .add_input("x")
        .add_input("w")
        .add_output("y")
        .add_param("k", 3)
        .add_param("pad", 1)
        .add_param("share", 1)
        .add_param("flip", 0)
        .add_param("threads", 1)
        .set_device_infer(megfb::device_as_first)
        .set_shape_infer(conv_shape_infer)
        .set_dtype_infer(megfb::dtype_as_first)
        .set_format_infer(megfb::format_as_first)
        .set_compute(conv_compute);

CUSTOM_OP_REG(MegfbDepthwiseWGrad)
        .set_description("weight gradient of a stride-1 same depthwise conv (megfb)")
        .add_input("x")
        .add_input("dy")
        .add_output("dw")
        .add_param("k", 3)
        .add_param("pad", 1)
        .add_param("share", 1)
        .add_param("threads", 1)
        .set_device_infer(megfb::device_as_first)
        .set_shape_infer(wgrad_shape_infer)
        .set_dtype_infer(megfb::dtype_as_first)
        .set_format_infer(megfb::format_as_first)
        .set_compute(wgrad_compute);

CUSTOM_OP_REG_END(MegfbDepthwise)
