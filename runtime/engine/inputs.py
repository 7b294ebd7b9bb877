"""Turning prompt text into engine input ids: tokenization, left truncation and BOS substitution (spec §1.6)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PreparedInput:
    input_ids: list[int]
    input_length: int  # after truncation; what input_token_count reports
    raw_length: int  # before truncation


def prepare_input(tokenizer, text: str, truncate_input_tokens: int = 0,
                  add_special_tokens: bool = True) -> PreparedInput:
    """Tokenize with special tokens; keep the last T tokens when 0 < T < length; re-insert BOS at the first kept
    position for tokenizers that add one (Llama): the model then sees BOS + last T-1 tokens. A rendered chat
    template already holds its special tokens, hence `add_special_tokens=False` for it."""
    ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    raw = len(ids)
    if 0 < truncate_input_tokens < raw:
        ids = ids[-truncate_input_tokens:]
        bos = tokenizer.bos_token_id
        if bos is not None and raw > 0 and _adds_bos(tokenizer):
            ids[0] = bos
    return PreparedInput(ids, len(ids), raw)


def _adds_bos(tokenizer) -> bool:
    """Whether encoding prepends BOS (checked on an empty string, which covers post-processor templates too)."""
    cached = getattr(tokenizer, "_tgis_adds_bos", None)
    if cached is None:
        ids = tokenizer("", add_special_tokens=True)["input_ids"]
        cached = bool(ids) and ids[0] == tokenizer.bos_token_id
        tokenizer._tgis_adds_bos = cached
    return cached
