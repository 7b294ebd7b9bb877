"""Tensor-parallel split rules per architecture: which weights split how, and each rank's share.

Megatron layout, so that a rank computes its part of every layer without communication except one all-reduce
after each row-parallel projection and one gather of the logits:
- column-parallel (output dim = weight dim 0, and its bias): query heads, KV heads, MLP up/gate;
- row-parallel (input dim = weight dim 1; outputs summed across ranks): attention output, MLP down;
- vocabulary-parallel (weight dim 0): token embeddings and the LM head;
- per-head tables (T5's relative attention bias, weight dim 1) split by heads;
- everything else (norms, rotary buffers) replicated.

Heads are split GQA-aware and may split unevenly (SmolLM2: 9 query / 3 KV heads over 2 ranks gives 6+3 / 2+1):
each rank keeps whole KV heads and exactly the query heads that attend with them. The same rules drive
`tgis shard` (checkpoint files) and the runtime (in-memory slicing), so the two can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

LLAMA = "llama"
NEOX = "gpt_neox"
T5 = "t5"
FAMILY = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA, "granite": LLAMA, "gpt_neox": NEOX,
          "t5": T5, "mt5": T5}

# module leaf name -> (split, unit): the unit says which per-rank sizes apply
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
}
# checkpoint tensor names of modules that recent transformers versions renamed (loaded under the new name)
RENAMED = {"embed_out.weight": "lm_head.weight"}


class ShardingError(ValueError):
    pass


@dataclass(frozen=True)
class Rule:
    split: str  # "column" / "vocab" (weight dim 0), "row" / "heads" (weight dim 1), "replicate"
    unit: str | None = None

    @property
    def dim(self) -> int | None:
        return {"column": 0, "vocab": 0, "row": 1, "heads": 1}.get(self.split)


def even_sizes(total: int, parts: int) -> list[int]:
    """torch.tensor_split's sizes: the first `total % parts` parts get one more."""
    return [total // parts + (r < total % parts) for r in range(parts)]


def family(config: dict) -> str:
    name = FAMILY.get(config.get("model_type"))
    if name is None:
        raise ShardingError(f"tensor parallelism supports {', '.join(sorted(FAMILY))} models, not "
                            f"{config.get('model_type')!r}")
    return name


def rule_for(config: dict, tensor_name: str) -> Rule:
    parts = tensor_name.split(".")
    module, kind = (parts[-2], parts[-1]) if len(parts) >= 2 else ("", parts[-1])
    split, unit = MODULES[family(config)].get(module, ("replicate", None))
    if split == "row" and kind != "weight":
        return Rule("replicate")  # a row-parallel bias is added once, after the reduce
    return Rule(split, unit)


@dataclass(frozen=True)
class Dims:
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int


def dims(config: dict) -> Dims:
    """The sizes that splits follow, under either naming (Llama/NeoX or T5)."""
    heads = config.get("num_attention_heads") or config["num_heads"]
    return Dims(heads, config.get("num_key_value_heads") or heads,
                config.get("head_dim") or config.get("d_kv") or config["hidden_size"] // heads,
                config.get("intermediate_size") or config["d_ff"])


def unit_sizes(config: dict, world_size: int, vocab_rows: int) -> dict[str, list[int]]:
    """Rows (or columns) each rank holds per unit; raises ShardingError when a rank would get nothing."""
    arch = family(config)
    d = dims(config)
    heads, kv_heads, head_dim, intermediate = d.heads, d.kv_heads, d.head_dim, d.intermediate
    for key, value in (("num_key_value_heads", kv_heads), ("intermediate_size", intermediate),
                       ("vocab_size", vocab_rows)):
        if value < world_size:
            raise ShardingError(f"{key} ({value}) is smaller than the number of shards ({world_size})")
    if heads % kv_heads:
        raise ShardingError(f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})")
    kv = even_sizes(kv_heads, world_size)
    q_heads = [n * (heads // kv_heads) for n in kv]
    sizes = {"heads": q_heads, "q": [n * head_dim for n in q_heads], "kv": [n * head_dim for n in kv],
             "mlp": even_sizes(intermediate, world_size), "vocab": even_sizes(vocab_rows, world_size)}
    if arch == NEOX:  # fused per-head [q; k; v] rows
        sizes["qkv"] = [3 * n * head_dim for n in q_heads]
    return sizes


def local_slice(sizes: list[int], rank: int) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])
