// megfb custom CPU operators: the polyphase split of a (B, C, H, W) map and its inverse, for
// training (megfb/ops.py space_to_phases / phases_to_space; H and W divisible by d).
//
//   space_to_phases: out[b, c, (i d + j) H/d + y, x] = in[b, c, y d + i, x d + j]
//   phases_to_space: the inverse; each is the other's gradient
//
// MegEngine computes them as the relayout of a 6-d transpose, a strided copy several times
// slower than a plain one; here each (b, c) plane is one pass of row copies. Built and loaded
// by megfb/native.py; tests/test_native.py checks both against MegEngine's relayout.
#include <vector>

#include "megbrain/custom/custom.h"
#include "dense.h"

CUSTOM_OP_REG_BEGIN(MegfbPhases)

using megfb::dense;

// split: in (B, C, H, W) -> out (B, C, d H, W / d); merge: the reverse
void split_shape_infer(const std::vector<Shape>& inputs, const Param& params, std::vector<Shape>& outputs) {
    const size_t d = static_cast<size_t>(params["d"].as<int32_t>());
    const Shape s = inputs[0];
    outputs[0] = Shape({s[0], s[1], s[2] * d, s[3] / d});
}

void merge_shape_infer(const std::vector<Shape>& inputs, const Param& params, std::vector<Shape>& outputs) {
    const size_t d = static_cast<size_t>(params["d"].as<int32_t>());
    const Shape s = inputs[0];
    outputs[0] = Shape({s[0], s[1], s[2] / d, s[3] * d});
}

// one plane: space (H x W) <-> phases (d*d planes of H/d x W/d, stacked along the rows)
template <bool SPLIT>
void plane(const float* __restrict src, float* __restrict dst, long H, long W, long d) {
    const long h = H / d, w = W / d;
    for (long i = 0; i < d; ++i)
        for (long y = 0; y < h; ++y) {
            const long row = y * d + i;  // the space row
            for (long j = 0; j < d; ++j) {
                const long phase_row = ((i * d + j) * h + y) * w;
                if (SPLIT)
                    for (long x = 0; x < w; ++x)
                        dst[phase_row + x] = src[row * W + x * d + j];
                else
                    for (long x = 0; x < w; ++x)
                        dst[row * W + x * d + j] = src[phase_row + x];
            }
        }
}

template <bool SPLIT>
void compute(const std::vector<Tensor>& inputs, const Param& params, std::vector<Tensor>& outputs) {
    const long d = params["d"].as<int32_t>();
    const Shape s = inputs[0].shape();
    const long planes = static_cast<long>(s[0] * s[1]);
    const long H = SPLIT ? s[2] : s[2] / d, W = SPLIT ? s[3] : s[3] * d;
    std::vector<float> buf;
    const float* src = dense(inputs[0], buf);
    float* dst = outputs[0].data<float>();
    megfb::parallel_for(planes, params["threads"].as<int32_t>(), [&](long begin, long end, long) {
        for (long p = begin; p < end; ++p)
            plane<SPLIT>(src + p * H * W, dst + p * H * W, H, W, d);
    });
}

CUSTOM_OP_REG(MegfbSpaceToPhases)
        .set_description("polyphase split of a map, sub-images stacked along the rows (megfb)")
        .add_input("x")
        .add_output("y")
        .add_param("d", 2)
        .add_param("threads", 1)
        .set_device_infer(megfb::device_as_first)
        .set_shape_infer(split_shape_infer)
        .set_dtype_infer(megfb::dtype_as_first)
        .set_format_infer(megfb::format_as_first)
        .set_compute(compute<true>);

CUSTOM_OP_REG(MegfbPhasesToSpace)
        .set_description("inverse of MegfbSpaceToPhases (megfb)")
        .add_input("x")
        .add_output("y")
        .add_param("d", 2)
        .add_param("threads", 1)
        .set_device_infer(megfb::device_as_first)
        .set_shape_infer(merge_shape_infer)
        .set_dtype_infer(megfb::dtype_as_first)
        .set_format_infer(megfb::format_as_first)
        .set_compute(compute<false>);

CUSTOM_OP_REG_END(MegfbPhases)
