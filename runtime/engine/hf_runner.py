"""Model runner for Hugging Face transformers models: padded batches whose KV caches are merged and pruned.

Why this design: it works unchanged for every decoder-only architecture transformers loads and for encoder-decoder
models (T5, BART), because it only relies on the public forward signature and on the cache being a list of
per-layer `[batch, heads, seq, head_dim]` key/value tensors. A running batch is left-padded to its longest row;
a newly prefilled group is merged by left-padding both sides to a common length and concatenating along the batch
dimension, so joining never recomputes anyone's cache. Finished rows are dropped and fully padded leading columns
trimmed. The price is padding waste (tracked as KV slots) and a cache re-concatenation per step; the native paged
runner (runtime/engine/native_runner.py) is the fast path for the architectures it has.

It takes the same step plans as every runner, with whole prompts only (it cannot continue a prompt in a later
step): the plan's new rows are prefilled as one group, its decode rows (which are always every running row) decoded
as one batch, and the logits returned in plan order.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from runtime.engine.config import EngineConfig
from runtime.engine.kv_cache import free_memory_bytes
from runtime.engine.lora import LoraManager, LoraRef, adapter_errors
from runtime.engine.plan import ModelOutput, RowPlan, StepPlan
from runtime.models.loader import LoadedModel


@dataclass
class PrefillItem:
    """One row to prefill. Decoder-only: `tokens` = prompt (+ already generated ids after a preemption).
    Encoder-decoder: `encoder_ids` = prompt, `tokens` = decoder start id (+ already generated ids)."""

    tokens: list[int]
    encoder_ids: list[int] | None = None
    prompt_logits: bool = False  # return logits for every position (input-token details)
    # prompt-tuning embeddings [n, d] for the first n positions of `tokens` / `encoder_ids` (placeholders there)
    decoder_prefix: torch.Tensor | None = None
    encoder_prefix: torch.Tensor | None = None
    lora: LoraRef | None = None


@dataclass
class Batch:
    """A running padded batch: the model's KV cache plus the masks and positions that go with it."""

    cache: DynamicCache | EncoderDecoderCache
    mask: torch.Tensor  # [B, T] 1 where the decoder cache holds a real token
    positions: torch.Tensor  # [B] position id of the next decoder token
    enc_hidden: torch.Tensor | None = None  # [B, S, d] encoder output (encoder-decoder only)
    enc_mask: torch.Tensor | None = None  # [B, S]
    loras: list[LoraRef | None] | None = None  # per row; None when no row uses an adapter

    @property
    def size(self) -> int:
        return self.mask.shape[0]

    @property
    def slots(self) -> int:
        """KV slots held, padding included: what the cache capacity is charged."""
        enc = 0 if self.enc_mask is None else self.enc_mask.shape[1]
        return self.size * (self.mask.shape[1] + enc)


def _pad_left(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _pad_rows(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ids and mask tensors."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def _ids_or_embeds(model, ids: torch.Tensor, lengths: list[int],
                   prefixes: list[torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """`{"input_ids": ids}`, or `{"inputs_embeds": ...}` with each row's prompt-tuning prefix written over its
    first (placeholder) positions when any row has one."""
    if all(p is None for p in prefixes):
        return {"input_ids": ids}
    embeds = model.get_input_embeddings()(ids)
    for row, (length, prefix) in enumerate(zip(lengths, prefixes, strict=True)):
        if prefix is not None:
            start = ids.shape[1] - length  # rows are left-padded
            embeds[row, start:start + prefix.shape[0]] = prefix.to(embeds)
    return {"inputs_embeds": embeds}


def layer_groups(cache) -> tuple[list, list]:
    """(self-attention layers, cross-attention layers) of a transformers cache."""
    if isinstance(cache, EncoderDecoderCache):
        return list(cache.self_attention_cache.layers), list(cache.cross_attention_cache.layers)
    return list(cache.layers), []


def _merge_layers(dst: list, src: list, length: int) -> None:
    for a, b in zip(dst, src, strict=True):
        a.keys = torch.cat([_pad_left(a.keys, length, -2), _pad_left(b.keys, length, -2)])
        a.values = torch.cat([_pad_left(a.values, length, -2), _pad_left(b.values, length, -2)])


def _select_layers(layers: list, idx: torch.Tensor, start: int) -> None:
    for layer in layers:
        layer.keys = layer.keys[idx, ..., start:, :]
        layer.values = layer.values[idx, ..., start:, :]


def _first_used_column(mask: torch.Tensor) -> int:
    return int((mask.sum(0) > 0).nonzero()[0].item())


class TransformersRunner:
    """Runs prefill and decode forwards for one loaded transformers model over one padded batch."""

    paged = False  # capacity is padded slots, not blocks
    chunked_prefill = False  # prompts are prefilled whole
    failure: str | None = None  # set by runners that can break beyond one step (tensor-parallel groups)

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.batch: Batch | None = None
        self.row_ids: list[str] = []  # sequence id of each batch row
        self.model = loaded.model
        self.device = loaded.device
        self.pad = loaded.pad_token_id
        params = inspect.signature(self.model.forward).parameters
        self._has_logits_to_keep = "logits_to_keep" in params
        self._has_position_ids = "position_ids" in params
        # transformers >= 5.2x renamed `past_key_values` to `cache`; older 5.x only knows the former
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.lora: LoraManager | None = None  # created with the first adapter request
        if self.device.type == "cuda":
            # Padded decode steps pass an attention mask and grow the key length by one every step; PyTorch then
            # picks cuDNN attention on Hopper, which builds a new execution plan per shape (measured: 4 ms per layer
            # per step at batch 48 on an H100). The memory-efficient kernel has no per-shape set-up.
            torch.backends.cuda.enable_cudnn_sdp(False)

    # ---- the runner interface -------------------------------------------------------------------------------
    def kv_capacity(self, config: EngineConfig, max_sequence_length: int) -> int:
        """Slots: given, or measured bytes per slot (a 2-token warm-up prefill) against free memory, capped at what
        the batch limits can ever use."""
        per_request = max_sequence_length * (2 if self.loaded.is_encoder_decoder else 1)
        if config.kv_cache_tokens:
            return config.kv_cache_tokens
        pad = self.loaded.pad_token_id
        probe = PrefillItem(tokens=[pad] * 2, encoder_ids=[pad] if self.loaded.is_encoder_decoder else None)
        batch, _, _ = self.prefill([probe])
        tensors = [t for group in layer_groups(batch.cache) for layer in group for t in (layer.keys, layer.values)]
        per_slot = max(1, sum(t.numel() * t.element_size() for t in tensors) // batch.slots)
        fit = int(free_memory_bytes(self.device) * config.kv_cache_memory_fraction) // per_slot
        return max(per_request, min(fit, config.max_batch_size * per_request))

    def execute(self, plan: StepPlan) -> ModelOutput:
        """Drop released rows, decode the running batch, prefill the new group and merge it in."""
        if plan.released and self.batch is not None:
            gone = set(plan.released)
            keep = [i for i, sid in enumerate(self.row_ids) if sid not in gone]
            self.batch = self.keep(self.batch, keep)
            self.row_ids = [self.row_ids[i] for i in keep]
        decodes = [r for r in plan.rows if not r.new]
        new = [r for r in plan.rows if r.new]
        logits: dict[str, torch.Tensor] = {}
        if decodes:
            if sorted(r.seq_id for r in decodes) != sorted(self.row_ids):
                raise RuntimeError("a padded batch decodes all of its rows in every step")
            token_of = {r.seq_id: r.tokens[0] for r in decodes}
            out = self.decode(self.batch, torch.tensor([token_of[sid] for sid in self.row_ids], dtype=torch.long))
            logits.update(zip(self.row_ids, out, strict=True))
        prompt: dict[str, torch.Tensor] = {}
        if new:
            batch, last, rows_prompt = self.prefill([_prefill_item(r) for r in new])
            logits.update(zip((r.seq_id for r in new), last, strict=True))
            prompt = {r.seq_id: p for r, p in zip(new, rows_prompt, strict=True) if p is not None}
            self.batch = self.merge(self.batch, batch)
            self.row_ids += [r.seq_id for r in new]
        sampled = [logits[r.seq_id] for r in plan.rows if r.sample]
        return ModelOutput(torch.stack(sampled) if sampled else torch.empty(0), prompt)

    def close(self) -> None:
        """Nothing to release: the model and caches go with the object (a sharded runner stops its ranks)."""

    # ---- forwards and batch surgery ---------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, items: list[PrefillItem]) -> tuple[Batch, torch.Tensor, list[torch.Tensor | None]]:
        """Forward a new group. Returns its batch, last-position logits [n, V], and per-row prompt logits
        ([len(tokens), V], position i predicting token i+1) for rows that asked for them."""
        ids, mask = _pad_rows([it.tokens for it in items], self.pad, self.device)
        loras = [it.lora for it in items]
        self._activate(loras)
        want_all = any(it.prompt_logits for it in items)
        kwargs: dict = {"use_cache": True}
        if self._has_logits_to_keep:
            kwargs["logits_to_keep"] = 0 if want_all else 1
        decoder = _ids_or_embeds(self.model, ids, [len(it.tokens) for it in items],
                                 [it.decoder_prefix for it in items])
        if self.loaded.is_encoder_decoder:
            enc_ids, enc_mask = _pad_rows([it.encoder_ids or [] for it in items], self.pad, self.device)
            encoder = _ids_or_embeds(self.model, enc_ids, [len(it.encoder_ids or []) for it in items],
                                     [it.encoder_prefix for it in items])
            enc_hidden = self.model.get_encoder()(**encoder, attention_mask=enc_mask).last_hidden_state
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            out = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=enc_hidden), attention_mask=enc_mask,
                             **{f"decoder_{k}": v for k, v in decoder.items()}, decoder_attention_mask=mask,
                             **{self._cache_kw: cache}, **kwargs)
            positions = mask.sum(-1)
        else:
            enc_hidden = enc_mask = None
            cache = DynamicCache()
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            if self._has_position_ids:
                kwargs["position_ids"] = pos
            out = self.model(**decoder, attention_mask=mask, **{self._cache_kw: cache}, **kwargs)
            positions = pos[:, -1] + 1
        logits = out.logits
        prompt = [logits[i, ids.shape[1] - len(it.tokens):] if it.prompt_logits else None
                  for i, it in enumerate(items)]
        batch = Batch(cache, mask, positions, enc_hidden, enc_mask, loras if any(loras) else None)
        return batch, logits[:, -1, :], prompt

    def check_adapter(self, ref: LoraRef) -> None:
        """ValueError (the client's message) when the adapter cannot be applied to this model; loads it."""
        if self.lora is None:
            self.lora = LoraManager(self.model, self.device, self.loaded.dtype)
        with adapter_errors(ref):
            self.lora._load(ref)

    def _activate(self, loras: list[LoraRef | None] | None) -> None:
        """Tell the LoRA hooks which rows of the coming forward use which adapter."""
        if any(loras or ()) and self.lora is None:
            self.lora = LoraManager(self.model, self.device, self.loaded.dtype)
        if self.lora is not None:
            self.lora.activate(loras or [])

    @torch.inference_mode()
    def decode(self, batch: Batch, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step for every row of `batch` (tokens: [B] the last sampled ids); returns logits [B, V]."""
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((batch.size, 1))], dim=1)
        ids = tokens.to(self.device).view(-1, 1)
        self._activate(batch.loras)
        if self.loaded.is_encoder_decoder:
            out = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=batch.enc_hidden),
                             attention_mask=batch.enc_mask, decoder_input_ids=ids, decoder_attention_mask=batch.mask,
                             use_cache=True, **{self._cache_kw: batch.cache})
        else:
            kwargs = {"position_ids": batch.positions.view(-1, 1)} if self._has_position_ids else {}
            out = self.model(input_ids=ids, attention_mask=batch.mask, use_cache=True, **{self._cache_kw: batch.cache},
                             **kwargs)
        batch.positions = batch.positions + 1
        return out.logits[:, -1, :]

    @staticmethod
    def merge(a: Batch | None, b: Batch) -> Batch:
        """Append batch `b`'s rows after `a`'s (left-padding both to a common length)."""
        if a is None:
            return b
        length = max(a.mask.shape[1], b.mask.shape[1])
        a_self, a_cross = layer_groups(a.cache)
        b_self, b_cross = layer_groups(b.cache)
        _merge_layers(a_self, b_self, length)
        if a.loras is not None or b.loras is not None:
            a.loras = (a.loras or [None] * a.size) + (b.loras or [None] * b.size)
        a.mask = torch.cat([_pad_left(a.mask, length, 1), _pad_left(b.mask, length, 1)])
        a.positions = torch.cat([a.positions, b.positions])
        if a.enc_mask is not None:
            enc_len = max(a.enc_mask.shape[1], b.enc_mask.shape[1])
            _merge_layers(a_cross, b_cross, enc_len)
            a.enc_hidden = torch.cat([_pad_left(a.enc_hidden, enc_len, 1), _pad_left(b.enc_hidden, enc_len, 1)])
            a.enc_mask = torch.cat([_pad_left(a.enc_mask, enc_len, 1), _pad_left(b.enc_mask, enc_len, 1)])
        return a

    @staticmethod
    def keep(batch: Batch, rows: list[int]) -> Batch | None:
        """Keep only `rows` (in that order) and trim columns that became pure padding."""
        if not rows:
            return None
        if rows == list(range(batch.size)):
            return batch
        idx = torch.tensor(rows, dtype=torch.long, device=batch.mask.device)
        mask = batch.mask[idx]
        start = _first_used_column(mask)
        self_layers, cross_layers = layer_groups(batch.cache)
        _select_layers(self_layers, idx, start)
        batch.mask = mask[:, start:]
        batch.positions = batch.positions[idx]
        if batch.loras is not None:
            batch.loras = [batch.loras[r] for r in rows]
        if batch.enc_mask is not None:
            enc_mask = batch.enc_mask[idx]
            enc_start = _first_used_column(enc_mask)
            _select_layers(cross_layers, idx, enc_start)
            batch.enc_mask = enc_mask[:, enc_start:]
            batch.enc_hidden = batch.enc_hidden[idx, enc_start:]
        return batch


def _prefill_item(row: RowPlan) -> PrefillItem:
    return PrefillItem(tokens=row.tokens, encoder_ids=row.encoder_ids, prompt_logits=row.prompt_logits,
                       decoder_prefix=row.decoder_prefix, encoder_prefix=row.encoder_prefix, lora=row.lora)
