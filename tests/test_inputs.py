"""Input preparation (spec §1.6) and Tokenize semantics (§1.12) with real tokenizers."""

from __future__ import annotations

from transformers import AutoTokenizer

from runtime.engine.inputs import prepare_input
from runtime.tokenization import tokenize


def test_truncation_keeps_last_tokens_and_substitutes_bos(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model("llama"))
    text = "The quick brown fox jumps over the lazy dog"
    full = tok(text)["input_ids"]
    assert full[0] == tok.bos_token_id
    p = prepare_input(tok, text, truncate_input_tokens=4)
    assert p.input_length == 4 and p.raw_length == len(full)
    assert p.input_ids == [tok.bos_token_id, *full[-3:]]
    assert prepare_input(tok, text, 1).input_ids == [tok.bos_token_id]  # T=1 leaves only BOS
    assert prepare_input(tok, text, 0).input_ids == full
    assert prepare_input(tok, text, len(full)).input_ids == full  # T >= length: no truncation
    assert prepare_input(tok, "", 0).input_ids == [tok.bos_token_id]  # empty text counts 1 on Llama


def test_truncation_without_bos_tokenizer(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model("gpt2"))
    full = tok("def f(x): return x * 2")["input_ids"]
    assert prepare_input(tok, "def f(x): return x * 2", 3).input_ids == full[-3:]


def test_t5_counts_eos_and_tokenize_truncates_left(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model("t5"))
    assert prepare_input(tok, "Test", 0).input_ids[-1] == tok.eos_token_id
    res = tokenize(tok, "written in a hurry, the letter was", truncate_input_tokens=3)
    assert res.token_count == 3 and res.tokens[-1] == "</s>" and res.offsets[-1] == (0, 0)


def test_tokenize_offsets_are_utf8_bytes(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model("gpt2"))
    text = "naïve 中文 ok"
    res = tokenize(tok, text)
    raw = text.encode()
    assert res.offsets[0][0] == 0 and res.offsets[-1][1] == len(raw)
    pieces = sorted(set(res.offsets))
    assert b"".join(raw[s:e] for s, e in pieces) == raw  # offsets tile the text in bytes
