"""`--dataset FILE`: prompts read from a local file, in the two formats people benchmark with.

- JSONL (or a JSON array) of prompts: each record a string, or an object with `prompt` and optionally `output_len`
  (or `max_tokens`) for that request's output length.
- ShareGPT conversations (a JSON array, as ShareGPT_V3 ships, or JSONL): objects with `conversations` (or
  `messages`), a list of turns `{"from": "human"|"gpt", "value": ...}` (or `{"role", "content"}`). The first human
  turn is the prompt; the reply after it, counted in tokens, is the output length (as vLLM's benchmark does).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runtime.bench.errors import BenchError

_HUMAN = ("human", "user")
_ASSISTANT = ("gpt", "assistant", "chatgpt", "bard", "bing")


@dataclass(frozen=True)
class DatasetEntry:
    prompt: str
    output_len: int | None  # None: the file says nothing, the workload's output length applies


def read_dataset(path: Path, count_tokens: Callable[[str], int]) -> list[DatasetEntry]:
    """Every usable record in file order; a record that is not one of the formats stops the benchmark."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BenchError(f"--dataset {path}: cannot read it: {exc}") from exc
    entries = [e for where, record in _records(path, text) if (e := _entry(path, where, record, count_tokens))]
    if not entries:
        raise BenchError(f"--dataset {path}: no prompts in it")
    return entries


def _records(path: Path, text: str) -> list[tuple[str, object]]:
    """(position for messages, parsed record): a JSON array's items, else one JSON value per non-empty line."""
    if text.lstrip().startswith("["):
        try:
            return [(f"item {i}", r) for i, r in enumerate(json.loads(text))]
        except json.JSONDecodeError as exc:
            raise BenchError(f"--dataset {path}: not valid JSON: {exc}") from exc
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise BenchError(f"--dataset {path}: line {n} is not JSON: {exc}") from exc
    return records


def _entry(path: Path, where: str, record: object, count_tokens: Callable[[str], int]) -> DatasetEntry | None:
    """The record as an entry; None for a conversation with no human turn (ShareGPT has many)."""
    if isinstance(record, str):
        return DatasetEntry(record, None) if record else None
    if isinstance(record, dict) and isinstance(record.get("prompt"), str):
        length = record.get("output_len", record.get("max_tokens"))
        if length is not None and (not isinstance(length, int) or isinstance(length, bool) or length < 1):
            raise BenchError(f"--dataset {path}: {where}: output_len must be a positive integer, got {length!r}")
        return DatasetEntry(record["prompt"], length) if record["prompt"] else None
    turns = record.get("conversations", record.get("messages")) if isinstance(record, dict) else None
    if not isinstance(turns, list):
        raise BenchError(f"--dataset {path}: {where} is neither a prompt (a string or {{\"prompt\": ...}}) nor a "
                         "ShareGPT conversation ({\"conversations\": [...]})")
    said = [(str(t.get("from", t.get("role", ""))).lower(), t.get("value", t.get("content")))
            for t in turns if isinstance(t, dict)]
    for i, (speaker, value) in enumerate(said):
        if speaker in _HUMAN and isinstance(value, str) and value:
            reply = next((v for s, v in said[i + 1:i + 2] if s in _ASSISTANT and isinstance(v, str)), None)
            return DatasetEntry(value, max(1, count_tokens(reply)) if reply else None)
    return None
