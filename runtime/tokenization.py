"""Tokenize semantics shared by the Tokenize RPC and `tgis tokenize` (TGIS spec §1.12)."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Tokenized:
    token_count: int
    tokens: list[str]  # raw vocabulary strings (e.g. "Ġthe", "▁The", "</s>")
    offsets: list[tuple[int, int]]  # UTF-8 byte offsets into the text; (0, 0) for special tokens


def _char_to_byte_offsets(text: str) -> list[int]:
    """Byte offset of every character index (plus the end), because HF returns character offsets."""
    table = [0]
    for ch in text:
        table.append(table[-1] + len(ch.encode("utf-8")))
    return table


def tokenize(tokenizer, text: str, truncate_input_tokens: int = 0) -> Tokenized:
    """Encode with special tokens; keep the last T entries when T > 0 (left truncation, no BOS substitution)."""
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    table = _char_to_byte_offsets(text)
    offsets = [(table[s], table[e]) for s, e in enc["offset_mapping"]]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    if 0 < truncate_input_tokens < len(ids):
        tokens, offsets = tokens[-truncate_input_tokens:], offsets[-truncate_input_tokens:]
    return Tokenized(len(tokens), tokens, offsets)


def ensure_fast_tokenizer(model_dir: Path) -> bool:
    """TGIS' convert-to-fast-tokenizer step: write `tokenizer.json` beside the config when a model ships only slow
    tokenizer files (vocab/merges, SentencePiece), so serving never converts at start. False when it exists."""
    if (model_dir / "tokenizer.json").exists():
        return False
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if not tok.is_fast:
        raise ValueError(f"no fast tokenizer can be built for {model_dir}")
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        shutil.copy(Path(tmp) / "tokenizer.json", model_dir / "tokenizer.json")
    return True
