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

from runtime.parallel.rules import RENAMED, ShardingError, local_slice, rule_for, unit_sizes


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


def _slice_linear(linear: nn.Linear, dim: int, part: slice, keep_bias: bool) -> None:
    weight = linear.weight.data.narrow(dim, part.start, part.stop - part.start).contiguous()
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if dim == 0:
        linear.out_features = weight.shape[0]
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.data[part].contiguous(), requires_grad=False)
    else:
        linear.in_features = weight.shape[1]
        if linear.bias is not None and not keep_bias:  # summed by the all-reduce: added by rank 0 only
            linear.bias = nn.Parameter(torch.zeros_like(linear.bias), requires_grad=False)


def shard_model(model: nn.Module, rank: int, world_size: int) -> list[str]:
    """Slice every split weight of `model` to rank `rank`'s part (rules of runtime.parallel.rules); works on meta
    tensors too. Returns the row-parallel module names (their bias is rank 0's alone)."""
    config = model.config.to_dict()
    vocab_rows = model.get_input_embeddings().weight.shape[0]
    sizes = unit_sizes(config, world_size, vocab_rows)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embedding.weight
    rows = []
    for name, module in list(model.named_modules()):
        rule = rule_for(config, name + ".weight")
        part = local_slice(sizes[rule.unit], rank) if rule.unit else None
        if rule.split in ("column", "row") and isinstance(module, nn.Linear):
            _slice_linear(module, rule.dim, part, keep_bias=rank == 0)
            if rule.split == "row":
                module.register_forward_hook(_all_reduce_output)
                rows.append(name)
        elif rule.split == "heads":  # a [buckets, heads] table
            module.weight = nn.Parameter(module.weight.data[:, part].contiguous(), requires_grad=False)
        if hasattr(module, "n_heads"):  # T5 attention sizes its zero position bias by it
            module.n_heads = sizes["heads"][rank]
            module.inner_dim = sizes["q"][rank]
    part = local_slice(sizes["vocab"], rank)
    new_embedding = VocabParallelEmbedding(embedding.weight.data[part].contiguous(), part.start)
    model.set_input_embeddings(new_embedding)
    if head is not None:
        weight = new_embedding.weight if tied else nn.Parameter(head.weight.data[part].contiguous(),
                                                                requires_grad=False)
        bias = None if getattr(head, "bias", None) is None else head.bias.data[part].contiguous()
        model.set_output_embeddings(VocabParallelLMHead(weight, bias, sizes["vocab"]))
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
