"""Triton kernels for attention over the paged KV cache (CUDA; on the CPU they run under TRITON_INTERPRET=1).

- Rotary + cache write of prompt tokens: one program per token rotates its query and key heads and stores keys and
  values in their cache slots (what took rotary, copy and two index-copy kernels per layer).
- Decode (one query per sequence): flash-decoding in one kernel per layer. Programs split each sequence's context
  into `splits` ranges per KV head, every program scores all query heads of its KV-head group against its range
  (the cache is read once per group, not once per query head); the last program of a group to finish merges the
  partial softmaxes by their log-sum-exp. The same kernel rotates the decode rows' queries and keys and writes the
  newest key and value (at batch 1 a rotary kernel and a merge kernel per layer cost ~4 µs of a 130 µs layer). The
  range a split covers is computed from the sequence length inside the kernel, so one launch shape serves every
  length: CUDA graphs replay it as is.
- Prompt chunks (varlen queries after cached context): one program per (row, query tile, query head), causal
  within the chunk, over all cached keys before it; an online softmax over key tiles.
Keys of a tile are gathered token by token through the block table: block = table[position // block_size].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from runtime.models.native import pdl
from runtime.models.native.attention import FP8, FP8_MAX, AttentionMetadata
from runtime.models.native.pdl import release, wait

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
def _rotated(row, dims, partner, c, sn, ok):
    """x · cos + rotate_half(x) · sin (`partner`: the other half's index, `sn`: sin negated on the first half) in
    float32, rounded once to x's type."""
    x = tl.load(row + dims, mask=ok, other=0.0).to(tl.float32)
    return (x * c + tl.load(row + partner, mask=ok, other=0.0).to(tl.float32) * sn).to(row.dtype.element_ty)


@triton.jit
def _decode(q_ptr, k_new_ptr, v_new_ptr, cos_ptr, sin_ptr, slots_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr,
            part_out_ptr, part_lse_ptr, out_ptr, counts_ptr, scale, window, stride_qb, stride_qh, stride_kt, stride_kh,
            stride_vt, stride_vh, stride_rt, stride_cb, stride_ct, stride_ch, stride_tb, stride_ob, stride_oh,
            stride_os, stride_xb, stride_xh, GROUP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_G: tl.constexpr,
            HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, SPLITS: tl.constexpr,
            PRECISION: tl.constexpr, HALF_DOT: tl.constexpr, CLAMP: tl.constexpr, GDC: tl.constexpr):
    """One (row, KV head, split); splits past the context return at once (an H200 sweep found more keys per split,
    fewer splits and no merge at short contexts, slower at batch 1: 8.0 against 6.5 µs at 384 keys). Rotates the
    row's queries of this group; the split holding the newest position rotates its key, stores key and value in
    their slot and folds them into its softmax from registers (no reload). With several splits in use, the last of
    a group's programs to finish merges their partial softmaxes: an atomic count per (row, KV head), reset by the
    merger, replaces a merge kernel; with one split in use it writes the output."""
    b, g, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    wait(GDC)
    length = tl.load(lens_ptr + b)
    newest = length - 1
    lo = length * 0
    if window > 0:
        lo = tl.maximum(length - window, 0)
    per_split = tl.cdiv(tl.cdiv(length - lo, SPLITS), TILE) * TILE
    used = tl.cdiv(length - lo, per_split)  # splits past the context do nothing
    if s >= used:
        return
    start = lo + s * per_split
    end = tl.minimum(start + per_split, length)
    dims = tl.arange(0, HEAD_DIM)
    partner = (dims + HEAD_DIM // 2) % HEAD_DIM  # rotate_half: x[d + D/2] (first half, negated), x[d - D/2]
    c = tl.load(cos_ptr + b * stride_rt + dims).to(tl.float32)
    sn = tl.load(sin_ptr + b * stride_rt + dims).to(tl.float32)
    sn = tl.where(dims < HEAD_DIM // 2, -sn, sn)
    heads = g * GROUP + tl.arange(0, BLOCK_H)
    head_ok = tl.arange(0, BLOCK_H) < GROUP
    q = _rotated(q_ptr + b * stride_qb + heads[:, None] * stride_qh, dims[None, :], partner[None, :], c, sn,
                 head_ok[:, None])
    if HALF_DOT:
        q = q.to(tl.float16)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    cached = tl.minimum(end, newest)  # the newest key is not in the cache yet
    for tile in range(start, cached, TILE):
        pos = tile + tl.arange(0, TILE)
        ok = pos < cached
        m, denom, acc = _attend_tile(q, k_ptr, v_ptr, tables_ptr + b * stride_tb, pos, ok, ok[None, :], g, dims, m,
                                     denom, acc, scale, stride_cb, stride_ct, stride_ch, BLOCK_SIZE, PRECISION)
    if (start <= newest) & (newest < end):
        k = _rotated(k_new_ptr + b * stride_kt + g * stride_kh, dims, partner, c, sn, dims < HEAD_DIM)
        v = tl.load(v_new_ptr + b * stride_vt + g * stride_vh + dims)
        if CLAMP > 0:
            k, v = tl.clamp(k.to(tl.float32), -CLAMP, CLAMP), tl.clamp(v.to(tl.float32), -CLAMP, CLAMP)
        k, v = k.to(k_ptr.dtype.element_ty), v.to(v_ptr.dtype.element_ty)
        slot = tl.load(slots_ptr + b).to(tl.int64)
        at = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_ct + g * stride_ch + dims
        tl.store(k_ptr + at, k)
        tl.store(v_ptr + at, v)
        k, v = k.to(q.dtype).to(tl.float32), v.to(q.dtype)  # as a tile reads them back from the cache
        score = tl.sum(q.to(tl.float32) * k[None, :], 1) * scale
        m_new = tl.maximum(m, score)
        p = tl.exp(score - m_new)
        alpha = tl.exp(m - m_new)
        acc = acc * alpha[:, None] + p.to(v.dtype).to(tl.float32)[:, None] * v.to(tl.float32)[None, :]
        denom = denom * alpha + p
        m = m_new
    release(GDC)
    has = denom > 0
    out = acc / tl.where(has, denom, 1.0)[:, None]
    if used == 1:  # the only split: the output itself
        tl.store(out_ptr + b * stride_xb + heads[:, None] * stride_xh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])
    if SPLITS > 1:
        if used > 1:
            lse = tl.where(has, m + tl.log(tl.where(has, denom, 1.0)), float("-inf"))
            base = b * stride_ob + heads * stride_oh + s * stride_os
            tl.store(part_out_ptr + base[:, None] + dims[None, :], out, mask=head_ok[:, None])
            tl.store(part_lse_ptr + (b * stride_ob + heads * stride_oh) // HEAD_DIM + s, lse, mask=head_ok)
            tl.debug_barrier()  # every thread's partials are stored before the count announces them
            count = counts_ptr + b * tl.num_programs(1) + g
            if tl.atomic_add(count, 1, sem="acq_rel") == used - 1:
                group = g * GROUP + tl.arange(0, BLOCK_G)
                _merge(part_out_ptr, part_lse_ptr, out_ptr, b * stride_ob + group * stride_oh,
                       b * stride_xb + group * stride_xh, tl.arange(0, BLOCK_G) < GROUP, used, dims, stride_os,
                       HEAD_DIM, SPLITS)
                tl.store(count, 0)  # ready for the next layer's launch


@triton.jit
def _merge(part_out_ptr, part_lse_ptr, out_ptr, parts_at, out_at, head_ok, used, dims, stride_os,
           HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr):
    """The group's heads' partial softmaxes (splits past `used` did not run) merged by their log-sum-exp, all in one
    round of loads (past the L1 cache: other programs wrote them)."""
    splits = tl.arange(0, SPLITS)
    ok = head_ok[:, None] & (splits < used)[None, :]
    lse = tl.load(part_lse_ptr + parts_at[:, None] // HEAD_DIM + splits[None, :], mask=ok, other=float("-inf"),
                  cache_modifier=".cg")
    weight = tl.exp(lse - tl.max(lse, 1)[:, None])
    parts = tl.load(part_out_ptr + parts_at[:, None, None] + splits[None, :, None] * stride_os + dims[None, None, :],
                    mask=ok[:, :, None], other=0.0, cache_modifier=".cg")
    merged = tl.sum(parts * weight[:, :, None], 1) / tl.sum(weight, 1)[:, None]
    tl.store(out_ptr + out_at[:, None] + dims[None, :], merged.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])


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
        self.counts: torch.Tensor | None = None
        self.held: list[torch.Tensor | None] = []

    def __call__(self, q, k, v, cos, sin, cache, meta: AttentionMetadata, scale, window):
        out = torch.empty_like(q)
        d = meta.num_decodes
        if d:
            self.decode(q[:d], k[:d], v[:d], cos[:d], sin[:d], cache, meta.slot_mapping[:d], meta.block_tables[:d],
                        meta.seq_lens[:d], scale, window, out[:d])
        if d < q.shape[0]:
            rotated = rotary_write(q[d:], k[d:], v[d:], cos[d:], sin[d:], cache, meta.slot_mapping[d:])
            starts = meta.query_start[d:] - meta.query_start[d]
            rows = len(meta.query_lens_host) - d
            self.prefill(rotated, cache, meta.block_tables[d:], meta.seq_lens[d:], starts, rows,
                         max(meta.query_lens_host[d:]), scale, window, out[d:])
        return out

    def decode(self, q, k, v, cos, sin, cache, slots, tables, lens, scale, window, out) -> None:
        """Decode rows: q [B, H, D], k/v [B, KVH, D] of the newest position, not yet rotated nor stored."""
        b, heads, dim = q.shape
        kv_heads = cache.shape[3]
        group = heads // kv_heads
        splits = self.splits or decode_splits(b, kv_heads, q.device)
        part_out = part_lse = counts = out  # one split: the kernel writes `out` itself
        if splits > 1:
            part_out = torch.empty(b, heads, splits, dim, dtype=torch.float32, device=q.device)
            part_lse = torch.empty(b, heads, splits, dtype=torch.float32, device=q.device)
            counts = self._counts(b * kv_heads, q.device)
        keys, values = cache[0], cache[1]
        tile, warps, stages = DECODE_OPTIONS[cache.element_size()]
        gdc = pdl.usable(q)
        _decode[(b, kv_heads, splits)](
            q, k, v, cos, sin, slots, keys, values, tables, lens, part_out, part_lse, out, counts, scale, window or 0,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
            keys.stride(0), keys.stride(1), keys.stride(2), tables.stride(0), part_out.stride(0), part_out.stride(1),
            part_out.stride(2) if splits > 1 else 0, out.stride(0), out.stride(1),
            GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_G=triton.next_power_of_2(group),
            HEAD_DIM=dim, BLOCK_SIZE=cache.shape[2], TILE=tile, SPLITS=splits, PRECISION=_precision(q),
            HALF_DOT=_half_dot(q, cache), CLAMP=FP8_MAX if cache.dtype == FP8 else 0.0, GDC=gdc,
            num_warps=warps,
            num_stages=stages, launch_pdl=gdc)

    def _counts(self, n: int, device: torch.device) -> torch.Tensor:
        """The merge counts, zero between launches (each merger resets its own). A captured CUDA graph keeps the
        address it saw: a replaced buffer stays referenced (`held`), and the first one already covers every batch
        the split rule gives more than one split (rows × KV heads < 2 × SMs)."""
        if self.counts is None or self.counts.numel() < n:
            self.held.append(self.counts)
            self.counts = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        return self.counts

    def prefill(self, q, cache, tables, lens, starts, rows, max_query_len, scale, window, out) -> None:
        heads, dim = q.shape[1], q.shape[2]
        kv_heads = cache.shape[3]
        keys, values = cache[0], cache[1]
        grid = (rows, triton.cdiv(max_query_len, PREFILL_TILE_M), heads)
        _prefill[grid](q, keys, values, out, tables, lens, starts, scale, window or 0,
                       q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2), tables.stride(0),
                       GROUP=heads // kv_heads, HEAD_DIM=dim, BLOCK_SIZE=cache.shape[2], TILE_M=PREFILL_TILE_M,
                       TILE_N=PREFILL_TILE_N, PRECISION=_precision(q), HALF_DOT=_half_dot(q, cache))
