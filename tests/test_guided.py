"""Guided decoding in the engine with the real SmolLM2 (greedy and seeded sampling): every option of the proto's
`oneof guided`, outputs checked by independent validators (jsonschema, re, lark), mixed batches, min_new_tokens and
stop sequences, token details; plus the spec rules and the bitmask kernels without a model."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import re

import jsonschema
import lark
import pytest
import torch

from runtime.engine.guided import (
    GrammarCompiler,
    GrammarState,
    apply_grammars,
    apply_token_bitmask,
    unpack_and_apply,
)
from runtime.engine.guided_spec import GuidedSpecError, choice_grammar, guided_spec
from runtime.engine.request import EngineRequest, GenerationParams, StopReason

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string"},
        "employed": {"type": "boolean"},
        "hobbies": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    },
    "required": ["name", "age", "city", "employed", "hobbies"],
}
PERSON_PROMPTS = [
    "Describe a fictional person as JSON.", "Invent a character for a novel and give their details as JSON.",
    "Give me a JSON profile of a famous painter.", "Create a JSON record for a new employee.",
    "Make up a football player and describe them in JSON.", "JSON for a retired teacher, please.",
    "Describe your best friend as a JSON object.", "A JSON description of a young scientist.",
    "Write a JSON entry for a chef who lives in Paris.", "Profile of a musician, as JSON.",
]
# (prompt, regex) pairs SmolLM2 completes; xgrammar fills masks for these in ~10 µs, while per-character bounds
# such as [a-z]{1,12} or a string's maxLength take it milliseconds per step
REGEXES = [("When did World War II end? Answer as YYYY-MM-DD.", r"\d{4}-\d{2}-\d{2}"),
           ("Write a sentence about dogs.", r"[A-Z][a-z]+( [a-z]+)*\."),
           ("Say something about the sea.", r"[A-Z][a-z]+( [a-z]+)*\.")]
CHOICES = ["positive", "negative", "neutral"]
# the same language twice: bounded sums of 1–2 digit numbers, with parentheses
LARK_ARITHMETIC = 'start: expr\nexpr: term (("+" | "-" | "*") term)~0..3\nterm: /[1-9][0-9]?/ | "(" expr ")"'
GBNF_ARITHMETIC = 'root ::= expr\nexpr ::= term (("+" | "-" | "*") term){0,3}\nterm ::= [1-9] [0-9]? | "(" expr ")"'
_ids = itertools.count()


@pytest.fixture(scope="module")
def engine(smollm2_dir):
    from runtime.engine.async_engine import AsyncEngine
    from runtime.engine.config import EngineConfig

    eng = AsyncEngine(EngineConfig(model_path=str(smollm2_dir), dtype="float32", max_batch_size=16))
    yield eng
    eng.shutdown()


def _request(engine, prompt: str, spec=None, **params) -> EngineRequest:
    text = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                tokenize=False)
    params.setdefault("max_new_tokens", 100)
    return EngineRequest(f"g-{next(_ids)}", engine.tokenizer(text)["input_ids"], GenerationParams(guided=spec,
                                                                                                   **params))


async def _collect(engine, request: EngineRequest):
    tokens, details = [], []
    async for out in engine.generate(request):
        tokens += out.new_token_ids
        details += out.tokens
    assert out.error is None, out.error
    return out, tokens, details


def _run(engine, requests: list[EngineRequest]):
    async def main():
        return await asyncio.gather(*(_collect(engine, r) for r in requests))

    return asyncio.run(main())


def _texts(engine, prompts, spec, **params) -> list[str]:
    results = _run(engine, [_request(engine, p, spec, **params) for p in prompts])
    for final, _, _ in results:
        assert final.stop_reason == StopReason.EOS_TOKEN, (final.stop_reason, final.output_text)
    return [final.output_text for final, _, _ in results]


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "seed": 7}], ids=["greedy", "seeded"])
def test_json_schema_outputs_validate(engine, sampling):
    spec = guided_spec("json_schema", json.dumps(PERSON))
    texts = _texts(engine, PERSON_PROMPTS, spec, **sampling)
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON)
    if sampling:  # a seed makes a guided request reproducible too
        assert _texts(engine, PERSON_PROMPTS[:2], spec, **sampling) == texts[:2]


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.0, "seed": 3}], ids=["greedy", "seeded"])
def test_regex_choice_and_format_json(engine, sampling):
    results = _run(engine, [_request(engine, p, guided_spec("regex", r), **sampling) for p, r in REGEXES])
    for (_, regex), (final, _, _) in zip(REGEXES, results, strict=True):
        assert final.stop_reason == StopReason.EOS_TOKEN and re.fullmatch(regex, final.output_text)
    prompts = ["Is 'I love this film' positive or negative?", "Sentiment of 'terrible service, never again'?"]
    assert all(t in CHOICES for t in _texts(engine, prompts, guided_spec("choice", CHOICES), **sampling))
    prompts = ["Return a JSON object with a name and an age.", "Give a JSON object with the key ok set to true."]
    for text in _texts(engine, prompts, guided_spec("format", "JSON"), max_new_tokens=150, **sampling):
        assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("grammar", [GBNF_ARITHMETIC, LARK_ARITHMETIC], ids=["gbnf", "lark"])
def test_arithmetic_grammar_outputs_parse(engine, grammar):
    spec = guided_spec("grammar", grammar)
    assert spec.kind == ("ebnf" if "::=" in grammar else "lark")
    parser = lark.Lark(LARK_ARITHMETIC)
    prompts = ["Write an arithmetic expression.", "What is two plus three? Answer with a formula."]
    for sampling in ({}, {"temperature": 1.0, "seed": 11}):
        for text in _texts(engine, prompts, spec, **sampling):
            parser.parse(text)  # raises if the grammar does not accept it


def test_mixed_batch_leaves_unguided_rows_alone(engine):
    steps = []
    engine.add_step_listener(lambda stats: steps.append(stats.batch_size))
    unguided = [("The capital of France is", {}), ("Tell me a joke.", {"temperature": 0.9, "seed": 5}),
                ("List three colours.", {})]
    alone = [_run(engine, [_request(engine, p, max_new_tokens=24, **s)])[0][1] for p, s in unguided]
    guided = [_request(engine, p, guided_spec("regex", r), max_new_tokens=24) for p, r in REGEXES]
    guided.append(_request(engine, "Pick one.", guided_spec("choice", CHOICES), temperature=0.7, seed=1))
    for r in guided:
        engine.grammars.compile(r.params.guided).result()  # warm, so every request joins the first prefill
    steps.clear()
    mixed = _run(engine, [*guided, *(_request(engine, p, max_new_tokens=24, **s) for p, s in unguided)])
    assert max(steps) == len(guided) + len(unguided)
    assert [tokens for _, tokens, _ in mixed[len(guided):]] == alone


def test_min_new_tokens_and_stop_sequences_still_apply(engine):
    [(final, tokens, _)] = _run(engine, [_request(engine, "Write about dogs.", guided_spec("regex", "[a-z ]+"),
                                                  min_new_tokens=12, max_new_tokens=12)])
    assert final.stop_reason == StopReason.MAX_TOKENS and len(tokens) == 12
    # a grammar that can only end gets its EOS even before min_new_tokens: it stops with EOS_TOKEN
    [(final, tokens, _)] = _run(engine, [_request(engine, "Yes or no?", guided_spec("choice", ["yes", "no"]),
                                                  min_new_tokens=10)])
    assert final.stop_reason == StopReason.EOS_TOKEN and final.output_text in ("yes", "no")
    assert tokens[-1] == engine.eos_token_id and len(tokens) < 10
    [(final, _, _)] = _run(engine, [_request(engine, "Describe a person.", guided_spec("json_schema",
                                                                                       json.dumps(PERSON)),
                                             stop_sequences=['"age"'], include_stop_sequence=False)])
    assert final.stop_reason == StopReason.STOP_SEQUENCE and final.output_text.startswith('{"name": ')


def test_token_details_describe_the_masked_distribution(engine):
    spec = guided_spec("choice", CHOICES)
    [(final, tokens, details)] = _run(engine, [_request(engine, "Sentiment of 'great'?", spec, generated_tokens=True,
                                                        token_logprobs=True, token_ranks=True, top_n_tokens=200)])
    # fewer than 200 tokens are allowed, so top-n lists exactly those: each starts a choice, their probability is 1
    tops = details[0].top_tokens
    assert all(any(c.startswith(engine.tokenizer.decode([t.token_id])) for c in CHOICES) for t in tops)
    assert math.isclose(sum(math.exp(t.logprob) for t in tops), 1.0, rel_tol=1e-4)
    assert details[-1].token_id == engine.eos_token_id and details[-1].logprob == 0.0  # the only allowed token
    assert all(d.rank == 1 for d in details) and final.output_text in CHOICES


def test_bad_specs_are_the_clients_error(engine):
    compile_error = {
        "json_schema": ('{"type": "foo"}', 'invalid guided decoding json_schema: Unsupported type "foo"'),
        "regex": ("[a-", "invalid guided decoding regex: Regex parsing error at position 4: Unclosed '['"),
        "grammar": ('root ::= "a" |', "invalid guided decoding grammar: EBNF parser error at line 1, column 15"),
    }
    for option, (value, message) in compile_error.items():
        with pytest.raises(GuidedSpecError) as info:
            engine.grammars.compile(guided_spec(option, value)).result()
        assert str(info.value).startswith(message)
    with pytest.raises(GuidedSpecError, match="unknown name 'foo'"):
        engine.grammars.compile(guided_spec("grammar", "start: foo")).result()


def test_spec_rules():
    assert guided_spec("format", "TEXT") is None
    assert guided_spec("format", "JSON").kind == "json_object"
    assert guided_spec("grammar", GBNF_ARITHMETIC).kind == "ebnf"
    assert guided_spec("grammar", LARK_ARITHMETIC).kind == "lark"
    for option, value, message in [("choice", [], "Must provide at least two choices"),
                                   ("choice", ["only"], "Must provide at least two choices"),
                                   ("json_schema", "{not json", "json_schema is not valid JSON: Expecting property"),
                                   ("grammar", "  ", "grammar is empty"), ("format", "7", "format '7'")]:
        with pytest.raises(GuidedSpecError, match=re.escape(message)):
            guided_spec(option, value)
    assert guided_spec("regex", "a") == guided_spec("regex", "a")  # hashable and equal: a cache key
    assert choice_grammar(("a\"b", "é\n")) == 'root ::= "a\\"b" | "é\\n"'


def _random_bitmask(batch: int, vocab: int) -> torch.Tensor:
    bits = torch.rand(batch, (vocab + 31) // 32 * 32) < 0.3
    return (bits.view(batch, -1, 32).long() << torch.arange(32)).sum(-1).to(torch.int32)  # wraps like uint32


def test_bitmask_kernels_agree_and_skip_unguided_rows():
    torch.manual_seed(0)
    scores = torch.randn(5, 1000)
    bitmask = _random_bitmask(5, 1000)
    cpu, unpacked = scores.clone(), scores.clone()
    apply_token_bitmask(cpu, bitmask, [0, 2, 3])  # xgrammar's C++ kernel
    unpack_and_apply(unpacked, bitmask, [0, 2, 3])  # what other devices run
    assert torch.equal(cpu, unpacked)
    assert torch.equal(cpu[[1, 4]], scores[[1, 4]])
    allowed = (bitmask[0, 7 // 32] >> (7 % 32)) & 1
    assert (cpu[0, 7] == scores[0, 7]) if allowed else cpu[0, 7] == -math.inf


class _OnlyEos:
    """A guide whose grammar can only end."""

    def fill(self, bitmask, row):
        bitmask[row] = 0
        bitmask[row, 2 // 32] = 1 << 2


def test_grammar_that_can_only_end_gets_eos_back_despite_min_new_tokens():
    scores = torch.randn(3, 64)
    original = scores.clone()
    scores[:, 2] = -math.inf  # min_new_tokens masked EOS (id 2) on every row
    apply_grammars(scores, [_OnlyEos(), None, _OnlyEos()], eos=2, eos_blocked=[0, 1])
    assert scores[0, 2] == 0.0 and torch.isinf(scores[0]).sum() == 63
    assert torch.equal(scores[1, 3:], original[1, 3:]) and scores[1, 2] == -math.inf  # unguided: untouched
    assert torch.isinf(scores[2]).all()  # not EOS-blocked here: the EOS score stays what min_new_tokens left


def test_masks_cover_the_logits_width_not_the_tokenizer(engine):
    """A padded LM head (here 13 rows past the tokenizer, not a multiple of 32): the mask is as wide as the logits
    and never allows the padding rows."""
    width = len(engine.tokenizer) + 13
    compiler = GrammarCompiler(engine.tokenizer, width, engine.eos_token_id)
    try:
        state = GrammarState(compiler.compile(guided_spec("regex", "[a-z]+")).result())
        scores = torch.zeros(1, width)
        apply_grammars(scores, [state], engine.eos_token_id, [])
        assert torch.isinf(scores[0, len(engine.tokenizer):]).all()
        assert (scores[0] == 0).sum() > 20  # the letters' tokens
    finally:
        compiler.close()


def test_compiler_is_lazy_and_caches_by_spec(engine):
    compiler = GrammarCompiler(engine.tokenizer, engine.facts.vocab_size, engine.eos_token_id)
    try:
        assert compiler._compiler is None  # nothing read until a guided request comes
        spec = guided_spec("regex", "[0-9]+")
        first = compiler.compile(spec)
        assert compiler.compile(guided_spec("regex", "[0-9]+")) is first
        first.result()
        failed = compiler.compile(guided_spec("regex", "("))
        assert compiler.compile(guided_spec("regex", "(")) is failed and isinstance(failed.exception(),
                                                                                 GuidedSpecError)
    finally:
        compiler.close()
