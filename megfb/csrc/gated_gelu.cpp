// megfb custom CPU operators: the gate of Restormer's GDFN, y = gelu(x1) * x2, where x1 and x2
// are the two channel halves of x (B, 2H, h, w) (megfb/ops.py gated_gelu; swap = 1: the GFM's
// gate x1 * gelu(x2)), and GELU on its own (MegfbGelu*, the skip fusion's):
//
//   gelu(v) = v Phi(v), Phi(v) = sigmoid(v * poly(v * v))   (megfb/ops.py GELU_LOGIT_POLY)
//   forward:  y = x1 Phi(x1) x2
//   backward: dx1 = dy x2 (Phi(x1) + x1 pdf(x1)), dx2 = dy x1 Phi(x1), pdf(v) = exp(-v^2/2) / sqrt(2 pi)
//
// The same formula megfb's MegEngine fast path evaluates (ops._GELU), but in one pass over the
// map each way instead of ~11 forward and ~10 backward elementwise passes, a split and a
// concat; Phi is recomputed in the backward rather than stored. exp is Cephes' single-precision
// polynomial (within ~1 ulp), written so that the compiler vectorises the loops. Built and
// loaded by megfb/native.py; tests/test_native.py checks both against float64 and against the
// MegEngine definition.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "megbrain/custom/custom.h"
#include "dense.h"

CUSTOM_OP_REG_BEGIN(MegfbGatedGelu)

using megfb::dense;

// the logit of Phi over v: v * sum_k C[k] (v*v)^k, k = 0..6 (= megfb/ops.py GELU_LOGIT_POLY)
constexpr float C0 = 1.5957685f, C1 = 0.072668567f, C2 = -6.6259374e-05f, C3 = -0.0001104805f,
                C4 = 7.9382444e-06f, C5 = -2.6689435e-07f, C6 = 3.6112671e-09f;
constexpr float INV_SQRT_2PI = 0.3989422804014327f;

// e^v in float (Cephes expf: v = n ln2 + r, |r| <= ln2 / 2, a degree-5 polynomial for e^r),
// v clamped to [-87.3, 88]: no infinities or denormals (sigmoid needs only 1 / (1 + huge), and
// e^-87.3 ~ 1e-38 is as good as 0 in every product here); no branch, so loops vectorise
inline float exp_f(float v) {
    const float x = std::min(std::max(v, -87.3f), 88.0f);
    const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest (1.5 * 2^23)
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.f;
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

inline float phi(float v) {
    const float t = v * v;
    float p = C6 * t + C5;
    p = p * t + C4;
    p = p * t + C3;
    p = p * t + C2;
    p = p * t + C1;
    p = p * t + C0;
    return 1.f / (1.f + exp_f(-(v * p)));
}

// one channel's row of pixels each way (separate, non-aliasing arrays: vectorised)
void gate_forward(const float* __restrict x1, const float* __restrict x2, float* __restrict y, long n) {
    for (long p = 0; p < n; ++p)
        y[p] = x1[p] * phi(x1[p]) * x2[p];
}

void gate_backward(const float* __restrict g, const float* __restrict x1, const float* __restrict x2,
                   float* __restrict d1, float* __restrict d2, long n) {
    for (long p = 0; p < n; ++p) {
        const float v = x1[p], f = phi(v);
        const float pdf = exp_f(-0.5f * v * v) * INV_SQRT_2PI;
        d1[p] = g[p] * x2[p] * (f + v * pdf);
        d2[p] = g[p] * v * f;
    }
}

void fwd_shape_infer(const std::vector<Shape>& inputs, const Param&, std::vector<Shape>& outputs) {
    const Shape s = inputs[0];
    outputs[0] = Shape({s[0], s[1] / 2, s[2], s[3]});
}

// input: x (B, 2H, h, w), any strides; output: y (B, H, h, w)
void fwd_compute(const std::vector<Tensor>& inputs, const Param& params, std::vector<Tensor>& outputs) {
    const Shape s = inputs[0].shape();
    const long B = s[0], H = s[1] / 2, HW = s[2] * s[3];
    std::vector<float> bx;
    const float* x = dense(inputs[0], bx);
    float* y = outputs[0].data<float>();
    const long g = params["swap"].as<int32_t>() ? H * HW : 0;  // offset of the half through gelu
    megfb::parallel_for(B * H, params["threads"].as<int32_t>(), [&](long begin, long end, long) {
        for (long u = begin; u < end; ++u) {
            const long b = u / H, c = u % H;
            const float* x0 = x + (b * 2 * H + c) * HW;
            gate_forward(x0 + g, x0 + H * HW - g, y + (b * H + c) * HW, HW);
        }
    });
}

CUSTOM_OP_REG(MegfbGatedGeluForward)
        .set_description("gelu(x1) * x2 over the channel halves of x, forward (megfb)")
        .add_input("x")
        .add_output("y")
        .add_param("swap", 0)
        .add_param("threads", 1)
        .set_device_infer(megfb::device_as_first)
        .set_shape_infer(fwd_shape_infer)
        .set_dtype_infer(megfb::dtype_as_first)
        .set_format_infer(megfb::format_as_first)
        .set_compute(fwd_compute);

void bwd_shape_infer(const std::vector<Shape>& inputs, const Param&, std::vector<Shape>& outputs) {
    outputs[0] = inputs[1];
}

// inputs: dy (B, H, h, w), x (B, 2H, h, w), any strides; output: dx (B, 2H, h, w)
void bwd_compute(const std::vector<Tensor>& inputs, const Param& params, std::vector<Tensor>& outputs) {
    const Shape s = inputs[1].shape();
    const long B = s[0], H = s[1] / 2, HW = s[2] * s[3];
    std::vector<float> bdy, bx;
    const float* dy = dense(inputs[0], bdy);
    const float* x = dense(inputs[1], bx);
    float* dx = outputs[0].data<float>();
    const bool swap = params["swap"].as<int32_t>() != 0;
    megfb::parallel_for(B * H, params["threads"].as<int32_t>(), [&](long begin, long end, long) {
        for (long u = begin; u < end; ++u) {
            const long b = u / H, c = u % H;
            long i1 = (b * 2 * H + c) * HW, i2 = i1 + H * HW;  // the half through gelu, the other
            if (swap)
                std::swap(i1, i2);
            gate_backward(dy + (b * H + c) * HW, x + i1, x + i2, dx + i1, dx + i2, HW);
        }
    });
}

CUSTOM_OP_REG(MegfbGatedGeluBackward)
        .set_description("gelu(x1) * x2 over the channel halves of x, backward (megfb)")
        .add_input("dy")
        .add_input("x")
        .add_output("dx")
        .add_param("swap", 0)
        .add_param("threads", 1)
        .set_device_infer(megfb::device_as_first)
        .set_shape_infer(bwd_shape_infer)
        .set_dtype_infer(megfb::dtype_as_first)
        .set_format_infer(megfb::format_as_first)
        .set_compute(bwd_compute);

// GELU alone: y = x Phi(x), dx = dy (Phi(x) + x pdf(x)), over the whole tensor in chunks
constexpr long CHUNK = 4096;

void gelu_forward(const float* __restrict x, float* __restrict y, long n) {
    for (long p = 0; p < n; ++p)
        y[p] = x[p] * phi(x[p]);
}

void gelu_backward(const float* __restrict g, const float* __restrict x, float* __restrict dx, long n) {
    for (long p = 0; p < n; ++p) {
        const float v = x[p];
        dx[p] = g[p] * (phi(v) + v * exp_f(-0.5f * v * v) * INV_SQRT_2PI);
    }
}

long numel(const Tensor& t) {
    const Shape s = t.shape();
    long n = 1;
    for (size_t i = 0; i < s.ndim(); ++i)
        n *= static_cast<long>(s[i]);
    return n;
}

void same_shape_infer(const std::vector<Shape>& inputs, const Param&, std::vector<Shape>& outputs) {
    outputs[0] = inputs[0];
}

// input: x, any shape and strides; output: y
void gelu_fwd_compute(const std::vector<Tensor>& inputs, const Param& params, std::vector<Tensor>& outputs) {
    const long n = numel(inputs[0]);
    std::vector<float> bx;
    const float* x = dense(inputs[0], bx);
    float* y = outputs[0].data<float>();
    megfb::parallel_for((n + CHUNK - 1) / CHUNK, params["threads"].as<int32_t>(), [&](long begin, long end, long) {
        for (long u = begin; u < end; ++u)
            gelu_forward(x + u * CHUNK, y + u * CHUNK, std::min(CHUNK, n - u * CHUNK));
    });
}

// inputs: dy, x (the same shape), any strides; output: dx
void gelu_bwd_compute(const std::vector<Tensor>& inputs, const Param& params, std::vector<Tensor>& outputs) {
    const long n = numel(inputs[1]);
    std::vector<float> bdy, bx;
    const float* dy = dense(inputs[0], bdy);
    const float* x = dense(inputs[1], bx);
    float* dx = outputs[0].data<float>();
    megfb::parallel_for((n + CHUNK - 1) / CHUNK, params["threads"].as<int32_t>(), [&](long begin, long end, long) {
        for (long u = begin; u < end; ++u)
            gelu_backward(dy + u * CHUNK, x + u * CHUNK, dx + u * CHUNK, std::min(CHUNK, n - u * CHUNK));
    });
}

CUSTOM_OP_REG(MegfbGeluForward)
        .set_description("gelu(x), forward (megfb)")
        .add_input("x")
        .add_output("y")
        .add_param("threads", 1)
        .set_device_infer(megfb::device_as_first)
        .set_shape_infer(same_shape_infer)
        .set_dtype_infer(megfb::dtype_as_first)
        .set_format_infer(megfb::format_as_first)
        .set_compute(gelu_fwd_compute);

CUSTOM_OP_REG(MegfbGeluBackward)
        .set_description("gelu(x), backward (megfb)")
        .add_input("dy")
        .add_input("x")
        .add_output("dx")
        .add_param("threads", 1)
        .set_device_infer(megfb::device_as_first)
        .set_shape_infer(same_shape_infer)
        .set_dtype_infer(megfb::dtype_as_first)
        .set_format_infer(megfb::format_as_first)
        .set_compute(gelu_bwd_compute);

CUSTOM_OP_REG_END(MegfbGatedGelu)
