"""Tensor-parallel split rules per architecture: which weights split how, and each rank's share.

Megatron layout, so that a rank computes its part of every layer without communication except one all-reduce
after each row-parallel projection and one gather of the logits:
- column-parallel (the output features, and their bias): query heads, KV heads, MLP up/gate;
- row-parallel (the input features; outputs summed across ranks): attention output, MLP down;
- vocabulary-parallel (weight dim 0): token embeddings and the LM head;
- per-head tables (T5's relative attention bias, weight dim 1) split by heads;
- everything else (norms, position embeddings, rotary buffers) replicated.

Heads are split GQA-aware and may split unevenly (SmolLM2: 9 query / 3 KV heads over 2 ranks gives 6+3 / 2+1):
each rank keeps whole KV heads and exactly the query heads that attend with them. A single KV head (multi-query
attention, e.g. GPTBigCode/StarCoder) is replicated on every rank. Fused QKV projections are split per part: per
head when the heads are interleaved (GPT-NeoX), per block when laid out [q | k | v] (GPT-2, multi-query BigCode).
Each rank's share is a list of index ranges along the split axis. The same rules drive `tgis shard` (checkpoint
files, contiguous layouts only) and the runtime (in-memory slicing), so the two can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

LLAMA, NEOX, T5, GPT2 = "llama", "gpt_neox", "t5", "gpt2"
FAMILY = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA, "granite": LLAMA, "gpt_neox": NEOX,
          "t5": T5, "mt5": T5, "gpt2": GPT2, "gpt_bigcode": GPT2}
PRESPLIT = (LLAMA, NEOX, T5)  # families whose splits are contiguous per tensor (what `tgis shard` writes)

# module name, or "parent.leaf" where a leaf name is ambiguous -> (split, unit)
MODULES = {
    LLAMA: {"q_proj": ("column", "q"), "k_proj": ("column", "kv"), "v_proj": ("column", "kv"),
            "o_proj": ("row", "q"), "gate_proj": ("column", "mlp"), "up_proj": ("column", "mlp"),
            "down_proj": ("row", "mlp"), "embed_tokens": ("vocab", "vocab"), "lm_head": ("vocab", "vocab")},
    NEOX: {"query_key_value": ("column", "qkv"), "dense": ("row", "q"), "dense_h_to_4h": ("column", "mlp"),
           "dense_4h_to_h": ("row", "mlp"), "embed_in": ("vocab", "vocab"), "embed_out": ("vocab", "vocab"),
           "lm_head": ("vocab", "vocab")},
    T5: {"q": ("column", "q"), "k": ("column", "q"), "v": ("column", "q"), "o": ("row", "q"),
         "wi": ("column", "mlp"), "wi_0": ("column", "mlp"), "wi_1": ("column", "mlp"), "wo": ("row", "mlp"),
         "relative_attention_bias": ("heads", "heads"), "shared": ("vocab", "vocab"),
         "embed_tokens": ("vocab", "vocab"), "lm_head": ("vocab", "vocab")},
    GPT2: {"attn.c_attn": ("column", "qkv_blocks"), "attn.c_proj": ("row", "q"), "mlp.c_fc": ("column", "mlp"),
           "mlp.c_proj": ("row", "mlp"), "wte": ("vocab", "vocab"), "lm_head": ("vocab", "vocab")},
}
# checkpoint tensor names of modules that recent transformers versions renamed (loaded under the new name)
RENAMED = {"embed_out.weight": "lm_head.weight"}

Ranges = list[tuple[int, int]]


class ShardingError(ValueError):
    pass


class UnsupportedModel(ShardingError):
    """A model that no number of ranks would make splittable (its architecture, not its head counts)."""


@dataclass(frozen=True)
class Rule:
    split: str  # "column" / "vocab" (weight dim 0 of a Linear), "row" / "heads" (dim 1), "replicate"
    unit: str | None = None

    @property
    def dim(self) -> int | None:
        return {"column": 0, "vocab": 0, "row": 1, "heads": 1}.get(self.split)


@dataclass(frozen=True)
class Dims:
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int


def dims(config: dict) -> Dims:
    """The sizes that splits follow, under any of the naming schemes (Llama/NeoX, T5, GPT-2/BigCode)."""
    heads = config.get("num_attention_heads") or config.get("num_heads") or config["n_head"]
    hidden = config.get("hidden_size") or config.get("d_model") or config.get("n_embd")
    kv_heads = config.get("num_key_value_heads") or (1 if config.get("multi_query") else heads)
    intermediate = config.get("intermediate_size") or config.get("d_ff") or config.get("n_inner") or 4 * hidden
    return Dims(heads, kv_heads, config.get("head_dim") or config.get("d_kv") or hidden // heads, intermediate)


def even_sizes(total: int, parts: int) -> list[int]:
    """torch.tensor_split's sizes: the first `total % parts` parts get one more."""
    return [total // parts + (r < total % parts) for r in range(parts)]


def family(config: dict) -> str:
    name = FAMILY.get(config.get("model_type"))
    if name is None:
        raise UnsupportedModel(f"our own split rules cover {', '.join(sorted(FAMILY))} models, not "
                               f"{config.get('model_type')!r}")
    return name


def rule_for(config: dict, tensor_name: str) -> Rule:
    parts = tensor_name.split(".")
    module, kind = (parts[-2], parts[-1]) if len(parts) >= 2 else ("", parts[-1])
    table = MODULES[family(config)]
    qualified = f"{parts[-3]}.{module}" if len(parts) >= 3 else module
    split, unit = table.get(qualified) or table.get(module, ("replicate", None))
    if split == "row" and kind != "weight":
        return Rule("replicate")  # a row-parallel bias is added once, after the reduce
    return Rule(split, unit)


def _contiguous(sizes: list[int]) -> list[Ranges]:
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    return [[(start, start + n)] for start, n in zip(starts, sizes, strict=True)]


@dataclass(frozen=True)
class Plan:
    """Per unit, each rank's index ranges; plus each rank's head counts (attention modules are told them)."""

    ranges: dict[str, list[Ranges]]
    q_heads: list[int]
    kv_heads: list[int]
    head_dim: int

    def sizes(self, unit: str) -> list[int]:
        return [sum(b - a for a, b in r) for r in self.ranges[unit]]


def plan(config: dict, world_size: int, vocab_rows: int) -> Plan:
    """Each rank's share of every unit; raises ShardingError when a rank would get nothing."""
    family(config)
    d = dims(config)
    replicate_kv = d.kv_heads == 1  # multi-query: every rank keeps the one KV head
    kv_needed = world_size if replicate_kv else d.kv_heads
    for key, value in (("num_attention_heads", d.heads), ("num_key_value_heads", kv_needed),
                       ("intermediate_size", d.intermediate), ("vocab_size", vocab_rows)):
        if value < world_size:
            raise ShardingError(f"{key} ({value}) is smaller than the number of shards ({world_size})")
    if d.heads % d.kv_heads:
        raise ShardingError(f"num_attention_heads ({d.heads}) is not a multiple of num_key_value_heads "
                            f"({d.kv_heads})")
    if replicate_kv:
        q_heads, kv_heads = even_sizes(d.heads, world_size), [1] * world_size
        kv = [[(0, d.head_dim)]] * world_size
    else:
        kv_heads = even_sizes(d.kv_heads, world_size)
        q_heads = [n * (d.heads // d.kv_heads) for n in kv_heads]
        kv = _contiguous([n * d.head_dim for n in kv_heads])
    q = _contiguous([n * d.head_dim for n in q_heads])
    qkv = _contiguous([3 * n * d.head_dim for n in q_heads])  # heads interleaved as [q k v] per head
    q_end, kv_width = d.heads * d.head_dim, d.kv_heads * d.head_dim
    blocks = [[q[r][0], *[(q_end + off + a, q_end + off + b) for off in (0, kv_width) for a, b in kv[r]]]
              for r in range(world_size)]
    if config.get("model_type") == "gpt_bigcode" and not replicate_kv:
        blocks = qkv  # multi-head BigCode interleaves per head
    ranges = {"heads": _contiguous(q_heads), "q": q, "kv": kv, "qkv": qkv, "qkv_blocks": blocks,
              "mlp": _contiguous(even_sizes(d.intermediate, world_size)),
              "vocab": _contiguous(even_sizes(vocab_rows, world_size))}
    return Plan(ranges, q_heads, kv_heads, d.head_dim)
