// megfb custom CPU operators: LayerNorm over the channel axis of a (B, C, H, W) map, forward and
// backward, for training (megfb/ops.py _ChannelNorm; eps 1e-5, population variance).
//
//   forward:  xhat = (x - mean_c x) * rstd, rstd = 1 / sqrt(var_c x + 1e-5), y = w * xhat + b
//   backward: g = dy * w; dx = (g - mean_c g - xhat * mean_c(g * xhat)) * rstd,
//             dw = sum_{b,h,w} dy * xhat, db = sum_{b,h,w} dy
//
// MegEngine runs each as ~10 elementwise and reduction passes over the map; here the pixels are
// taken in tiles of 64, whose C channel values stay in the L1 cache while every statistic is
// summed, so the map is read about once per op. Built and loaded by megfb/native.py;
// tests/test_native.py checks both against the MegEngine definition.
#include <algorithm>
#include <cmath>
#include <vector>

#include "megbrain/custom/custom.h"
#include "dense.h"

CUSTOM_OP_REG_BEGIN(MegfbChannelNorm)

constexpr long TILE = 64;

using megfb::dense;

void fwd_shape_infer(const std::vector<Shape>& inputs, const Param&, std::vector<Shape>& outputs) {
    outputs[0] = inputs[0];
    outputs[1] = inputs[0];
    outputs[2] = Shape({inputs[0][0], 1, inputs[0][2], inputs[0][3]});
}

// inputs: x (B, C, H, W), weight (C), bias (C), any strides; outputs: y, xhat, rstd (B, 1, H, W)
void fwd_compute(const std::vector<Tensor>& inputs, const Param& params, std::vector<Tensor>& outputs) {
    const Shape s = inputs[0].shape();
    const long B = s[0], C = s[1], HW = s[2] * s[3];
    std::vector<float> bx, bw, bb;
    const float* x = dense(inputs[0], bx);
    const float* w = dense(inputs[1], bw);
    const float* bias = dense(inputs[2], bb);
    float* y = outputs[0].data<float>();
    float* xhat = outputs[1].data<float>();
    float* rstd = outputs[2].data<float>();
    const float inv_c = 1.f / static_cast<float>(C);
    const long tiles = (HW + TILE - 1) / TILE;
    megfb::parallel_for(B * tiles, params["threads"].as<int32_t>(), [&](long begin, long end, long) {
        float mean[TILE], var[TILE], r[TILE];
        for (long u = begin; u < end; ++u) {
            const long b = u / tiles, p0 = (u % tiles) * TILE;
            const float* xb = x + b * C * HW;
            float *yb = y + b * C * HW, *hb = xhat + b * C * HW;
            const long n = std::min(TILE, HW - p0);
            std::fill(mean, mean + n, 0.f);
            std::fill(var, var + n, 0.f);
            for (long c = 0; c < C; ++c) {
                const float* xc = xb + c * HW + p0;
                for (long p = 0; p < n; ++p)
                    mean[p] += xc[p];
            }
            for (long p = 0; p < n; ++p)
                mean[p] *= inv_c;
            for (long c = 0; c < C; ++c) {
                const float* xc = xb + c * HW + p0;
                for (long p = 0; p < n; ++p) {
                    const float d = xc[p] - mean[p];
                    var[p] += d * d;
                }
            }
            for (long p = 0; p < n; ++p)
                r[p] = 1.f / std::sqrt(var[p] * inv_c + 1e-5f);
            std::copy(r, r + n, rstd + b * HW + p0);
            for (long c = 0; c < C; ++c) {
                const float* xc = xb + c * HW + p0;
                float *yc = yb + c * HW + p0, *hc = hb + c * HW + p0;
                const float wc = w[c], bc = bias[c];
                for (long p = 0; p < n; ++p) {
                    const float h = (xc[p] - mean[p]) * r[p];
                    hc[p] = h;
                    yc[p] = h * wc + bc;
                }
            }
        }
    });
}

CUSTOM_OP_REG(MegfbChannelNormForward)
        .set_description("LayerNorm over channels, forward (megfb)")
        .add_input("x")
        .add_input("weight")
        .add_input("bias")
        .add_output("y")
        .add_output("xhat")
        .add_output("rstd")
        .add_param("threads", 1)
        .set_device_infer(megfb::device_as_first)
        .set_shape_infer(fwd_shape_infer)
        .set_dtype_infer(megfb::dtype_as_first)
        .set_format_infer(megfb::format_as_first)
        .set_compute(fwd_compute);

void bwd_shape_infer(const std::vector<Shape>& inputs, const Param&, std::vector<Shape>& outputs) {
    outputs[0] = inputs[0];
    outputs[1] = Shape({inputs[0][1]});
    outputs[2] = Shape({inputs[0][1]});
}

// inputs: dy, xhat (B, C, H, W), rstd (B, 1, H, W), weight (C); outputs: dx, dweight (C), dbias (C)
void bwd_compute(const std::vector<Tensor>& inputs, const Param& params, std::vector<Tensor>& outputs) {
    const Shape s = inputs[0].shape();
    const long B = s[0], C = s[1], HW = s[2] * s[3];
    std::vector<float> bdy, bh, br, bw;
    const float* dy = dense(inputs[0], bdy);
    const float* xhat = dense(inputs[1], bh);
    const float* rstd = dense(inputs[2], br);
    const float* w = dense(inputs[3], bw);
    float* dx = outputs[0].data<float>();
    float* dw = outputs[1].data<float>();
    float* db = outputs[2].data<float>();
    const float inv_c = 1.f / static_cast<float>(C);
    const long tiles = (HW + TILE - 1) / TILE;
    const long threads = std::max(1L, std::min<long>(params["threads"].as<int32_t>(), B * tiles));
    // each part sums dweight and dbias over its tiles; the parts are added in order after
    std::vector<double> dw_acc(threads * C, 0.0), db_acc(threads * C, 0.0);
    megfb::parallel_for(B * tiles, threads, [&](long begin, long end, long part) {
        float mg[TILE], mgx[TILE];
        double *dwa = dw_acc.data() + part * C, *dba = db_acc.data() + part * C;
        for (long u = begin; u < end; ++u) {
            const long b = u / tiles, p0 = (u % tiles) * TILE;
            const long off = b * C * HW;
            const long n = std::min(TILE, HW - p0);
            std::fill(mg, mg + n, 0.f);
            std::fill(mgx, mgx + n, 0.f);
            for (long c = 0; c < C; ++c) {
                const float* dyc = dy + off + c * HW + p0;
                const float* hc = xhat + off + c * HW + p0;
                const float wc = w[c];
                float sdw = 0.f, sdb = 0.f;
                for (long p = 0; p < n; ++p) {
                    const float g = dyc[p] * wc;
                    mg[p] += g;
                    mgx[p] += g * hc[p];
                    sdw += dyc[p] * hc[p];
                    sdb += dyc[p];
                }
                dwa[c] += sdw;
                dba[c] += sdb;
            }
            const float* r = rstd + b * HW + p0;
            for (long c = 0; c < C; ++c) {
                const float* dyc = dy + off + c * HW + p0;
                const float* hc = xhat + off + c * HW + p0;
                float* dxc = dx + off + c * HW + p0;
                const float wc = w[c];
                for (long p = 0; p < n; ++p)
                    dxc[p] = (dyc[p] * wc - mg[p] * inv_c - hc[p] * (mgx[p] * inv_c)) * r[p];
            }
        }
    });
    for (long c = 0; c < C; ++c) {
        double sw = 0.0, sb = 0.0;
        for (long t = 0; t < threads; ++t) {
            sw += dw_acc[t * C + c];
            sb += db_acc[t * C + c];
        }
        dw[c] = static_cast<float>(sw);
        db[c] = static_cast<float>(sb);
    }
}

CUSTOM_OP_REG(MegfbChannelNormBackward)
        .set_description("LayerNorm over channels, backward (megfb)")
        .add_input("dy")
        .add_input("xhat")
        .add_input("rstd")
        .add_input("weight")
        .add_output("dx")
        .add_output("dweight")
        .add_output("dbias")
        .add_param("threads", 1)
        .set_device_infer(megfb::device_as_first)
        .set_shape_infer(bwd_shape_infer)
        .set_dtype_infer(megfb::dtype_as_first)
        .set_format_infer(megfb::format_as_first)
        .set_compute(bwd_compute);

CUSTOM_OP_REG_END(MegfbChannelNorm)
