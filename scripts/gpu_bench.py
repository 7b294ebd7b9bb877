"""GPU check and benchmark for the transformers engine (the native one: scripts/gpu_native.py): correctness against a
CPU/fp32 reference first, then timings.

Run on a CUDA machine from the repository root:
    python scripts/gpu_bench.py --out results.json

1. Correctness: a small random Llama with a real (offline-trained) tokenizer; transformers' greedy `generate` on CPU
   in float32 is the reference. The engine on CUDA in float32, with requests joining and leaving a running batch,
   must give the same tokens; in bfloat16 the share of identical tokens is reported (bf16 legitimately diverges).
2. Timing: random-weight models with real architectures' shapes (no downloads on these machines), bfloat16:
   batch-1 decode latency (ms/token) and a continuous-batching throughput workload via `runtime.bench`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from runtime.bench import Workload, bench_engine  # noqa: E402
from runtime.engine.async_engine import AsyncEngine  # noqa: E402
from runtime.engine.config import EngineConfig  # noqa: E402
from runtime.engine.request import EngineRequest, GenerationParams  # noqa: E402
from runtime.models.loader import LoadedModel  # noqa: E402

PROMPTS = ["Hello world, this is", "def f(x):\n    return", "The quick brown fox jumps over the lazy dog and",
           "import os\nimport sys\n", "for i in range(10):", "If the object is a class instance", "x", "The built-in"]

SHAPES = {  # Llama-family shapes (hidden, layers, heads, kv heads, intermediate, vocab)
    "llama-1b": (2048, 16, 32, 8, 8192, 128256),
    "llama-8b": (4096, 32, 32, 8, 14336, 128256),
}


def workload(requests: int) -> Workload:
    """The timing workload (shared with scripts/gpu_server_bench.py so the two are comparable)."""
    return Workload(requests, (64, 512), (64, 256), 64, 0)


def run_requests(engine: AsyncEngine, reqs: list[EngineRequest]) -> list[list[int]]:
    async def one(i: int, req: EngineRequest) -> list[int]:
        await asyncio.sleep(0.002 * i)  # staggered arrival: requests join a running batch
        return [t async for out in engine.generate(req) for t in out.new_token_ids]

    async def main():
        return await asyncio.gather(*(one(i, r) for i, r in enumerate(reqs)))

    return asyncio.run(main())


def correctness(work: Path, n_new: int = 32) -> dict:
    import models as tiny
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny.llama_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    path = work / "check-llama"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    refs = []
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        refs.append(out[0, ids.shape[1]:].tolist())
    report = {}
    for dtype in ("float32", "bfloat16"):
        engine = AsyncEngine(EngineConfig(model_path=str(path), dtype=dtype, device="cuda", max_waiting_tokens=1,
                                          engine="transformers"))
        try:
            reqs = [EngineRequest(f"{dtype}-{i}", tok(p)["input_ids"],
                                  GenerationParams(max_new_tokens=n_new, min_new_tokens=n_new))
                    for i, p in enumerate(PROMPTS)]
            got = run_requests(engine, reqs)
        finally:
            engine.shutdown()
        same = sum(a == b for g, r in zip(got, refs, strict=True) for a, b in zip(g, r, strict=True))
        report[dtype] = {"identical_sequences": sum(g == r for g, r in zip(got, refs, strict=True)),
                         "sequences": len(refs), "identical_tokens": same, "tokens": n_new * len(refs)}
    report["ok"] = report["float32"]["identical_sequences"] == len(refs)
    return report


def random_model(work: Path, name: str) -> tuple[Path, LoadedModel]:
    """A random-weight model of a real shape built on the GPU (saving 16 GB only to reload it would waste device
    time); its directory holds just config and tokenizer (the tiny Llama tokenizer; ids stay below its vocab)."""
    import models as tiny
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv, inter, vocab = SHAPES[name]
    tok = tiny.llama_tokenizer()
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    path = work / name
    cfg.save_pretrained(path)
    tok.save_pretrained(path)
    loaded = LoadedModel(model, tok, torch.device("cuda"), torch.bfloat16, False, tok.eos_token_id,
                         tok.pad_token_id, None, vocab)
    return path, loaded


def decode_latency(engine: AsyncEngine, n_new: int = 128) -> float:
    """ms per output token for one request alone (batch 1), after a warm-up."""
    def once() -> float:
        req = EngineRequest(f"lat-{time.perf_counter_ns()}", list(range(100, 116)),
                            GenerationParams(max_new_tokens=n_new, min_new_tokens=n_new))
        t0 = time.perf_counter()
        run_requests(engine, [req])
        return (time.perf_counter() - t0) / n_new * 1000

    once()
    return min(once() for _ in range(2))


def step_breakdown(steps: list, wall_s: float) -> dict:
    """Where the engine's time went: per method count, mean batch, mean step time; busy share of the wall time."""
    out: dict = {"busy_fraction": sum(s.duration_s for s in steps) / wall_s}
    for method in ("prefill", "next_token"):
        chosen = [s for s in steps if s.method == method]
        if chosen:
            out[method] = {"steps": len(chosen), "mean_batch": sum(s.batch_size for s in chosen) / len(chosen),
                           "mean_ms": 1000 * sum(s.duration_s for s in chosen) / len(chosen),
                           "total_s": sum(s.duration_s for s in chosen)}
    return out


def script_args(default_out: str, parser: argparse.ArgumentParser | None = None) -> tuple[argparse.Namespace, dict]:
    """Options both GPU scripts take, and the results header (which device, which torch)."""
    ap = parser or argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(default_out))
    ap.add_argument("--requests", type=int, default=128)
    return ap.parse_args(), {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="llama-1b,llama-8b")
    args, results = script_args("gpu_bench.json", ap)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results["correctness"] = correctness(work)
        print(json.dumps(results["correctness"]), flush=True)
        for name in args.shapes.split(","):
            path, loaded = random_model(work, name)
            engine = AsyncEngine(EngineConfig(model_path=str(path), dtype="bfloat16", device="cuda",
                                              max_batch_size=64, max_num_batched_tokens=16384,
                                              engine="transformers"), loaded)
            try:
                entry = {"decode_ms_per_token_bs1": decode_latency(engine)}
                steps: list = []
                engine.add_step_listener(steps.append)
                entry["throughput"] = bench_engine(engine, workload(args.requests))
                entry["steps"] = step_breakdown(steps, entry["throughput"]["duration_s"])
            finally:
                engine.shutdown()
            results[name] = entry
            print(name, json.dumps(entry), flush=True)
            del engine, loaded
            torch.cuda.empty_cache()
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
