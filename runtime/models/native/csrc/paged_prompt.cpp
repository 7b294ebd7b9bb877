// Prompt attention over the paged KV cache on the CPU: each prompt chunk's queries (every query head of a KV head's
// group) against its sequence's cached keys up to their own positions, causal blocks skipped, online softmax in
// float32 over blocks of 64 keys. Built with paged_decode.cpp into one library by cpu_attention.py.
//
// Per (prompt, KV head) the context's keys and values are first copied out of the paged cache into layouts made for
// 16-lane dot products over 32-bit *units* (a pair of bfloat16 elements, or one float32): keys transposed (lanes =
// keys, so q·k needs no horizontal sums), values with consecutive keys paired (lanes = dims, so p·v for bfloat16 is
// one AVX512-BF16 dot product per key pair). Unwritten slots past the context are zeros there. Then tiles of 8
// query rows share every key and value load.
//
// Layouts: q, out [tokens, heads, dim]; cache [2, num_blocks, block_size, kv_heads, dim]; for each of `prompts`
// rows: its block table row (tables, table_width wide), its first token in q (query_start[p]; the row's tokens are
// query_start[p] .. query_start[p + 1]), its context length once they are in (lens[p]). window > 0: a query sees
// its last `window` positions only.
#include <vector>

#include "vec.h"

namespace {

using namespace tgis;

template <typename V>
struct Units {  // 16 units into a vector of V's lane type, bits unchanged
    using Vec = V;
    static V load(const uint32_t* p) {
        V x;
        std::memcpy(&x, p, sizeof x);
        return x;
    }
};

template <typename T>
struct Unit;

template <>
struct Unit<float> : Units<vf> {
    static constexpr int per = 1;  // elements per 32-bit unit
    static vf madd(vf acc, Vec a, uint32_t b) {
        float x;
        std::memcpy(&x, &b, sizeof x);
        return acc + a * x;
    }
};

template <>
struct Unit<uint16_t> : Units<vi> {  // bfloat16
    static constexpr int per = 2;
    // acc[i] += a[2i] b[0] + a[2i+1] b[1] (a unit: low half the even element)
    static vf madd(vf acc, Vec a, uint32_t b) {
#if defined(__AVX512BF16__)
        return (vf)_mm512_dpbf16_ps((__m512)acc, (__m512bh)(__m512i)a, (__m512bh)_mm512_set1_epi32(b));
#else
        float b0, b1;
        const uint32_t lo = b << 16, hi = b & 0xffff0000u;
        std::memcpy(&b0, &lo, sizeof b0);
        std::memcpy(&b1, &hi, sizeof b1);
        const vi even = a << 16, odd = a & int32_t(0xffff0000u);
        vf e, o;
        std::memcpy(&e, &even, sizeof e);
        std::memcpy(&o, &odd, sizeof o);
        return acc + e * b0 + o * b1;
#endif
    }
};

inline uint32_t unit_of(const float* e) {
    uint32_t u;
    std::memcpy(&u, e, sizeof u);
    return u;
}
inline uint32_t unit_of(const uint16_t* e) { return uint32_t(e[0]) | uint32_t(e[1]) << 16; }

template <typename T, int C>
void prompt(T* out, const T* q, const T* cache, const int32_t* tables, const int32_t* query_start,
            const int32_t* lens, int64_t prompts, int64_t heads, int64_t kv_heads, int64_t num_blocks,
            int64_t block_size, int64_t table_width, float scale, int64_t window, int threads) {
    constexpr int D = C * L, P = Unit<T>::per;
    constexpr int U = D / P;         // units per key (q·k)
    constexpr int KB = 64;           // keys per softmax update
    constexpr int KU = KB / P;       // units of keys per block (p·v)
    constexpr int R = 8;             // query rows per tile
    const int64_t group = heads / kv_heads;
    const int64_t token_stride = kv_heads * D, block_stride = block_size * token_stride;
#pragma omp parallel for collapse(2) schedule(dynamic) num_threads(threads) if (threads > 1)
    for (int64_t p = 0; p < prompts; ++p) {
        for (int64_t h = 0; h < kv_heads; ++h) {
            const int64_t len = lens[p], n = query_start[p + 1] - query_start[p], first_pos = len - n;
            const int32_t* table = tables + p * table_width;
            const int64_t padded = (len + KB - 1) / KB * KB;
            // keys: unit u of key k at kt[((k / L) * U + u) * L + k % L]; values: element d of key k at
            // vt[((k / P) * D + d) * P + k % P] (elements of T)
            std::vector<uint32_t> kt(padded * U), vt(padded * D / P);
            T* kte = reinterpret_cast<T*>(kt.data());
            T* vte = reinterpret_cast<T*>(vt.data());
            for (int64_t k = 0; k < padded; ++k) {
                const T* key = k < len ? cache + table[k / block_size] * block_stride + k % block_size * token_stride
                                             + h * D
                                       : nullptr;
                for (int u = 0; u < U; ++u)
                    for (int e = 0; e < P; ++e) kte[(((k / L) * U + u) * L + k % L) * P + e] = key ? key[u * P + e] : T{};
                for (int d = 0; d < D; ++d)
                    vte[((k / P) * D + d) * P + k % P] = key ? key[num_blocks * block_stride + d] : T{};
            }
            const vi lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
            for (int64_t r0 = 0; r0 < n * group; r0 += R) {
                const int64_t rows = std::min<int64_t>(R, n * group - r0);
                alignas(64) uint32_t qu[R][U];
                alignas(64) float acc[R][D] = {};
                alignas(64) float s[R][KB];
                alignas(64) uint32_t eu[R][KU];
                int32_t pos[R], lo[R];
                float top[R], total[R], rescale[R];
                const T* qrow[R];
                T* orow[R];
                for (int i = 0; i < R; ++i) {  // rows past the tile's last repeat it (computed, not stored)
                    const int64_t row = r0 + std::min<int64_t>(i, rows - 1), t = row / group;
                    const int64_t offset = ((query_start[p] + t) * heads + h * group + row % group) * D;
                    qrow[i] = q + offset;
                    orow[i] = out + offset;
                    for (int u = 0; u < U; ++u) qu[i][u] = unit_of(qrow[i] + u * P);
                    pos[i] = int32_t(first_pos + t);
                    lo[i] = window > 0 ? std::max<int32_t>(0, pos[i] - int32_t(window) + 1) : 0;
                    top[i] = NEG;
                    total[i] = 0.0f;
                }
                const int64_t b_first = *std::min_element(lo, lo + R) / KB, b_last = *std::max_element(pos, pos + R) / KB;
                for (int64_t b = b_first; b <= b_last; ++b) {
                    for (int c = 0; c < KB / L; ++c) {  // scores of 16 keys for every row
                        vf a[R] = {};
                        const uint32_t* chunk = kt.data() + (b * (KB / L) + c) * U * L;
                        for (int u = 0; u < U; ++u) {
                            const auto k = Unit<T>::load(chunk + u * L);
                            for (int i = 0; i < R; ++i) a[i] = Unit<T>::madd(a[i], k, qu[i][u]);
                        }
                        for (int i = 0; i < R; ++i) {
                            const vi key = lane + int32_t(b * KB + c * L);
                            const vf x = (key >= lo[i]) & (key <= pos[i]) ? a[i] * scale : vf{} + NEG;
                            std::memcpy(&s[i][c * L], &x, sizeof x);
                        }
                    }
                    for (int i = 0; i < R; ++i) {  // online softmax over the block; weights as units
                        vf m = load(&s[i][0]);
                        for (int c = 1; c < KB / L; ++c) m = vmax(m, load(&s[i][c * L]));
                        const float top_new = std::max(top[i], max(m));
                        rescale[i] = std::exp(top[i] - top_new);
                        top[i] = top_new;
                        alignas(64) T w[KB];
                        vf sum_e = {};
                        for (int c = 0; c < KB / L; ++c) {
                            const vf x = load(&s[i][c * L]);
                            const vf e = x > NEG / 2 ? exp_neg(x - top_new) : vf{};  // a masked key weighs 0
                            sum_e += e;
                            narrow(e, w + c * L);
                        }
                        total[i] = total[i] * rescale[i] + sum(sum_e);
                        for (int j = 0; j < KU; ++j) eu[i][j] = unit_of(w + j * P);
                    }
                    for (int c = 0; c < C; ++c) {  // p·v, 16 dims at a time for every row
                        vf a[R];
                        for (int i = 0; i < R; ++i) a[i] = load(&acc[i][c * L]) * rescale[i];
                        const uint32_t* values = vt.data() + b * KU * D + c * L;
                        for (int j = 0; j < KU; ++j) {
                            const auto v = Unit<T>::load(values + j * D);
                            for (int i = 0; i < R; ++i) a[i] = Unit<T>::madd(a[i], v, eu[i][j]);
                        }
                        for (int i = 0; i < R; ++i) std::memcpy(&acc[i][c * L], &a[i], sizeof a[i]);
                    }
                }
                for (int i = 0; i < rows; ++i)
                    for (int d = 0; d < D; ++d) narrow(acc[i][d] / total[i], orow[i] + d);
            }
        }
    }
}

template <typename T>
void dispatch(T* out, const T* q, const T* cache, const int32_t* tables, const int32_t* query_start,
              const int32_t* lens, int64_t prompts, int64_t heads, int64_t kv_heads, int64_t dim, int64_t num_blocks,
              int64_t block_size, int64_t table_width, float scale, int64_t window, int threads) {
#define TGIS_PROMPT(C)                                                                                          \
    case C:                                                                                                    \
        return prompt<T, C>(out, q, cache, tables, query_start, lens, prompts, heads, kv_heads, num_blocks,    \
                            block_size, table_width, scale, window, threads);
    switch (dim / L) { TGIS_HEAD_VECTORS(TGIS_PROMPT) }
#undef TGIS_PROMPT
}

}  // namespace

extern "C" {
void prompt_f32(float* out, const float* q, const float* cache, const int32_t* tables, const int32_t* query_start,
                const int32_t* lens, int64_t prompts, int64_t heads, int64_t kv_heads, int64_t dim,
                int64_t num_blocks, int64_t block_size, int64_t table_width, float scale, int64_t window,
                int threads) {
    dispatch(out, q, cache, tables, query_start, lens, prompts, heads, kv_heads, dim, num_blocks, block_size,
             table_width, scale, window, threads);
}

void prompt_bf16(uint16_t* out, const uint16_t* q, const uint16_t* cache, const int32_t* tables,
                 const int32_t* query_start, const int32_t* lens, int64_t prompts, int64_t heads, int64_t kv_heads,
                 int64_t dim, int64_t num_blocks, int64_t block_size, int64_t table_width, float scale,
                 int64_t window, int threads) {
    dispatch(out, q, cache, tables, query_start, lens, prompts, heads, kv_heads, dim, num_blocks, block_size,
             table_width, scale, window, threads);
}
}
