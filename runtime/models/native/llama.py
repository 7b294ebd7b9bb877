"""The native Llama-family decoder (Llama 2/3/3.1+, Mistral, Qwen2, Qwen3, Granite, SmolLM2) over a paged KV cache.

One forward takes a flattened step (decodes and prompt chunks together): token ids [T], their positions [T] and the
attention metadata; it returns hidden states [T, hidden]; `logits` turns the rows the runner samples into scores.
Under tensor parallelism each rank holds its heads and MLP columns (`TPShape`), and the row-parallel projections
all-reduce.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from runtime.models.native.attention import AttentionBackend, AttentionMetadata
from runtime.models.native.config import NativeConfig
from runtime.models.native.layers import Projection, RMSNorm


@dataclass(frozen=True)
class TPShape:
    """This rank's share: query heads, KV heads, MLP columns, vocabulary rows (everything when not sharded)."""

    heads: int
    kv_heads: int
    intermediate: int
    parallel: bool = False


class Attention(nn.Module):
    def __init__(self, cfg: NativeConfig, shape: TPShape):
        super().__init__()
        d = cfg.head_dim
        self.heads, self.kv_heads, self.head_dim = shape.heads, shape.kv_heads, d
        self.qkv = Projection(cfg.hidden_size, [shape.heads * d, shape.kv_heads * d, shape.kv_heads * d],
                              cfg.qkv_bias)
        self.o = Projection(shape.heads * d, [cfg.hidden_size], cfg.o_bias, reduce=shape.parallel)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.scale, self.window = cfg.scale, cfg.sliding_window

    def project(self, x: torch.Tensor, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of `norm(x)` ([T, heads, D] views of one fused matmul), q/k-normed where the
        model has it; the attention backend rotates them (on the GPU fused with the cache write)."""
        t, d = x.shape[0], self.head_dim
        q, k, v = self.qkv(x, norm).split([self.heads * d, self.kv_heads * d, self.kv_heads * d], dim=-1)
        q, k, v = q.view(t, self.heads, d), k.view(t, self.kv_heads, d), v.view(t, self.kv_heads, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v


class MLP(nn.Module):
    def __init__(self, cfg: NativeConfig, shape: TPShape):
        super().__init__()
        self.gate_up = Projection(cfg.hidden_size, [shape.intermediate, shape.intermediate], cfg.mlp_bias,
                                  activate=True)
        self.down = Projection(shape.intermediate, [cfg.hidden_size], cfg.mlp_bias, reduce=shape.parallel)

    def forward(self, x: torch.Tensor, norm: RMSNorm, scale: float) -> torch.Tensor:
        """x + scale · down(silu(gate) · up) of `norm(x)`."""
        return self.down(self.gate_up(x, norm), residual=x, scale=scale)


class DecoderLayer(nn.Module):
    """Split around the attention kernel call: `before_attention` and `after_attention` are pure tensor code that
    torch.compile can fuse (norms, residuals, activation), the attention backend (rotary, cache write,
    attention) stays outside."""

    def __init__(self, cfg: NativeConfig, shape: TPShape):
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, shape)
        self.post_attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, shape)
        self.residual_multiplier = cfg.residual_multiplier

    def before_attention(self, x):
        return self.attn.project(x, self.input_norm)

    def after_attention(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        x = self.attn.o(attended.reshape(x.shape[0], -1), residual=x, scale=self.residual_multiplier)
        return self.mlp(x, self.post_attention_norm, self.residual_multiplier)

    def forward(self, x, cos, sin, cache, meta, backend, stages=None) -> torch.Tensor:
        """`stages`: compiled (before, after) functions of (layer, tensors), shared by every layer."""
        before, after = stages or (DecoderLayer.before_attention, DecoderLayer.after_attention)
        q, k, v = before(self, x)
        return after(self, x, backend(q, k, v, cos, sin, cache, meta, self.attn.scale, self.attn.window))


class NativeCausalLM(nn.Module):
    """`embed_tokens` and `lm_head` are set by the loader (plain or vocabulary-parallel, tied or not)."""

    def __init__(self, cfg: NativeConfig, shape: TPShape, rope: torch.Tensor):
        """`rope`: [positions, 2, head_dim] rotary cos and sin tables in the activations' dtype."""
        super().__init__()
        self.config = cfg
        self.layers = nn.ModuleList(DecoderLayer(cfg, shape) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.embed_tokens: nn.Module = nn.Embedding(0, cfg.hidden_size)
        self.lm_head: nn.Module = nn.Identity()
        self.register_buffer("rope", rope, persistent=False)
        self.stages = None  # compiled per-layer stages (`compile`)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids)
        m = self.config.embedding_multiplier
        return x if m == 1.0 else x * m

    def forward(self, x: torch.Tensor, positions: torch.Tensor, caches: torch.Tensor, meta: AttentionMetadata,
                backend: AttentionBackend) -> torch.Tensor:
        """x: input embeddings [T, hidden] (`embed`, with prompt-prefix rows written over); caches: [layers, 2,
        blocks, block_size, KVH, D]. Returns the last layer's hidden states [T, hidden] (the final norm is the
        head's, in `logits`)."""
        rope = self.rope[positions]  # one gather for both tables: cos and sin are views
        cos, sin = rope[:, 0], rope[:, 1]
        for layer, cache in zip(self.layers, caches, strict=True):
            x = layer(x, cos, sin, cache, meta, backend, self.stages)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores of the rows the runner picked: the final norm runs on those rows only, inside the head's GEMV
        where it has one."""
        head = self.lm_head
        out = head(hidden, self.norm) if isinstance(head, Projection) else head(self.norm(hidden))
        s = self.config.logits_scaling
        return out if s == 1.0 else out / s

    def compile(self) -> None:
        """torch.compile the tensor code between the attention kernels (TGIS PT2_COMPILE): norms, rotary, activation
        and residual adds fuse into a few kernels per layer. The stages are functions of (layer, tensors), so one
        compilation serves every layer (weights are graph inputs, not constants); the token count stays dynamic."""
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self.stages = (torch.compile(DecoderLayer.before_attention, dynamic=True),
                       torch.compile(DecoderLayer.after_attention, dynamic=True))

    def projections(self) -> list[dict[str, Projection]]:
        """Per layer, the projections LoRA adapters can target."""
        return [{"qkv": layer.attn.qkv, "o": layer.attn.o, "gate_up": layer.mlp.gate_up, "down": layer.mlp.down}
                for layer in self.layers]

    def products(self) -> list[Projection]:
        """Every projection, and the LM head unless it is split over ranks: what a faster product kernel serves."""
        head = [self.lm_head] if isinstance(self.lm_head, Projection) else []
        return [p for layer in self.projections() for p in layer.values()] + head
