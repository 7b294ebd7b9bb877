// Rotary position embedding of a step's queries and keys, and the cache write of its keys and values, in one pass on
// the CPU: in torch these are ~25 small operators per layer (multiplies, a rotate-half concatenation, two indexed
// copies), whose dispatch cost more than their arithmetic at decode batch sizes. Each element is computed as
// transformers computes it, rounded to T after every operation: x·cos, rotate_half(x)·sin, their sum.
//
// Layouts: q [tokens, heads, dim], k and v [tokens, kv_heads, dim] with any token stride (views of one fused
// projection's output) and heads packed; cos and sin [tokens, dim] with their own token stride; q_out [tokens, heads,
// dim] contiguous; cache [2, num_blocks, block_size, kv_heads, dim] (slot s = block · block_size + offset);
// slots [tokens] int64.
// Separate roundings, as torch's separate operators: no multiply-add contraction in this file (set before the
// shared helpers are included, so their copies here, private to this file, follow it too).
#pragma GCC optimize("fp-contract=off")

#include <cstdint>

#include "vec.h"

namespace {

using namespace tgis;

// out = x·cos + rotate_half(x)·sin, rotate_half(x) = [-x[half:], x[:half]]: 16 dims of each half at a time
template <typename T>
void rotate(T* out, const T* x, const T* cos, const T* sin, int64_t dim) {
    const int64_t half = dim / 2;
    int64_t d = 0;
    for (; d + L <= half; d += L) {
        const vf lo = load(x + d), hi = load(x + half + d);
        narrow(rounded(lo * load(cos + d), out) - rounded(hi * load(sin + d), out), out + d);
        narrow(rounded(hi * load(cos + half + d), out) + rounded(lo * load(sin + half + d), out), out + half + d);
    }
    for (; d < half; ++d) {
        const float lo = widen(x[d]), hi = widen(x[half + d]);
        narrow(rounded(lo * widen(cos[d]), out) - rounded(hi * widen(sin[d]), out), out + d);
        narrow(rounded(hi * widen(cos[half + d]), out) + rounded(lo * widen(sin[half + d]), out), out + half + d);
    }
}

template <typename T>
void rotary_cache(T* q_out, const T* q, const T* k, const T* v, const T* cos, const T* sin, T* cache,
                  const int64_t* slots, int64_t tokens, int64_t heads, int64_t kv_heads, int64_t dim,
                  int64_t q_stride, int64_t k_stride, int64_t v_stride, int64_t rope_stride, int64_t num_slots) {
    const int64_t token_size = kv_heads * dim;
    T* values = cache + num_slots * token_size;
    for (int64_t t = 0; t < tokens; ++t) {
        const T *c = cos + t * rope_stride, *s = sin + t * rope_stride;
        for (int64_t h = 0; h < heads; ++h) rotate(q_out + (t * heads + h) * dim, q + t * q_stride + h * dim, c, s, dim);
        T* key_slot = cache + slots[t] * token_size;
        for (int64_t h = 0; h < kv_heads; ++h) rotate(key_slot + h * dim, k + t * k_stride + h * dim, c, s, dim);
        std::memcpy(values + slots[t] * token_size, v + t * v_stride, token_size * sizeof(T));
    }
}

}  // namespace

extern "C" {
void rotary_cache_f32(float* q_out, const float* q, const float* k, const float* v, const float* cos,
                      const float* sin, float* cache, const int64_t* slots, int64_t tokens, int64_t heads,
                      int64_t kv_heads, int64_t dim, int64_t q_stride, int64_t k_stride, int64_t v_stride,
                      int64_t rope_stride, int64_t num_slots) {
    rotary_cache(q_out, q, k, v, cos, sin, cache, slots, tokens, heads, kv_heads, dim, q_stride, k_stride, v_stride,
                 rope_stride, num_slots);
}

void rotary_cache_bf16(uint16_t* q_out, const uint16_t* q, const uint16_t* k, const uint16_t* v,
                       const uint16_t* cos, const uint16_t* sin, uint16_t* cache, const int64_t* slots,
                       int64_t tokens, int64_t heads, int64_t kv_heads, int64_t dim, int64_t q_stride,
                       int64_t k_stride, int64_t v_stride, int64_t rope_stride, int64_t num_slots) {
    rotary_cache(q_out, q, k, v, cos, sin, cache, slots, tokens, heads, kv_heads, dim, q_stride, k_stride, v_stride,
                 rope_stride, num_slots);
}
}
