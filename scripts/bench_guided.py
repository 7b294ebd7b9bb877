"""Guided decoding's cost per engine step: the same chat workload with and without a grammar, in-process engine.

    python scripts/bench_guided.py [--option json_schema] [--requests 32] [--concurrency 16] [--rounds 2]
Runs guided and unguided rounds alternately (the machine's noise hits both alike); each unguided request is forced
to the length its guided twin reached, so both modes generate the same tokens per request and batches evolve alike.
Prints, per mode, output tokens/s, the mean decode-step time at full batch and its token-processing part (sampling,
grammar masks, detokenization).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from runtime.default_model import ensure_default_model  # noqa: E402
from runtime.engine.async_engine import AsyncEngine  # noqa: E402
from runtime.engine.config import EngineConfig  # noqa: E402
from runtime.engine.guided_spec import example_spec  # noqa: E402
from runtime.engine.request import EngineRequest, GenerationParams  # noqa: E402

PROMPTS = ["Describe a fictional person as JSON.", "Invent a character and give their details as JSON.",
           "Give me a JSON profile of a famous painter.", "Create a JSON record for a new employee.",
           "Describe a football player in JSON.", "A JSON description of a young scientist.",
           "Write a JSON entry for a chef who lives in Paris.", "Profile of a musician, as JSON."]


def run_round(engine: AsyncEngine, spec, lengths: list[int] | None, args, tag: str) -> tuple[dict, list[int]]:
    """One round of `args.requests` requests: guided (`spec`, up to max_new_tokens) or forced to `lengths`."""
    steps = []
    engine.add_step_listener(steps.append)
    tok = engine.tokenizer
    ids = [tok(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                       tokenize=False))["input_ids"] for p in PROMPTS]

    async def main() -> int:
        sem = asyncio.Semaphore(args.concurrency)

        async def one(i: int) -> int:
            n = args.max_new_tokens if lengths is None else lengths[i]
            req = EngineRequest(f"{tag}-{i}", ids[i % len(ids)], GenerationParams(
                max_new_tokens=n, min_new_tokens=0 if lengths is None else n, guided=spec, temperature=0.7, seed=i))
            async with sem:
                async for out in engine.generate(req):
                    if out.error:
                        raise RuntimeError(out.error)
            return out.generated_token_count

        return list(await asyncio.gather(*(one(i) for i in range(args.requests))))

    t0 = time.perf_counter()
    counts = asyncio.run(main())
    duration = time.perf_counter() - t0
    engine.listeners.remove(steps.append)
    full = [s for s in steps if s.method == "next_token" and s.batch_size == args.concurrency]
    return {"tokens_per_s": sum(counts) / duration, "step_ms": 1e3 * statistics.fmean(s.duration_s for s in full),
            "tokproc_ms": 1e3 * statistics.fmean(s.tokproc_s for s in full), "full_steps": len(full)}, counts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--option", default="json_schema", help="format | json_schema | regex | choice | grammar")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    engine = AsyncEngine(EngineConfig(model_path=str(ensure_default_model()), dtype="float32",
                                      max_batch_size=args.concurrency))
    spec = example_spec(args.option)
    engine.grammars.compile(spec).result()  # compile cost is not a per-step cost
    results: dict[str, list[dict[str, float]]] = {"guided": [], "unguided": []}
    try:
        run_round(engine, None, [8] * args.requests, args, "warm")
        for r in range(args.rounds):
            guided, lengths = run_round(engine, spec, None, args, f"guided{r}")
            results["guided"].append(guided)
            results["unguided"].append(run_round(engine, None, lengths, args, f"unguided{r}")[0])
    finally:
        engine.shutdown()
    for mode, rounds in results.items():
        med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
        print(f"{mode:9s} {args.option}: {med['tokens_per_s']:.1f} tokens/s, full-batch step {med['step_ms']:.1f} ms "
              f"(token processing {med['tokproc_ms']:.2f} ms, {med['full_steps']:.0f} steps)")


if __name__ == "__main__":
    main()
