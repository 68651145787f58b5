// megfb custom operators' vectors: one register of floats as a GCC vector, as wide as the CPU
// the library is built for (-march=native: 16 lanes with AVX-512, 8 with AVX2, else 4), with
// unaligned loads and stores and a fused multiply-add where the CPU has one.
#pragma once
#include <cstring>
#if defined(__AVX512F__) || defined(__FMA__)
#include <immintrin.h>
#endif

namespace megfb {

#if defined(__AVX512F__)
constexpr int VL = 16;
#elif defined(__AVX__)
constexpr int VL = 8;
#else
constexpr int VL = 4;
#endif

typedef float vf __attribute__((vector_size(VL * sizeof(float))));

inline vf loadu(const float* p) {
    vf v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

inline void storeu(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

inline vf splat(float s) { return vf{} + s; }

// a * b + c, rounded once where the CPU has FMA (ISO C++ mode does not contract a * b + c)
inline vf fmadd(vf a, vf b, vf c) {
#if defined(__AVX512F__)
    return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__)
    return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
    return a * b + c;
#endif
}

inline float hsum(vf v) {
    float lanes[VL];
    std::memcpy(lanes, &v, sizeof v);
    float s = 0.f;
    for (int l = 0; l < VL; ++l)
        s += lanes[l];
    return s;
}

}  // namespace megfb
