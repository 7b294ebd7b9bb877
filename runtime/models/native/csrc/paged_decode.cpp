// Decode attention over the paged KV cache on the CPU: one query token per row, every query head of a KV head's
// group against that row's cached keys and values, read in place through the block table (no gather), with an
// online softmax in float32 over chunks of 16 positions. Built by runtime/models/native/cpu_attention.py with g++
// (GCC vector extensions: AVX-512 or AVX2, whichever -march=native finds) and called through ctypes.
//
// Layouts (row-major, contiguous): q, out [rows, heads, dim]; cache [2, num_blocks, block_size, kv_heads, dim]
// (keys, then values); tables [rows, table_width] int32 block ids; lens [rows] int32 context lengths (the newest
// key included). window > 0: attend to the last `window` positions only. block_size is a multiple of 16 and
// dim one that `supported_dim` accepts.
#include <type_traits>
#include <vector>

#include "vec.h"

namespace {

using namespace tgis;

inline void widen_row(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
inline void widen_row(const uint16_t* src, float* dst, int64_t n) {
    for (int64_t i = 0; i < n; i += L) {
        const vf x = load(src + i);
        std::memcpy(dst + i, &x, sizeof x);
    }
}

// bfloat16 caches through AVX512-BF16 dot products (pairs of products summed in float32) where the CPU has them and
// a head is whole 32-element vectors: keys scored in place; values of consecutive positions paired (an unpack of
// two rows), weighted by the softmax weights rounded to bfloat16 (as torch's CPU attention rounds them for its p·v).
template <typename T, int C>
constexpr bool BF16_DOT =
#if defined(__AVX512BF16__)
    std::is_same_v<T, uint16_t> && C % 2 == 0;
#else
    false;
#endif

// One row at a time, chunk by chunk in table order, every KV head of a chunk in turn: a chunk's keys (and values)
// for all KV heads are one contiguous run of the block, so the cache streams from DRAM (and the run two chunks on is
// prefetched; per (row, KV head), with each head's rows 384 bytes apart, a 16-row step took 3.5x its L3-resident
// time). For each KV head the chunk's values (paired, or widened to float32) and, without BF16_DOT, keys (widened)
// are laid out once in L1-resident buffers, then every query head of the group scores the chunk (its query and
// accumulator in registers: C is a compile-time count of 16-float vectors per head) and folds it into its online
// softmax.
// The dim that lane i of accumulator c holds: c * 16 + i, but for BF16_DOT's pairs, where an unpack of two rows
// interleaves 4 dims of each 128-bit quarter: accumulator c covers 32-dim segment c / 2, its low (even c) or high
// (odd c) 4 dims of every 8.
template <typename T, int C>
constexpr int dim_of(int c, int i) {
    return BF16_DOT<T, C> ? c / 2 * 2 * L + i / 4 * 8 + c % 2 * 4 + i % 4 : c * L + i;
}

template <typename T, int C>
void decode(T* out, const T* q, const T* cache, const int32_t* tables, const int32_t* lens, int64_t rows,
            int64_t heads, int64_t kv_heads, int64_t num_blocks, int64_t block_size, int64_t table_width,
            float scale, int64_t window, int threads) {
    constexpr int64_t D = C * L;
    constexpr int64_t AHEAD = 2;  // chunks of keys and values prefetched ahead of the one scored
    const int64_t group = heads / kv_heads;
    const int64_t token_stride = kv_heads * D;
    const int64_t block_stride = block_size * token_stride;
    const vf lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
#pragma omp parallel for schedule(dynamic) num_threads(threads) if (threads > 1)
    for (int64_t r = 0; r < rows; ++r) {
        alignas(64) float kbuf[BF16_DOT<T, C> ? 1 : L * D], vbuf[BF16_DOT<T, C> ? 1 : L * D];
#if defined(__AVX512BF16__)
        // BF16_DOT: vpair[c * L / 2 + j] pairs positions 2j, 2j + 1 over the dims of accumulator c (`dim_of`)
        alignas(64) __m512i vpair[BF16_DOT<T, C> ? C * L / 2 : 1];
#endif
        std::vector<vf> qv(heads * C), acc(heads * C, vf{});  // query head hg = h * group + g
        std::vector<float> top(heads, NEG), total(heads, 0.0f);
        if (!BF16_DOT<T, C>)  // that path reads the queries as they are and scales the scores
            for (int64_t hg = 0; hg < heads; ++hg)
                for (int c = 0; c < C; ++c) qv[hg * C + c] = load(q + (r * heads + hg) * D + c * L) * scale;
        const int32_t* table = tables + r * table_width;
        const int64_t len = lens[r];
        const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
        for (int64_t p0 = first / L * L; p0 < len; p0 += L) {
            const int64_t t0 = std::max<int64_t>(first - p0, 0), t1 = std::min<int64_t>(len - p0, L);
            // block_size is a multiple of L: the chunk lies in one block, its keys (and values) for every KV head
            // one contiguous run, read from DRAM: the run AHEAD chunks on is prefetched
            const T* chunk = cache + table[p0 / block_size] * block_stride + p0 % block_size * token_stride;
            if (p0 + AHEAD * L < len) {
                const int64_t p = p0 + AHEAD * L;
                const char* next = reinterpret_cast<const char*>(cache + table[p / block_size] * block_stride +
                                                                 p % block_size * token_stride);
                for (int64_t line = 0; line < L * token_stride * int64_t(sizeof(T)); line += 64) {
                    __builtin_prefetch(next + line);
                    __builtin_prefetch(next + num_blocks * block_stride * sizeof(T) + line);
                }
            }
            for (int64_t h = 0; h < kv_heads; ++h) {
                const T* keys = chunk + h * D;
                const T* values = keys + num_blocks * block_stride;
                for (int64_t t = 0; t < L; ++t) {
                    const bool inside = t >= t0 && t < t1;  // outside the context (or window): masked
                    if (!BF16_DOT<T, C>) {
                        if (inside)
                            widen_row(keys + t * token_stride, kbuf + t * D, D);
                        else
                            std::memset(kbuf + t * D, 0, D * sizeof(float));
                    }
                    if (!BF16_DOT<T, C> && inside) widen_row(values + t * token_stride, vbuf + t * D, D);
                }
#if defined(__AVX512BF16__)
                if constexpr (BF16_DOT<T, C>) {
                    static const T zeros[D] = {};  // a masked position's value: its weight is 0, its value finite
                    for (int64_t j = 0; j < L / 2; ++j) {
                        const T* v0 = 2 * j >= t0 && 2 * j < t1 ? values + 2 * j * token_stride : zeros;
                        const T* v1 = 2 * j + 1 >= t0 && 2 * j + 1 < t1 ? values + (2 * j + 1) * token_stride : zeros;
                        for (int c = 0; c < C / 2; ++c) {
                            const __m512i x = _mm512_loadu_si512(v0 + 2 * c * L), y = _mm512_loadu_si512(v1 + 2 * c * L);
                            vpair[2 * c * L / 2 + j] = _mm512_unpacklo_epi16(x, y);
                            vpair[(2 * c + 1) * L / 2 + j] = _mm512_unpackhi_epi16(x, y);
                        }
                    }
                }
#endif
                const vf outside = (lane < float(t0)) | (lane >= float(t1)) ? vf{} + 1.0f : vf{};
                for (int64_t g = 0; g < group; ++g) {
                    const int64_t hg = h * group + g;
                    vf qg[C], a[C];
                    for (int c = 0; c < C; ++c) qg[c] = qv[hg * C + c];
                    vf dots[L];
                    vf s;
                    if constexpr (BF16_DOT<T, C>) {
#if defined(__AVX512BF16__)
                        const T* qg16 = q + (r * heads + hg) * D;
                        for (int64_t t = 0; t < L; ++t) {
                            __m512 d = _mm512_setzero_ps();
                            for (int c = 0; c < C / 2; ++c)
                                d = _mm512_dpbf16_ps(d, (__m512bh)_mm512_loadu_si512(qg16 + 2 * c * L),
                                                     (__m512bh)_mm512_loadu_si512(keys + t * token_stride + 2 * c * L));
                            std::memcpy(&dots[t], &d, sizeof d);
                        }
                        s = sums(dots) * scale;
#endif
                    } else {
                        for (int64_t t = 0; t < L; ++t) {
                            dots[t] = qg[0] * load(kbuf + t * D);
                            for (int c = 1; c < C; ++c) dots[t] += qg[c] * load(kbuf + t * D + c * L);
                        }
                        s = sums(dots);
                    }
                    s = outside > 0.0f ? vf{} + NEG : s;
                    const float m = std::max(top[hg], max(s));
                    const float rescale = std::exp(top[hg] - m);
                    top[hg] = m;
                    const vf e = exp_neg(s - m);
                    total[hg] = total[hg] * rescale + sum(e);
                    for (int c = 0; c < C; ++c) a[c] = acc[hg * C + c] * rescale;
                    if constexpr (BF16_DOT<T, C>) {
#if defined(__AVX512BF16__)
                        alignas(32) uint32_t pairs[L / 2];  // the weights of positions 2j, 2j + 1 in bfloat16
                        _mm256_store_si256((__m256i*)pairs, (__m256i)_mm512_cvtneps_pbh((__m512)e));
                        for (int64_t j = 0; j < L / 2; ++j)
                            for (int c = 0; c < C; ++c)
                                a[c] = (vf)_mm512_dpbf16_ps((__m512)a[c], (__m512bh)vpair[c * L / 2 + j],
                                                            (__m512bh)_mm512_set1_epi32(pairs[j]));
#endif
                    } else {
                        alignas(64) float weight[L];  // broadcast from memory: a lane of a register costs a shuffle
                        std::memcpy(weight, &e, sizeof e);
                        for (int64_t t = t0; t < t1; ++t)
                            for (int c = 0; c < C; ++c) a[c] += weight[t] * load(vbuf + t * D + c * L);
                    }
                    for (int c = 0; c < C; ++c) acc[hg * C + c] = a[c];
                }
            }
        }
        for (int64_t hg = 0; hg < heads; ++hg)
            for (int c = 0; c < C; ++c) {
                const vf o = acc[hg * C + c] / total[hg];
                for (int i = 0; i < L; ++i) narrow(o[i], out + (r * heads + hg) * D + dim_of<T, C>(c, i));
            }
    }
}

template <typename T>
void dispatch(T* out, const T* q, const T* cache, const int32_t* tables, const int32_t* lens, int64_t rows,
              int64_t heads, int64_t kv_heads, int64_t dim, int64_t num_blocks, int64_t block_size,
              int64_t table_width, float scale, int64_t window, int threads) {
#define TGIS_DECODE(C)                                                                                        \
    case C:                                                                                                  \
        return decode<T, C>(out, q, cache, tables, lens, rows, heads, kv_heads, num_blocks, block_size,     \
                            table_width, scale, window, threads);
    switch (dim / L) { TGIS_HEAD_VECTORS(TGIS_DECODE) }
#undef TGIS_DECODE
}

}  // namespace

extern "C" {
int supported_dim(int64_t dim) {
    if (dim % L) return 0;
#define TGIS_SUPPORTED(C) \
    if (dim / L == C) return 1;
    TGIS_HEAD_VECTORS(TGIS_SUPPORTED)
#undef TGIS_SUPPORTED
    return 0;
}

void decode_f32(float* out, const float* q, const float* cache, const int32_t* tables, const int32_t* lens,
                int64_t rows, int64_t heads, int64_t kv_heads, int64_t dim, int64_t num_blocks, int64_t block_size,
                int64_t table_width, float scale, int64_t window, int threads) {
    dispatch(out, q, cache, tables, lens, rows, heads, kv_heads, dim, num_blocks, block_size, table_width, scale,
             window, threads);
}

void decode_bf16(uint16_t* out, const uint16_t* q, const uint16_t* cache, const int32_t* tables,
                 const int32_t* lens, int64_t rows, int64_t heads, int64_t kv_heads, int64_t dim, int64_t num_blocks,
                 int64_t block_size, int64_t table_width, float scale, int64_t window, int threads) {
    dispatch(out, q, cache, tables, lens, rows, heads, kv_heads, dim, num_blocks, block_size, table_width, scale,
             window, threads);
}
}
