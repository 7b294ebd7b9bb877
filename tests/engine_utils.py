"""Helpers to drive the real engine from tests and to compute transformers references."""

from __future__ import annotations

import asyncio
import itertools
import random
from dataclasses import dataclass

import torch

from runtime.engine.async_engine import AsyncEngine
from runtime.engine.config import EngineConfig
from runtime.engine.request import EngineRequest, GenerationParams, RequestOutput

_ids = itertools.count()


def engine_cache(tiny_model, **defaults):
    """A module fixture's body: `get(name, **cfg)` builds (once per configuration) an engine on the tiny model
    `name`; every engine is shut down when the fixture ends."""
    cache: dict[str, AsyncEngine] = {}

    def get(name: str, **cfg) -> AsyncEngine:
        cfg = {**defaults, **cfg}
        key = f"{name}{sorted(cfg.items())}"
        if key not in cache:
            cache[key] = AsyncEngine(EngineConfig(model_path=str(tiny_model(name)), **cfg))
        return cache[key]

    yield get
    for engine in cache.values():
        engine.shutdown()


@dataclass
class Result:
    outputs: list[RequestOutput]

    @property
    def final(self) -> RequestOutput:
        return self.outputs[-1]

    @property
    def token_ids(self) -> list[int]:
        return [t for o in self.outputs for t in o.new_token_ids]

    @property
    def streamed_text(self) -> str:
        return "".join(o.text for o in self.outputs)


def request(engine: AsyncEngine, text: str, **params) -> EngineRequest:
    ids = engine.tokenizer(text)["input_ids"]
    return EngineRequest(f"t{next(_ids)}", ids, GenerationParams(**params))


async def collect(engine: AsyncEngine, req: EngineRequest) -> Result:
    return Result([out async for out in engine.generate(req)])


def run(engine: AsyncEngine, reqs: list[EngineRequest], join_after_steps: list[int] | None = None) -> list[Result]:
    """Run requests concurrently; request i is submitted once the engine has done `join_after_steps[i]` steps,
    so requests join a batch that is already running."""
    steps = [0]
    engine.add_step_listener(lambda s: steps.__setitem__(0, steps[0] + 1))

    async def one(i: int, req: EngineRequest) -> Result:
        wait = join_after_steps[i] if join_after_steps else 0
        start = steps[0]
        while steps[0] - start < wait:
            await asyncio.sleep(0.0005)
        return await collect(engine, req)

    async def main():
        return await asyncio.gather(*(one(i, r) for i, r in enumerate(reqs)))

    try:
        return asyncio.run(asyncio.wait_for(main(), timeout=240))
    finally:
        engine.listeners.pop()


def break_sampling(monkeypatch, top_k: int = 13) -> None:
    """Sampling raises for every batch that holds a row with this top_k (stands for any parameter combination that
    raises)."""
    from runtime.engine.sampler import Sampler

    original = Sampler.launch

    def fragile(self, logits, rows):
        if any(r.params.top_k == top_k for r in rows):
            raise RuntimeError("boom")
        return original(self, logits, rows)

    monkeypatch.setattr(Sampler, "launch", fragile)


def cancellation_storm(engine: AsyncEngine, prompts: list[str], streams: int, seed: int, max_stop: int) -> None:
    """`streams` requests of 200 forced tokens, each cancelled by its client after 0..max_stop tokens; returns once
    the engine has applied every abort (they are messages): nothing running, waiting or in flight."""
    rng = random.Random(seed)
    core = engine.core

    async def one(i: int) -> None:
        text = prompts[i % len(prompts)] * (1 + i % 4)
        gen = engine.generate(request(engine, text, max_new_tokens=200, min_new_tokens=200))
        stop_at = rng.randint(0, max_stop)
        async for out in gen:
            if out.generated_token_count >= stop_at:
                break
        await gen.aclose()

    async def storm() -> None:
        await asyncio.gather(*(one(i) for i in range(streams)))
        for _ in range(200):
            if not core.scheduler.running and not core.scheduler.waiting and core.in_flight is None:
                break
            await asyncio.sleep(0.01)

    asyncio.run(asyncio.wait_for(storm(), 120))
    assert not core.scheduler.running and not core.scheduler.waiting and core.in_flight is None


_references: dict[tuple[str, torch.dtype], torch.nn.Module] = {}


def reference_model(engine: AsyncEngine) -> torch.nn.Module:
    """The transformers model the engine's output is checked against: the engine's own model object when it runs
    one, else (native engine) the same checkpoint loaded by transformers in the same dtype."""
    lm = engine.core.loaded
    if hasattr(lm.model, "generate"):
        return lm.model
    key = (engine.core.config.model_path, lm.dtype)
    if key not in _references:
        from transformers import AutoModelForCausalLM

        _references[key] = AutoModelForCausalLM.from_pretrained(key[0], dtype=lm.dtype).to(lm.device).eval()
    return _references[key]


def hf_greedy(engine: AsyncEngine, input_ids: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    """transformers' own greedy generation for the same weights (the reference)."""
    lm = engine.core.loaded
    ids = torch.tensor([input_ids], device=lm.device)
    with torch.inference_mode():
        out = reference_model(engine).generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                               pad_token_id=lm.pad_token_id, eos_token_id=lm.eos_token_id, **kwargs)
    return out[0, (1 if lm.is_encoder_decoder else ids.shape[1]):].tolist()


def transformers_greedy_texts(model_dir, prompts: list[str], max_new_tokens: int, min_new_tokens: int = 0) -> list[str]:
    """What transformers' own float32 greedy `generate` writes after each prompt (special tokens dropped, as the
    server does): the reference for servers' answers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = []
    for text in prompts:
        ids = tok(text, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        texts.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return texts
