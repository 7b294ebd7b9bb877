"""Turn a loaded transformers model into this rank's tensor-parallel shard, in place.

Linear layers keep their modules and only lose rows (column-parallel) or columns (row-parallel, followed by an
all-reduce hook); the embedding and LM head are swapped for vocabulary-parallel versions. transformers' attention
code reshapes with `-1` heads, so a rank with fewer heads runs the unmodified forward and its KV cache holds only
its own heads.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from runtime.parallel.rules import RENAMED, Ranges, ShardingError, plan, rule_for


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + n) of the table; ids outside give zeros, and the all-reduce fills them in."""

    def __init__(self, weight: torch.Tensor, start: int):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.start = start

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0)
        dist.all_reduce(out)
        return out


class VocabParallelLMHead(nn.Module):
    """This rank's vocabulary rows of the LM head; every rank gets the full logits (uneven parts are padded for
    the all-gather and trimmed after)."""

    def __init__(self, weight: nn.Parameter, bias: torch.Tensor | None, sizes: list[int]):
        super().__init__()
        self.weight = weight  # may be the embedding's parameter (tied weights stay tied)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.sizes = sizes

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        local = F.linear(hidden, self.weight, self.bias)
        width = max(self.sizes)
        padded = F.pad(local, (0, width - local.shape[-1]))
        parts = [torch.empty_like(padded) for _ in self.sizes]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[..., :n] for p, n in zip(parts, self.sizes, strict=True)], dim=-1)


def _all_reduce_output(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(output)
    return output


def take(t: torch.Tensor, dim: int, ranges: Ranges) -> torch.Tensor:
    parts = [t.narrow(dim, a, b - a) for a, b in ranges]
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim)).contiguous()


def _slice_projection(module: nn.Module, split: str, ranges: Ranges, keep_bias: bool) -> None:
    """Keep output features (`column`) or input features (`row`); Conv1D (GPT-2) stores its weight transposed."""
    out_dim = 1 if isinstance(module, Conv1D) else 0
    dim = out_dim if split == "column" else 1 - out_dim
    module.weight = nn.Parameter(take(module.weight.data, dim, ranges), requires_grad=False)
    if module.bias is not None and split == "column":
        module.bias = nn.Parameter(take(module.bias.data, 0, ranges), requires_grad=False)
    elif module.bias is not None and not keep_bias:  # summed by the all-reduce: added by rank 0 only
        module.bias = nn.Parameter(torch.zeros_like(module.bias), requires_grad=False)
    for attr, size_dim in (("out_features", 0), ("in_features", 1), ("nf", 1)):
        if hasattr(module, attr):
            setattr(module, attr, module.weight.shape[size_dim])


def _tell_heads(attention: nn.Module, q_heads: int, kv_heads: int, head_dim: int) -> None:
    """Attention modules that size tensors from their own head counts get this rank's counts (only the
    attributes a module already has are set)."""
    values = {"n_heads": q_heads, "num_heads": q_heads, "num_attention_heads": q_heads, "kv_heads": kv_heads,
              "num_key_value_groups": q_heads // kv_heads, "inner_dim": q_heads * head_dim,
              "embed_dim": q_heads * head_dim, "split_size": q_heads * head_dim, "kv_dim": kv_heads * head_dim}
    for attr, value in values.items():
        if isinstance(getattr(attention, attr, None), int):
            setattr(attention, attr, value)


def shard_model(model: nn.Module, rank: int, world_size: int) -> list[str]:
    """Slice every split weight of `model` to rank `rank`'s part (rules of runtime.parallel.rules); works on meta
    tensors too. Returns the row-parallel module names (their bias is rank 0's alone)."""
    config = model.config.to_dict()
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    p = plan(config, world_size, embedding.weight.shape[0])
    tied = head is not None and head.weight is embedding.weight
    modules = dict(model.named_modules())
    rows, attention = [], set()
    for name, module in modules.items():
        rule = rule_for(config, name + ".weight")
        if rule.split in ("column", "row") and isinstance(module, nn.Linear | Conv1D):
            _slice_projection(module, rule.split, p.ranges[rule.unit][rank], keep_bias=rank == 0)
            if rule.split == "row":
                module.register_forward_hook(_all_reduce_output)
                rows.append(name)
            if rule.unit in ("q", "qkv", "qkv_blocks"):
                attention.add(name.rpartition(".")[0])
        elif rule.split == "heads":  # a [buckets, heads] table
            module.weight = nn.Parameter(take(module.weight.data, 1, p.ranges["heads"][rank]), requires_grad=False)
    for name in attention:
        _tell_heads(modules[name], p.q_heads[rank], p.kv_heads[rank], p.head_dim)
    [(start, stop)] = p.ranges["vocab"][rank]
    new_embedding = VocabParallelEmbedding(embedding.weight.data[start:stop].contiguous(), start)
    model.set_input_embeddings(new_embedding)
    if head is not None:
        weight = new_embedding.weight if tied else nn.Parameter(head.weight.data[start:stop].contiguous(),
                                                                requires_grad=False)
        bias = None if getattr(head, "bias", None) is None else head.bias.data[start:stop].contiguous()
        model.set_output_embeddings(VocabParallelLMHead(weight, bias, p.sizes("vocab")))
    return rows


def load_presplit(model: nn.Module, rank_dir: Path, rank: int, world_size: int, dtype: torch.dtype) -> None:
    """Fill a skeleton whose parameters are on the meta device with a `tgis shard` rank directory: the rank reads
    only its own slice from disk."""
    rows = shard_model(model, rank, world_size)
    expected = model.state_dict()
    tensors = {RENAMED.get(k, k) if RENAMED.get(k) in expected else k: v
               for k, v in load_file(rank_dir / "model.safetensors").items()}
    for name, tensor in tensors.items():
        if name in expected and expected[name].shape != tensor.shape:
            raise ShardingError(f"{rank_dir}: {name} has shape {tuple(tensor.shape)}, this rank expects "
                                f"{tuple(expected[name].shape)}")
        if rank and name.removesuffix(".bias") in rows and name.endswith(".bias"):
            tensor = torch.zeros_like(tensor)  # added once, by rank 0
        tensors[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embedding.weight
    model.load_state_dict(tensors, strict=False, assign=True)  # a module shared under several names loads once
    if tied:
        head.weight = embedding.weight
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ShardingError(f"{rank_dir} lacks {', '.join(missing[:5])}")
