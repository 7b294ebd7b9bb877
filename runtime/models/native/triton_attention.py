"""Triton kernels for attention over the paged KV cache (CUDA; on the CPU they run under TRITON_INTERPRET=1).

- Rotary + cache write: one program per token rotates its query and key heads and stores keys and values in their
  cache slots (what took rotary, copy and two index-copy kernels per layer).
- Decode (one query per sequence): flash-decoding. Programs split each sequence's context into `splits` ranges
  per KV head, every program scores all query heads of its KV-head group against its range (the cache is read once
  per group, not once per query head), and a second kernel merges the partial softmaxes by their log-sum-exp. The
  range a split covers is computed from the sequence length inside the kernel, so one launch shape serves every
  length: CUDA graphs replay it as is. With one split the partial kernel writes the output itself.
- Prompt chunks (varlen queries after cached context): one program per (row, query tile, query head), causal
  within the chunk, over all cached keys before it; an online softmax over key tiles.
Keys of a tile are gathered token by token through the block table: block = table[position // block_size].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from runtime.models.native.attention import FP8, FP8_MAX, AttentionMetadata

# The decode kernel's launch options (keys per tile, warps, pipeline stages) by the cache's bytes per element, as
# swept on an H200 (`scripts/gpu_native.py --phases kernels`): a bfloat16 cache is read at the copy bandwidth with
# 64-key tiles; a float8 cache needs 128-key tiles to keep enough bytes in flight.
DECODE_OPTIONS = {1: (128, 4, 2), 2: (64, 4, 3), 4: (64, 4, 3)}
PREFILL_TILE_M, PREFILL_TILE_N = 64, 64
MAX_SPLITS = 16


@triton.jit
def _rotate(x_ptr, out_ptr, heads, dims, ok, c1, c2, s1, s2, HALF: tl.constexpr, CLAMP: tl.constexpr):
    """transformers' x * cos + rotate_half(x) * sin for the heads of one token, in float32, rounded once to x's type
    (and, for a float8 cache, from there to float8, saturated as `stored` does)."""
    x1 = tl.load(x_ptr + heads + dims, mask=ok).to(tl.float32)
    x2 = tl.load(x_ptr + heads + HALF + dims, mask=ok).to(tl.float32)
    r1 = (x1 * c1 - x2 * s1).to(x_ptr.dtype.element_ty)
    r2 = (x2 * c2 + x1 * s2).to(x_ptr.dtype.element_ty)
    if CLAMP > 0:
        r1, r2 = tl.clamp(r1.to(tl.float32), -CLAMP, CLAMP), tl.clamp(r2.to(tl.float32), -CLAMP, CLAMP)
    tl.store(out_ptr + dims, r1.to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(out_ptr + HALF + dims, r2.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _rotary_write(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, slots_ptr, heads,
                  kv_heads, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_rt, stride_ot,
                  stride_oh, stride_cs, stride_ch, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_KV: tl.constexpr, CLAMP: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    half = tl.arange(0, HALF)
    first, second = t * stride_rt + half, t * stride_rt + HALF + half
    c1, c2 = tl.load(cos_ptr + first).to(tl.float32), tl.load(cos_ptr + second).to(tl.float32)
    s1, s2 = tl.load(sin_ptr + first).to(tl.float32), tl.load(sin_ptr + second).to(tl.float32)
    h = tl.arange(0, BLOCK_H)
    ok = (h < heads)[:, None]
    _rotate(q_ptr + t * stride_qt, q_out_ptr + t * stride_ot + h[:, None] * stride_oh, h[:, None] * stride_qh,
            half[None, :], ok, c1, c2, s1, s2, HALF, 0.0)
    g = tl.arange(0, BLOCK_KV)
    ok = (g < kv_heads)[:, None]
    slot = tl.load(slots_ptr + t).to(tl.int64)
    _rotate(k_ptr + t * stride_kt, k_cache_ptr + slot * stride_cs + g[:, None] * stride_ch, g[:, None] * stride_kh,
            half[None, :], ok, c1, c2, s1, s2, HALF, CLAMP)
    dims = tl.arange(0, 2 * HALF)[None, :]
    v = tl.load(v_ptr + t * stride_vt + g[:, None] * stride_vh + dims, mask=ok)
    if CLAMP > 0:
        v = tl.clamp(v.to(tl.float32), -CLAMP, CLAMP)
    tl.store(v_cache_ptr + slot * stride_cs + g[:, None] * stride_ch + dims, v.to(v_cache_ptr.dtype.element_ty),
             mask=ok)


@triton.jit
def _attend_tile(q, k_ptr, v_ptr, table_ptr, pos, loadable, visible, g, dims, m, denom, acc, scale, stride_cb,
                 stride_ct, stride_ch, BLOCK_SIZE: tl.constexpr, PRECISION: tl.constexpr):
    """One tile of keys (positions `pos` of one sequence, gathered through its block table) folded into the running
    softmax (max `m`, denominator, weighted values); `visible` masks scores, rows that see nothing stay empty. Keys
    and values are read in the queries' type (a float8 cache holds them in one byte each)."""
    block = tl.load(table_ptr + pos // BLOCK_SIZE, mask=loadable, other=0)
    rows = block.to(tl.int64) * stride_cb + (pos % BLOCK_SIZE) * stride_ct + g * stride_ch
    k = tl.load(k_ptr + rows[:, None] + dims[None, :], mask=loadable[:, None], other=0.0).to(q.dtype)
    scores = tl.where(visible, tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(scores - m_safe[:, None])
    alpha = tl.exp(m - m_safe)
    v = tl.load(v_ptr + rows[:, None] + dims[None, :], mask=loadable[:, None], other=0.0).to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, denom * alpha + tl.sum(p, 1), acc


@triton.jit
def _decode_partial(q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, part_out_ptr, part_lse_ptr, scale, window,
                    stride_qb, stride_qh, stride_cb, stride_ct, stride_ch, stride_tb, stride_ob, stride_oh, stride_os,
                    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    TILE: tl.constexpr, SPLITS: tl.constexpr, PRECISION: tl.constexpr, HALF_DOT: tl.constexpr):
    b, g, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    length = tl.load(lens_ptr + b)
    lo = length * 0
    if window > 0:
        lo = tl.maximum(length - window, 0)
    per_split = tl.cdiv(tl.cdiv(length - lo, SPLITS), TILE) * TILE
    start = lo + s * per_split
    end = tl.minimum(start + per_split, length)
    heads = g * GROUP + tl.arange(0, BLOCK_H)
    head_ok = tl.arange(0, BLOCK_H) < GROUP
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + dims[None, :], mask=head_ok[:, None], other=0.0)
    if HALF_DOT:
        q = q.to(tl.float16)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    for tile in range(start, end, TILE):
        pos = tile + tl.arange(0, TILE)
        ok = pos < end
        m, denom, acc = _attend_tile(q, k_ptr, v_ptr, tables_ptr + b * stride_tb, pos, ok, ok[None, :], g, dims, m,
                                     denom, acc, scale, stride_cb, stride_ct, stride_ch, BLOCK_SIZE, PRECISION)
    has = denom > 0
    out = acc / tl.where(has, denom, 1.0)[:, None]
    lse = tl.where(has, m + tl.log(tl.where(has, denom, 1.0)), float("-inf"))
    base = b * stride_ob + heads * stride_oh + s * stride_os
    tl.store(part_out_ptr + base[:, None] + dims[None, :], out.to(part_out_ptr.dtype.element_ty),
             mask=head_ok[:, None])
    if SPLITS > 1:  # one split: `part_out` is the output itself
        tl.store(part_lse_ptr + (b * stride_ob + heads * stride_oh) // HEAD_DIM + s, lse, mask=head_ok)


@triton.jit
def _decode_merge(part_out_ptr, part_lse_ptr, out_ptr, stride_ob, stride_oh, stride_os, stride_xb, stride_xh,
                  HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr):
    b, h = tl.program_id(0), tl.program_id(1)
    splits = tl.arange(0, SPLITS)
    dims = tl.arange(0, HEAD_DIM)
    lse = tl.load(part_lse_ptr + (b * stride_ob + h * stride_oh) // HEAD_DIM + splits)
    weight = tl.exp(lse - tl.max(lse, 0))
    parts = tl.load(part_out_ptr + b * stride_ob + h * stride_oh + splits[:, None] * stride_os + dims[None, :])
    out = tl.sum(parts * weight[:, None], 0) / tl.sum(weight, 0)
    tl.store(out_ptr + b * stride_xb + h * stride_xh + dims, out.to(out_ptr.dtype.element_ty))


@triton.jit
def _prefill(q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, lens_ptr, starts_ptr, scale, window,
             stride_qt, stride_qh, stride_cb, stride_ct, stride_ch, stride_tb,
             GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE_M: tl.constexpr,
             TILE_N: tl.constexpr, PRECISION: tl.constexpr, HALF_DOT: tl.constexpr):
    row, tile_m, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(starts_ptr + row)
    q_len = tl.load(starts_ptr + row + 1) - q_start
    if tile_m * TILE_M >= q_len:
        return
    length = tl.load(lens_ptr + row)
    g = h // GROUP
    dims = tl.arange(0, HEAD_DIM)
    qi = tile_m * TILE_M + tl.arange(0, TILE_M)
    q_ok = qi < q_len
    q_pos = length - q_len + qi  # absolute positions of this tile's queries
    q = tl.load(q_ptr + (q_start + qi)[:, None] * stride_qt + h * stride_qh + dims[None, :], mask=q_ok[:, None],
                other=0.0)
    if HALF_DOT:
        q = q.to(tl.float16)
    m = tl.full([TILE_M], float("-inf"), tl.float32)
    denom = tl.zeros([TILE_M], tl.float32)
    acc = tl.zeros([TILE_M, HEAD_DIM], tl.float32)
    last = tl.minimum(length - q_len + (tile_m + 1) * TILE_M, length)  # keys past the tile's last query: masked
    first = length * 0
    if window > 0:
        first = tl.maximum(length - q_len + tile_m * TILE_M - window + 1, 0) // TILE_N * TILE_N
    for tile in range(first, last, TILE_N):
        pos = tile + tl.arange(0, TILE_N)
        k_ok = pos < last
        seen = k_ok[None, :] & (pos[None, :] <= q_pos[:, None])
        seen = seen & ((window <= 0) | (pos[None, :] > q_pos[:, None] - window))
        m, denom, acc = _attend_tile(q, k_ptr, v_ptr, tables_ptr + row * stride_tb, pos, k_ok, seen, g, dims, m,
                                     denom, acc, scale, stride_cb, stride_ct, stride_ch, BLOCK_SIZE, PRECISION)
    out = acc / tl.where(denom > 0, denom, 1.0)[:, None]
    tl.store(out_ptr + (q_start + qi)[:, None] * stride_qt + h * stride_qh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=q_ok[:, None])


def _precision(q: torch.Tensor) -> str:
    """float32 stays float32 in the dot products (Triton would use TF32 and lose the exact match)."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _half_dot(q: torch.Tensor, cache: torch.Tensor) -> bool:
    """bfloat16 queries over a float8 cache: scores and weighted values in float16 (float8 converts to float16 in
    one instruction, to bfloat16 through float32: 8 % faster on an H200; float16 has the finer mantissa, and
    queries, keys and softmax weights stay far inside its range)."""
    return cache.dtype == FP8 and q.dtype == torch.bfloat16


def decode_splits(rows: int, kv_heads: int, device: torch.device) -> int:
    """Enough programs to fill the GPU twice over at small batches; one split once rows alone fill it."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    want = -(-2 * sms // max(1, rows * kv_heads))
    return 1 << max(0, min(MAX_SPLITS, want) - 1).bit_length() if want > 1 else 1


def rotary_write(q, k, v, cos, sin, cache, slots) -> torch.Tensor:
    """Rotated queries [T, H, D]; the rotated keys and the values stored in the cache at `slots`."""
    t, heads, dim = q.shape
    kv_heads = k.shape[1]
    rotated = torch.empty(t, heads, dim, dtype=q.dtype, device=q.device)
    keys, values = (c.view(-1, *cache.shape[-2:]) for c in cache)
    _rotary_write[(t,)](q, k, v, cos, sin, rotated, keys, values, slots, heads, kv_heads, q.stride(0), q.stride(1),
                        k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), rotated.stride(0),
                        rotated.stride(1), keys.stride(0), keys.stride(1), HALF=dim // 2,
                        BLOCK_H=triton.next_power_of_2(heads), BLOCK_KV=triton.next_power_of_2(kv_heads),
                        CLAMP=FP8_MAX if cache.dtype == FP8 else 0.0)
    return rotated


class TritonAttention:
    """The backend interface of runtime/models/native/attention.py on the Triton kernels."""

    reads_unwritten_slots = False  # every load is masked to written positions

    def __init__(self, splits: int | None = None):
        self.splits = splits  # None: chosen per launch from the batch size (fixed per CUDA-graph bucket)

    def __call__(self, q, k, v, cos, sin, cache, meta: AttentionMetadata, scale, window):
        q = rotary_write(q, k, v, cos, sin, cache, meta.slot_mapping)
        out = torch.empty_like(q)
        d = meta.num_decodes
        if d:
            self.decode(q[:d], cache, meta.block_tables[:d], meta.seq_lens[:d], scale, window, out[:d])
        if d < q.shape[0]:
            starts = meta.query_start[d:] - meta.query_start[d]
            rows = len(meta.query_lens_host) - d
            self.prefill(q[d:], cache, meta.block_tables[d:], meta.seq_lens[d:], starts, rows,
                         max(meta.query_lens_host[d:]), scale, window, out[d:])
        return out

    def decode(self, q, cache, tables, lens, scale, window, out) -> None:
        b, heads, dim = q.shape
        kv_heads = cache.shape[3]
        group = heads // kv_heads
        splits = self.splits or decode_splits(b, kv_heads, q.device)
        if splits == 1:  # the partial kernel writes the output (out[:, :, None] as a 1-split partial)
            part_out, part_lse = out[:, :, None], out
        else:
            part_out = torch.empty(b, heads, splits, dim, dtype=torch.float32, device=q.device)
            part_lse = torch.empty(b, heads, splits, dtype=torch.float32, device=q.device)
        keys, values = cache[0], cache[1]
        tile, warps, stages = DECODE_OPTIONS[cache.element_size()]
        _decode_partial[(b, kv_heads, splits)](
            q, keys, values, tables, lens, part_out, part_lse, scale, window or 0,
            q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2), tables.stride(0),
            part_out.stride(0), part_out.stride(1), part_out.stride(2),
            GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), HEAD_DIM=dim, BLOCK_SIZE=cache.shape[2],
            TILE=tile, SPLITS=splits, PRECISION=_precision(q), HALF_DOT=_half_dot(q, cache), num_warps=warps,
            num_stages=stages)
        if splits == 1:
            return
        _decode_merge[(b, heads)](part_out, part_lse, out, part_out.stride(0), part_out.stride(1),
                                  part_out.stride(2), out.stride(0), out.stride(1), HEAD_DIM=dim, SPLITS=splits)

    def prefill(self, q, cache, tables, lens, starts, rows, max_query_len, scale, window, out) -> None:
        heads, dim = q.shape[1], q.shape[2]
        kv_heads = cache.shape[3]
        keys, values = cache[0], cache[1]
        grid = (rows, triton.cdiv(max_query_len, PREFILL_TILE_M), heads)
        _prefill[grid](q, keys, values, out, tables, lens, starts, scale, window or 0,
                       q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2), tables.stride(0),
                       GROUP=heads // kv_heads, HEAD_DIM=dim, BLOCK_SIZE=cache.shape[2], TILE_M=PREFILL_TILE_M,
                       TILE_N=PREFILL_TILE_N, PRECISION=_precision(q), HALF_DOT=_half_dot(q, cache))
