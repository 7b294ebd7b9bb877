// Vector helpers shared by the CPU attention kernels (paged_decode.cpp, paged_prompt.cpp): GCC vector extensions
// of 16 lanes, which -march=native maps to AVX-512 or pairs of AVX2 registers.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

// Head sizes with compiled kernels, in 16-float vectors per head: the one list every kernel's dispatch and
// `supported_dim` read.
#define TGIS_HEAD_VECTORS(X) X(1) X(2) X(4) X(5) X(6) X(8) X(16)

namespace tgis {
namespace {  // each kernel file keeps its own copies, compiled under its own options

constexpr int L = 16;  // lanes: positions per chunk, floats per vector
typedef float vf __attribute__((vector_size(4 * L)));
typedef int32_t vi __attribute__((vector_size(4 * L)));
typedef uint16_t vh __attribute__((vector_size(2 * L)));
constexpr float NEG = -1e30f;  // a masked score: finite, so that max and exp need no special cases

inline vf load(const float* p) {
    vf x;
    std::memcpy(&x, p, sizeof x);
    return x;
}
inline vf load(const uint16_t* p) {  // bfloat16 -> float32: the bits are the high half
    vh h;
    std::memcpy(&h, p, sizeof h);
    vi u = __builtin_convertvector(h, vi) << 16;
    vf x;
    std::memcpy(&x, &u, sizeof x);
    return x;
}

inline void narrow(float x, float* p) { *p = x; }
inline void narrow(float x, uint16_t* p) {  // float32 -> bfloat16, round to nearest even (torch's rounding)
    uint32_t u;
    std::memcpy(&u, &x, sizeof u);
    *p = std::isnan(x) ? 0x7fc0 : static_cast<uint16_t>((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

inline void narrow(vf x, float* p) { std::memcpy(p, &x, sizeof x); }
inline void narrow(vf x, uint16_t* p) {  // lane-wise `narrow`
    typedef uint32_t vu __attribute__((vector_size(4 * L)));
    vu u;
    std::memcpy(&u, &x, sizeof u);
    u = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    u = x != x ? vu{} + 0x7fc0u : u;
    const vh b = __builtin_convertvector(u, vh);
    std::memcpy(p, &b, sizeof b);
}

inline float widen(float x) { return x; }
inline float widen(uint16_t x) {
    const uint32_t u = uint32_t(x) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

// x rounded to T and back: the value torch holds after each operator on T (the pointer only picks T)
inline float rounded(float x, const float*) { return x; }
inline float rounded(float x, const uint16_t*) {
    uint16_t h;
    narrow(x, &h);
    return widen(h);
}
inline vf rounded(vf x, const float*) { return x; }
inline vf rounded(vf x, const uint16_t*) {
    uint16_t h[L];
    narrow(x, h);
    return load(h);
}

// Horizontal reductions as trees of shuffles (a lane-by-lane loop is a chain of 16 dependent scalar operations).
inline float sum(vf x) {
    x += __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    x += __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3);
    x += __builtin_shufflevector(x, x, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1);
    return x[0] + x[1];
}

inline vf vmax(vf a, vf b) { return a > b ? a : b; }

inline float max(vf x) {
    x = vmax(x, __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
    x = vmax(x, __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3));
    x = vmax(x, __builtin_shufflevector(x, x, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1));
    return std::max(x[0], x[1]);
}

// The 16 horizontal sums of s[0..15] as one vector (lane t: the sum of s[t]'s lanes): four levels of pairwise
// shuffles and adds, 45 operations instead of 16 separate trees.
inline vf sums(const vf* s) {
    vf a[8], b[4], c[2];
    for (int i = 0; i < 8; ++i)
        a[i] = __builtin_shufflevector(s[2 * i], s[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
               __builtin_shufflevector(s[2 * i], s[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30,
                                       31);
    for (int i = 0; i < 4; ++i)
        b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
               __builtin_shufflevector(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30,
                                       31);
    for (int i = 0; i < 2; ++i)
        c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
               __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30,
                                       31);
    return __builtin_shufflevector(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
           __builtin_shufflevector(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// e^x for x <= 0, lane-wise (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, degree-5 polynomial; relative error
// ~2e-7); below -87 the result is 0.
inline vf exp_neg(vf x) {
    const vf low = x < -87.0f ? vf{} + 1.0f : vf{};
    x = low > 0.0f ? vf{} - 87.0f : x;
    vf n = x * 1.44269504088896341f + 0.5f;
    vi ni = __builtin_convertvector(n, vi);
    ni = ni - (__builtin_convertvector(ni, vf) > n ? 1 : 0);  // floor
    vf fn = __builtin_convertvector(ni, vf);
    vf r = x - fn * 0.693359375f + fn * 2.12194440e-4f;
    vf p = vf{} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    vi bits = (ni + 127) << 23;
    vf scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return low > 0.0f ? vf{} : p * scale;
}

}  // namespace
}  // namespace tgis
