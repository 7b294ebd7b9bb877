"""The native engine on one GPU: correctness against transformers on the same GPU first, then timings.

Run on a CUDA machine from the repository root (one call; wheels the image lacks are carried in .whl):
    python scripts/gpu_native.py --out $OUT/native.json [--phases correctness,decode,throughput,prefix,server,hf]

Phases (JSON report, one key each):
- correctness: small random Llama and Qwen3 configs; greedy, 32 forced tokens, 8 prompts joining a running batch;
  native == transformers `generate` on the same GPU: float32 token for token, bfloat16 share of identical tokens;
  CUDA graphs on and off, chunked prefill (small token budget), a prefix-cache hit (the same prompts again), LoRA
  rows and prompt-prefix rows in the batch.
- decode: batch-1 decode of the Llama-3-8B shape (dummy weights, bf16), 128-token prompt, 256 new tokens, with the
  synchronous loop and with async scheduling, beside the floor measured in the same run: weight bytes read per
  step / device-to-device copy bandwidth.
- throughput: 256 requests, prompt and output lengths uniform in [100, 1024] (seed 0, outputs forced), all at once
  and 128 in flight, then all at once with joins at once (MAX_WAITING_TOKENS=1 instead of TGIS' min-join rule);
  with async scheduling, then the synchronous loop. Every run's prompts start with an id of their own, so no run
  finds another's prompts in the prefix cache. `throughput_sync`: the synchronous loop's runs too.
- hf: the same workload through the transformers engine (in-process, random weights of the same shape).
- prefix: a 2,000-token shared system prompt + 64 short questions, prefill time with prefix caching on and off.
- server: `tgis serve` over gRPC (GenerateStream) at 32 and 128 concurrent streams: TTFT and inter-token latency
  p50/p99, and throughput against the in-process engine on the same workload; `server_join`: the same with joins
  at once.
- coldstart: a fresh engine's first steps at 32 in flight (joins at once): the steps slower than 0.1 s, and the JIT
  compilations during the run.
- fp8: `--kv-cache-dtype fp8` against the model's dtype on the small Llama (identical greedy tokens), then the
  offline workload all at once (TGIS' min-join rule, then joins at once).
- profile, profile_compiled, decode_compiled: where a batch-128 decode step's time goes (graph replay, engine step
  synchronous and async, the calls that make the host wait, host and device profiles); batch-1 decode compiled;
  profile_bs1: the same profile at batch 1 (compiled).
- kernels: the decode attention kernel alone on one layer of the 8B shape (batch 128 x 1,024 tokens, 32 x 2,048
  and 1 x 2,048), a bfloat16 cache, then a float8 cache over launch options (keys per tile, warps, pipeline stages,
  splits): time, the cache bytes read per second, and the output's largest difference from the first run's.
- gemv: the batch-1 projections of the 8B shape, cuBLAS against the Triton GEMV over its launch options;
  decode_cublas: batch-1 decode with cuBLAS for every projection (the GEMV's A/B against `decode`).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import itertools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from runtime.engine.async_engine import AsyncEngine  # noqa: E402
from runtime.engine.config import EngineConfig  # noqa: E402
from runtime.engine.lora import LoraRef  # noqa: E402
from runtime.engine.request import EngineRequest, GenerationParams  # noqa: E402
from runtime.models.prefixes import PromptPrefix  # noqa: E402

PROMPTS = ["Hello world, this is", "def f(x):\n    return", "The quick brown fox jumps over the lazy dog and",
           "import os\nimport sys\n", "for i in range(10):", "If the object is a class instance", "x", "The built-in"]
DEVICE = "cuda"  # --dry-run: cpu, with a small shape and few requests, to check the script before a GPU call
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256)


def log(*args) -> None:
    print(*args, flush=True)


def write_model(path: Path, model_type: str, dtype=torch.float32, weights: bool = True, **shape):
    """A random model directory with the offline-trained Llama tokenizer (config only when not `weights`)."""
    import models as tiny
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = tiny.llama_tokenizer()
    cfg = AutoConfig.for_model(model_type, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id, max_position_embeddings=4096,
                               tie_word_embeddings=False, **shape)
    cfg.save_pretrained(path)
    tok.save_pretrained(path)
    if weights:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
        model.save_pretrained(path)
        return tok, model
    return tok, None


async def _collect(engine, req: EngineRequest, delay: float = 0.0) -> list[int]:
    await asyncio.sleep(delay)
    return [t async for out in engine.generate(req) for t in out.new_token_ids]


def token_details(engine, reqs: list[EngineRequest]) -> list[list]:
    """Each request's generated-token details, all requests at once."""
    async def one(req):
        return [d async for out in engine.generate(req) for d in out.tokens]

    async def main():
        return await asyncio.gather(*(one(r) for r in reqs))

    return asyncio.run(main())


def run_all(engine, reqs: list[EngineRequest], stagger: float = 0.002) -> list[list[int]]:
    async def main():
        return await asyncio.gather(*(_collect(engine, r, stagger * i) for i, r in enumerate(reqs)))

    return asyncio.run(main())


# ---- correctness --------------------------------------------------------------------------------------------
def correctness(work: Path, n_new: int = 32) -> dict:
    from lora_utils import merged_copy, write_lora

    report = {}
    configs = {"llama": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                             num_key_value_heads=4),
               "qwen3": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                             num_key_value_heads=4, head_dim=64)}
    for name, shape in configs.items():
        path = work / f"check-{name}"
        tok, model = write_model(path, name, **shape)
        lora_weights = write_lora(work / f"lora-{name}", model, ["q_proj", "v_proj", "down_proj"], 1)
        prefix = torch.randn(5, shape["hidden_size"], generator=torch.Generator().manual_seed(3)) * 0.5
        for dtype in ("float32", "bfloat16"):
            dt = getattr(torch, dtype)
            ref_model = copy.deepcopy(model).to(DEVICE, dt)
            merged = merged_copy(model, lora_weights).to(DEVICE, dt)
            ids = [tok(p)["input_ids"] for p in PROMPTS]
            with torch.inference_mode():
                refs = [ref_model.generate(torch.tensor([i], device=DEVICE), max_new_tokens=n_new,
                                           min_new_tokens=n_new, do_sample=False, pad_token_id=tok.pad_token_id)
                        [0, len(i):].tolist() for i in ids]
                lora_refs = [merged.generate(torch.tensor([i], device=DEVICE), max_new_tokens=n_new,
                                             min_new_tokens=n_new, do_sample=False, pad_token_id=tok.pad_token_id)
                             [0, len(i):].tolist() for i in ids[:4]]
                prefix_refs = []
                for i in ids[4:]:
                    emb = ref_model.get_input_embeddings()(torch.tensor([i], device=DEVICE))
                    embeds = torch.cat([prefix.to(DEVICE, dt)[None], emb], dim=1)
                    out = ref_model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2],
                                             dtype=torch.long, device=DEVICE), max_new_tokens=n_new,
                                             min_new_tokens=n_new, do_sample=False, pad_token_id=tok.pad_token_id)
                    prefix_refs.append(out[0].tolist())
            for variant, extra in (("graphs", {}), ("eager", {"cuda_graphs": False}),
                                   ("chunked", {"max_num_batched_tokens": 16})):
                engine = AsyncEngine(EngineConfig(model_path=str(path), dtype=dtype, device=DEVICE, engine="native",
                                                  max_waiting_tokens=1, debug_checks=True, kv_cache_tokens=65536,
                                                  **extra))
                try:
                    def reqs(tag, ids=ids):
                        return [EngineRequest(f"{tag}-{j}", i, GenerationParams(max_new_tokens=n_new,
                                              min_new_tokens=n_new)) for j, i in enumerate(ids)]

                    first = run_all(engine, reqs("a"))
                    again = run_all(engine, reqs("b"))  # full prompt blocks are now cached
                    hits = engine.core.kv.counters.hits
                    mixed = reqs("c")
                    for r in mixed[:4]:
                        r.lora = LoraRef("lora", str(work / f"lora-{name}"))
                    for r in mixed[4:]:
                        r.prefix = PromptPrefix(prefix.to(dt), None, tok.pad_token_id, False, "tuned")
                    special = run_all(engine, mixed)
                finally:
                    engine.shutdown()
                    release()
                exact = [g == r for g, r in zip(first, refs, strict=True)]
                same = sum(a == b for g, r in zip(first, refs, strict=True) for a, b in zip(g, r, strict=True))
                report[f"{name}/{dtype}/{variant}"] = {
                    "identical_sequences": sum(exact), "identical_tokens": same, "tokens": n_new * len(refs),
                    "cache_hit_same_as_miss": again == first, "prefix_cache_hit_tokens": hits,
                    "lora_identical": sum(g == r for g, r in zip(special[:4], lora_refs, strict=True)),
                    "prompt_prefix_identical": sum(g == r for g, r in zip(special[4:], prefix_refs, strict=True))}
                log(name, dtype, variant, json.dumps(report[f"{name}/{dtype}/{variant}"]))
    fp32 = [v for k, v in report.items() if "float32" in k]
    report["ok"] = all(v["identical_sequences"] == len(PROMPTS) and v["cache_hit_same_as_miss"]
                       and v["lora_identical"] == 4 and v["prompt_prefix_identical"] == 4 for v in fp32)
    return report


def fp8_agreement(work: Path, n_new: int = 32) -> dict:
    """A float8 KV cache against the model's own dtype on the small random Llama (bfloat16), native engine both:
    the share of identical greedy tokens (a random model's near-tied logits flip on rounding) and the largest
    logprob difference of the first token (before any divergence)."""
    path = work / "check-llama"
    if not (path / "config.json").exists():
        write_model(path, "llama", hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                    num_key_value_heads=4)
    out = {}
    for kv in ("auto", "fp8"):
        engine = AsyncEngine(EngineConfig(model_path=str(path), dtype="bfloat16", device=DEVICE, engine="native",
                                          kv_cache_dtype=kv, max_waiting_tokens=1, debug_checks=True,
                                          kv_cache_tokens=65536))
        try:
            reqs = [EngineRequest(f"fp8-{kv}-{i}", engine.tokenizer(p)["input_ids"],
                                  GenerationParams(max_new_tokens=n_new, min_new_tokens=n_new, generated_tokens=True,
                                                   token_logprobs=True)) for i, p in enumerate(PROMPTS)]
            out[kv] = token_details(engine, reqs)
        finally:
            engine.shutdown()
            release()
    same = sum(a.token_id == b.token_id for x, y in zip(out["auto"], out["fp8"], strict=True)
               for a, b in zip(x, y, strict=True))
    first = max(abs(x[0].logprob - y[0].logprob) for x, y in zip(out["auto"], out["fp8"], strict=True))
    return {"identical_tokens": same, "tokens": n_new * len(PROMPTS), "first_token_logprob_max_diff": first}


# ---- timings ------------------------------------------------------------------------------------------------
def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (median of 20 after warm-up)."""
    size = 2 * 1024**3 if DEVICE == "cuda" else 64 * 1024**2
    src = torch.empty(size, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    times = []
    for i in range(25):
        sync()
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        if i >= 5:
            times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * size / statistics.median(times)


def release() -> None:
    """Give the device memory of engines that were shut down back before the next one sizes its KV cache."""
    import gc

    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def big_engine(path: Path, **extra) -> AsyncEngine:
    cfg = dict(model_path=str(path), dtype="bfloat16", device=DEVICE, engine="native", load_format="dummy",
               max_batch_size=256, max_sequence_length=2304)
    cfg.update(extra)
    return AsyncEngine(EngineConfig(**cfg))


def decode_phase(path: Path, engine: AsyncEngine) -> dict:
    model = engine.core.loaded.model
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.embed_tokens.weight
    read_per_step = weight_bytes - embed.numel() * embed.element_size() + embed.shape[1] * embed.element_size()
    if model.config.tie_word_embeddings:
        read_per_step += embed.numel() * embed.element_size()
    bandwidth = copy_bandwidth()
    prompt = [random.Random(1).randrange(16, 1000) for _ in range(128)]

    def once(tag: str, batch: int = 1) -> float:
        """Median time between two decode steps' read-backs: per-token latency whether or not the host plans a step
        while the one before runs (a step's own duration then spans two). `batch` rows decode together."""
        reqs = [EngineRequest(f"{tag}-{i}", prompt[i:] + prompt[:i], GenerationParams(max_new_tokens=256,
                                                                                      min_new_tokens=256))
                for i in range(batch)]
        done: list[float] = []
        engine.add_step_listener(lambda s: done.append(time.perf_counter()) if s.method == "next_token" else None)
        run_all(engine, reqs, stagger=0)
        engine.listeners.pop()
        return statistics.median(b - a for a, b in itertools.pairwise(done)) * 1000

    floor = read_per_step / bandwidth * 1000
    out = {"floor_ms": floor, "copy_bandwidth_TBps": bandwidth / 1e12, "weight_bytes_read_per_step": read_per_step,
           "matmuls_only_ms": matmuls_only_ms(model)}
    for mode in (False, True):  # synchronous loop, then async scheduling
        engine.core.plan_ahead = mode
        once("warm")
        ms = min(once(f"lat-{i}") for i in range(3))
        key = "async" if mode else "sync"
        out[f"ms_per_token_{key}"], out[f"ratio_to_floor_{key}"] = ms, ms / floor
    for batch in (2, 4, 8, 16):  # small batches (async): ms per step
        once(f"warm{batch}", batch)
        out[f"ms_per_step_batch{batch}"] = min(once(f"b{batch}-{i}", batch) for i in range(2))
    return out


def matmuls_only_ms(model) -> float | None:
    """The step's weight matmuls alone at batch 1 (every projection of every layer, through the kernel the engine
    uses for one row, and the LM head, replayed from one CUDA graph): the practical floor under the bandwidth floor."""
    if DEVICE != "cuda":
        return None
    projections = [p for layer in model.projections() for p in layer.values()] + [model.lm_head]
    inputs = {p.weight.shape[1]: torch.randn(1, p.weight.shape[1], dtype=p.weight.dtype, device=DEVICE)
              for p in projections}

    def step():
        for p in projections:
            x = inputs[p.weight.shape[1]]
            p.matvec(x, p.weight) if p.matvec is not None else torch.nn.functional.linear(x, p.weight)

    step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        graph.replay()
    end.record()
    sync()
    return start.elapsed_time(end) / 20


def offline_workload(n: int = 256, seed: int = 0, short: bool = False) -> list[tuple[list[int], int]]:
    """Prompt and output lengths uniform in [100, 1024] (`short`: [10, 40], for dry runs)."""
    rng = random.Random(seed)
    lo, hi = (10, 40) if short else (100, 1024)
    return [([rng.randrange(16, 1000) for _ in range(rng.randint(lo, hi))], rng.randint(lo, hi)) for _ in range(n)]


_RUNS = iter(range(1, 10**6))


def salted(items):
    """The workload with prompts that start with an id of this run's own, so that a run never finds an earlier
    run's prompts in the prefix cache (runs on one engine or server each compute every prompt)."""
    salt = 1000 + next(_RUNS)
    return [([salt, *ids[1:]], n) for ids, n in items]


def throughput(engine: AsyncEngine, items, tag: str, concurrency: int | None = None,
               slow_steps_s: float | None = None) -> dict:
    """`slow_steps_s`: also list the steps slower than that, with the JIT compilations (Triton kernels, dynamo
    frames) that ran during the run, by time since its start, to tell a compile from a slow step."""
    steps: list = []
    ends: list[float] = []
    compiles: list = []
    engine.add_step_listener(lambda s: (steps.append(s), ends.append(time.perf_counter())))
    reqs = [EngineRequest(f"{tag}-{i}", ids, GenerationParams(max_new_tokens=n, min_new_tokens=n))
            for i, (ids, n) in enumerate(salted(items))]
    if slow_steps_s is not None:
        watch_compiles(compiles)

    async def main():
        sem = asyncio.Semaphore(concurrency or len(reqs))

        async def one(r):
            async with sem:
                return await _collect(engine, r)

        return await asyncio.gather(*(one(r) for r in reqs))

    t0 = time.perf_counter()
    outs = asyncio.run(main())
    wall = time.perf_counter() - t0
    engine.listeners.pop()
    generated = sum(len(o) for o in outs)
    decode = [s for s in steps if s.method == "next_token"]
    out = {"generated_tokens": generated, "wall_s": wall, "generated_tok_per_s": generated / wall,
           "steps": len(steps), "decode_steps": len(decode),
           "mean_decode_host_launch_ms": 1000 * statistics.fmean(s.forward_s for s in decode) if decode else None,
           "mean_decode_tokproc_ms": 1000 * statistics.fmean(s.tokproc_s for s in decode) if decode else None,
           "mean_decode_batch": statistics.fmean(s.batch_size for s in decode) if decode else None,
           "prefix_cache_hit_tokens": sum(s.prefix_cache_hits for s in steps),
           "async_scheduling": engine.core.plan_ahead, **wall_by_kind(steps, ends, t0)}
    if slow_steps_s is not None:
        watch_compiles(None)
        out["slow_steps"] = [{"step": i, "method": s.method, "rows": s.batch_size, "prompt_rows": s.prompt_rows,
                              "tokens": s.scheduled_tokens, "s": s.duration_s, "ended_at_s": ends[i] - t0}
                             for i, s in enumerate(steps) if s.duration_s > slow_steps_s]
        out["compiles"] = [{"at_s": at - t0, "what": what} for at, what in compiles if at >= t0]
    return out


def wall_by_kind(steps, ends: list[float], t0: float) -> dict:
    """The run's wall time split by the kind of step that ended each interval (steps overlap under async
    scheduling: the time between two steps' ends is the later one's share), with the rows and tokens they carried."""
    out: dict = {}
    for step, start, end in zip(steps, [t0, *ends], ends, strict=False):
        kind = "prefill_only" if not step.decode_rows else "mixed" if step.prompt_rows else "decode_only"
        acc = out.setdefault(kind, {"steps": 0, "wall_s": 0.0, "rows": 0, "tokens": 0})
        acc["steps"] += 1
        acc["wall_s"] += end - start
        acc["rows"] += step.batch_size
        acc["tokens"] += step.scheduled_tokens
    return {"wall_by_step_kind": out}


_WATCHING = [False]


def watch_compiles(into: list | None) -> None:
    """Record (time, what) into `into` for every Triton kernel and every dynamo frame compiled; None: stop."""
    import triton

    if into is None:
        _WATCHING[0] = False
        return
    _WATCHING[0] = True

    def note(what: str) -> None:
        if _WATCHING[0]:
            into.append((time.perf_counter(), what))

    triton.knobs.runtime.jit_post_compile_hook = lambda **kw: note(f"triton {kw['fn'].name}")
    try:
        from torch._dynamo.callback import callback_handler

        callback_handler.register_start_callback(lambda *a: note("dynamo compile"))
    except (ImportError, AttributeError) as exc:  # another torch: the Triton hook still reports
        log("dynamo compile callbacks unavailable:", exc)


def decode_and_throughput(engine: AsyncEngine, path: Path, items, phases: list[str], record) -> None:
    """The phases that share one engine: batch-1 decode, then the offline workload all at once and 128 in flight,
    then the same with joins at once (MAX_WAITING_TOKENS=1): what TGIS' min-join rule costs."""
    if "decode" in phases:
        record("decode_bs1", decode_phase(path, engine))
    if "throughput" in phases:
        for mode in (True, False) if "throughput_sync" in phases else (True,):  # async (CUDA's default), sync
            engine.core.plan_ahead = mode
            key = "" if mode else "_sync"
            engine.core.config.max_waiting_tokens = 24
            record(f"throughput_native{key}", throughput(engine, items, f"native{key}"))
            record(f"throughput_native_c128{key}", throughput(engine, items, f"native128{key}", concurrency=128))
            engine.core.config.max_waiting_tokens = 1
            record(f"throughput_native_c256_join_at_once{key}", throughput(engine, items, f"join256{key}"))


def sync_points(core, steps: int = 10) -> dict:
    """Calls that make the host wait for the GPU, per engine step (torch's CUDA sync debug mode), by the innermost
    frame of ours that made them: async scheduling needs exactly one, the read-back of the step before."""
    import collections
    import traceback
    import warnings

    where: collections.Counter = collections.Counter()

    def show(message, category, filename, lineno, file=None, line=None):
        ours = [f for f in traceback.extract_stack()[:-1] if f"{os.sep}runtime{os.sep}" in f.filename]
        where[f"{ours[-1].filename.split('runtime' + os.sep)[-1]}:{ours[-1].lineno}" if ours else filename] += 1

    if DEVICE != "cuda":
        return {}
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                core.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return {"per_step": sum(where.values()) / steps, "where": dict(where)}


def profile_phase(path: Path, batch: int = 128, compile_model: bool = False) -> dict:
    """Where a decode step's time goes at `batch` rows: the graph replay alone (device events), whole engine steps
    (wall), the host part (cProfile, top functions) and the device kernels (torch.profiler, top by CUDA time)."""
    import cProfile
    import io
    import pstats

    from runtime.engine.core import EngineCore

    core = EngineCore(EngineConfig(model_path=str(path), dtype="bfloat16", device=DEVICE, engine="native",
                                   load_format="dummy", max_batch_size=256, max_sequence_length=2304,
                                   compile=compile_model))
    try:
        rng = random.Random(2)
        for i in range(batch):
            core.add(EngineRequest(f"p{i}", [rng.randrange(16, 1000) for _ in range(512)],
                                   GenerationParams(max_new_tokens=1500, min_new_tokens=1500)))
        core._drain_inbox(block=False)
        while len(core.scheduler.running) < batch or any(s.to_compute > 1 for s in core.scheduler.running):
            core.step()
        for _ in range(5):
            core.step()
        sync()
        graphs = core.runner.graphs
        out: dict = {"batch": batch, "compile": compile_model}
        if graphs is not None:
            size = next(s for s in graphs.sizes if s >= batch)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                graphs.graphs[size].replay()
            end.record()
            sync()
            out["graph_replay_ms"] = start.elapsed_time(end) / 20
        for mode in (False, True):  # the synchronous loop, then async scheduling
            core.plan_ahead = mode
            core.step()
            t0 = time.perf_counter()
            for _ in range(20):
                core.step()
            sync()
            out[f"engine_step_ms_{'async' if mode else 'sync'}"] = (time.perf_counter() - t0) * 1000 / 20
        out["sync_points"] = sync_points(core)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(20):
            core.step()
        sync()
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
        out["host_profile"] = text.getvalue()[-6000:]
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            for _ in range(5):
                core.step()
            sync()
        out["device_profile"] = p.key_averages().table(sort_by="cuda_time_total", row_limit=25)[-8000:]
        return out
    finally:
        core.shutdown()
        core.runner.close()
        del core
        release()


def replayed_us(call, reps: int = 20, repeats: int = 5) -> float:
    """Device time of one `call`: `reps` calls captured in one CUDA graph (no launch gaps), timed by events; the
    median of `repeats` replays."""
    call()
    sync()
    if DEVICE != "cuda":
        t0 = time.perf_counter()
        call()
        return (time.perf_counter() - t0) * 1e6
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            call()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        sync()
        times.append(start.elapsed_time(end) / reps * 1000)
    return statistics.median(times)


def kernel_sweep() -> dict:
    """The decode attention kernel on one layer of the 8B shape: a bfloat16 cache with its options, a float8 cache
    over launch options (keys per tile, warps, stages: `DECODE_OPTIONS` of triton_attention.py, restored after) and
    splits per sequence (None: the batch-size rule)."""
    import runtime.models.native.triton_attention as ta
    from runtime.models.native.attention import FP8

    heads, kv_heads, dim, bs = 32, 8, 128, 16
    fp8_default = ta.DECODE_OPTIONS[1]
    grid = [(t, w, 2, sp) for t in (64, 128, 256) for w in (4, 8) for sp in (None, 2)]
    if DEVICE != "cuda":
        grid = grid[:2]
    out: dict = {"options": {str(k): v for k, v in ta.DECODE_OPTIONS.items()}}
    g = torch.Generator(device=DEVICE).manual_seed(0)
    try:
        for batch, context in ((128, 1024), (32, 2048), (1, 2048), (1, 384)) if DEVICE == "cuda" else ((1, 64),):
            per_seq = context // bs
            blocks = batch * per_seq + 1
            cache = torch.randn(2, blocks, bs, kv_heads, dim, device=DEVICE, generator=g, dtype=torch.bfloat16)
            tables = (torch.randperm(blocks - 1, device=DEVICE, generator=g) + 1).view(batch, per_seq).int()
            lens = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
            q = torch.randn(batch, heads, dim, device=DEVICE, generator=g, dtype=torch.bfloat16)
            k, v = (torch.randn(batch, kv_heads, dim, device=DEVICE, generator=g, dtype=torch.bfloat16) for _ in "kv")
            angle = torch.rand(batch, dim, device=DEVICE, generator=g)
            cos, sin = angle.cos().to(q.dtype), angle.sin().to(q.dtype)
            slots = tables[:, (context - 1) // bs].long() * bs + (context - 1) % bs  # the newest position's
            for name, c, runs in (("bf16", cache, [None]), ("fp8", cache.clamp(-448, 448).to(FP8), grid)):
                read = batch * context * kv_heads * dim * 2 * c.element_size()
                rows, want = {}, None
                for run in runs:
                    if run is not None:
                        ta.DECODE_OPTIONS[1] = run[:3]
                    backend = ta.TritonAttention(run[3] if run else None)
                    res = torch.empty_like(q)

                    def call():
                        backend.decode(q, k, v, cos, sin, c, slots, tables, lens, dim**-0.5, None, res)  # noqa: B023

                    us = replayed_us(call)
                    want = res.clone() if want is None else want
                    rows["x".join(map(str, run)) if run else "default"] = {
                        "us": us, "TBps": read / us / 1e6, "max_diff": (res.float() - want.float()).abs().max().item()}
                out[f"b{batch}_ctx{context}_{name}"] = rows
            del cache
            release()
    finally:
        ta.DECODE_OPTIONS[1] = fp8_default
    return out


def gemv_sweep() -> dict:
    """The batch-1 projections of the 8B shape: cuBLAS (F.linear) against the Triton GEMV over launch options
    (rows per program, inputs per tile, warps, stages)."""
    import runtime.models.native.triton_gemv as tg

    h, i, v = LLAMA_8B["hidden_size"], LLAMA_8B["intermediate_size"], LLAMA_8B["vocab_size"]
    shapes = {"qkv": (h + 2 * h // 4, h), "o": (h, h), "gate_up": (2 * i, h), "down": (h, i), "lm_head": (v, h)}
    grid = [(n, k, w, st) for n in (4, 8, 16) for k in (256, 512, 1024) for w in (4, 8) for st in (1, 3)]
    if DEVICE != "cuda":
        shapes, grid = {"o": (64, 128), "down": (64, 256)}, grid[:2]
    out: dict = {"options": {str(n): o for n, o in tg.OPTIONS.items()}}
    for name, shape in shapes.items():
        rows = gemv_shape(*shape, grid)
        best = min((r for r in rows if r[0].isdigit()), key=lambda r: rows[r]["us"])
        default = "x".join(map(str, tg.options(shape[0])))
        out[name] = {"shape": shape, "cublas": rows["cublas"], "best": best, "best_row": rows[best],
                     "default": rows.get(default), **{f: rows[f] for f in ("norm", "activate", "residual")},
                     "all": rows}
        log(name, json.dumps({key: value for key, value in out[name].items() if key != "all"}))
        release()
    return out


def gemv_shape(n: int, k: int, grid: list[tuple]) -> dict:
    """One [n, k] weight: time, weight bytes read per second and largest error against a float32 product, for
    cuBLAS, every launch option, and the default options with each prologue and epilogue the engine uses (RMSNorm
    of the input, silu(gate) · up of the output, the residual added). Each timed call walks copies of the weight
    worth 4 × the L2 cache, so no read hits it."""
    import torch.nn.functional as F

    import runtime.models.native.triton_gemv as tg

    l2 = torch.cuda.get_device_properties(0).L2_cache_size if DEVICE == "cuda" else 1 << 20
    g = torch.Generator(device=DEVICE).manual_seed(n + k)
    copies = max(1, -(-4 * l2 // (n * k * 2)))
    ws = [torch.randn(n, k, device=DEVICE, generator=g, dtype=torch.bfloat16) for _ in range(copies)]
    x = torch.randn(1, k, device=DEVICE, generator=g, dtype=torch.bfloat16)
    norm, residual = (torch.ones(size, device=DEVICE, dtype=torch.bfloat16) for size in (k, (1, n)))
    want = x.float() @ ws[-1].float().T
    res = torch.empty(1, n, dtype=torch.bfloat16, device=DEVICE)
    products = {"cublas": lambda w: F.linear(x, w)}
    for opts in grid:
        products["x".join(map(str, opts))] = lambda w, o=opts: tg.launch(x, w, None, res, chosen=o) or res
    products["norm"] = lambda w: tg.launch(x, w, None, res, norm, 1e-5) or res
    products["activate"] = lambda w: tg.launch(x, w, None, res, activate=True) or res
    products["residual"] = lambda w: tg.launch(x, w, None, res, residual=residual) or res
    rows = {}
    for key, product in products.items():
        us = replayed_us(lambda p=product: [p(w) for w in ws], reps=4) / copies
        rows[key] = {"us": us, "TBps": n * k * 2 / us / 1e6,
                     "max_err": (product(ws[-1]).float() - want).abs().max().item()}
    return rows


def prefix_phase(path: Path, caching: bool) -> dict:
    engine = big_engine(path, prefix_caching=caching, max_batch_size=64)
    rng = random.Random(5)
    system = [rng.randrange(16, 1000) for _ in range(2000)]
    try:
        run_all(engine, [EngineRequest("warm", system + [17, 18], GenerationParams(max_new_tokens=1))])
        steps: list = []
        engine.add_step_listener(steps.append)
        reqs = [EngineRequest(f"q{i}", system + [rng.randrange(16, 1000) for _ in range(rng.randint(16, 48))],
                              GenerationParams(max_new_tokens=1)) for i in range(64)]
        t0 = time.perf_counter()
        run_all(engine, reqs, stagger=0.0)
        wall = time.perf_counter() - t0
        prefill = sum(s.duration_s for s in steps if s.prompt_rows)
        return {"prefill_s": prefill, "wall_s": wall, "hit_tokens": sum(s.prefix_cache_hits for s in steps),
                "query_tokens": sum(s.prefix_cache_queries for s in steps)}
    finally:
        engine.shutdown()
        del engine
        release()


def hf_throughput(path: Path, items) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from runtime.models.loader import LoadedModel

    cfg = AutoConfig.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(cfg).eval()
    torch.set_default_dtype(torch.float32)
    loaded = LoadedModel(model, tok, torch.device(DEVICE), torch.bfloat16, False, tok.eos_token_id, tok.pad_token_id,
                         None, cfg.vocab_size)
    engine = AsyncEngine(EngineConfig(model_path=str(path), dtype="bfloat16", device=DEVICE, engine="transformers",
                                      max_batch_size=128, max_num_batched_tokens=16384,
                                      max_sequence_length=2304), loaded)
    try:
        return throughput(engine, items, "hf")
    finally:
        engine.shutdown()
        del model, loaded, engine
        release()


# ---- server ---------------------------------------------------------------------------------------------------
def serve(model: Path, logfile: Path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tgis_cli", "serve", "--model-name", str(model), "--host", "127.0.0.1",
           "--grpc-port", "8033", "--port", "3000", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=open(logfile, "wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if urllib.request.urlopen("http://127.0.0.1:3000/health", timeout=5).status == 200:
                return proc
        except OSError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError(f"server did not start:\n{logfile.read_text()[-3000:]}")


def grpc_load(tok, items, concurrency: int) -> dict:
    import grpc

    from proto import generation_pb2 as pb
    from proto import generation_pb2_grpc as pb_grpc

    ttft, itl, gen = [], [], [0]
    later_ttft = []  # requests that started after the first wave of `concurrency` arrived at once
    started = [0]

    async def main():
        async with grpc.aio.insecure_channel("127.0.0.1:8033") as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            sem = asyncio.Semaphore(concurrency)

            async def one(ids, n):
                text = tok.decode(ids)  # re-tokenized by the server, kept at the workload's length by truncation
                params = pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=n, min_new_tokens=n),
                                       response=pb.ResponseOptions(generated_tokens=True),
                                       truncate_input_tokens=len(ids))
                async with sem:
                    t0 = time.perf_counter()
                    order, started[0] = started[0], started[0] + 1
                    last, count = None, 0
                    async for msg in stub.GenerateStream(pb.SingleGenerationRequest(
                            request=pb.GenerationRequest(text=text), params=params)):
                        now = time.perf_counter()
                        for _ in msg.tokens:
                            if last is None:
                                ttft.append(now - t0)
                                if order >= concurrency:
                                    later_ttft.append(now - t0)
                            else:
                                itl.append(now - last)
                            last = now
                            count += 1
                    gen[0] += count

            t0 = time.perf_counter()
            await asyncio.gather(*(one(ids, n) for ids, n in salted(items)))
            return time.perf_counter() - t0

    wall = asyncio.run(main())

    def pct(values, q):
        ordered = sorted(values)
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None

    return {"concurrency": concurrency, "generated_tok_per_s": gen[0] / wall, "wall_s": wall,
            "ttft_ms_p50": pct(ttft, 0.5), "ttft_ms_p99": pct(ttft, 0.99),
            "ttft_ms_p99_after_first_wave": pct(later_ttft, 0.99), "itl_ms_p50": pct(itl, 0.5),
            "itl_ms_p99": pct(itl, 0.99)}


def server_phase(path: Path, work: Path, items, *args: str) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    proc = serve(path, work / "serve.log", "--dtype", "bfloat16", "--engine", "native", "--load-format", "dummy",
                 "--max-batch-size", "256", "--max-sequence-length", "4096", "--max-new-tokens", "1100",
                 "--max-concurrent-requests", "512", *args)
    try:
        return {f"c{c}": grpc_load(tok, items, c) for c in (32, 128)}
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        if os.environ.get("OUT"):  # the server's log, for what the report cannot say
            shutil.copy(work / "serve.log", Path(os.environ["OUT"]) / f"serve{'-'.join(args)}.log")


def parse_args(out: str, phases: str, dry_run_help: str) -> tuple[argparse.Namespace, list[str]]:
    """The GPU scripts' shared options; `--dry-run` switches this module to the CPU and a small shape."""
    global DEVICE
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(out))
    ap.add_argument("--phases", default=phases)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--dry-run", action="store_true", help=dry_run_help)
    args = ap.parse_args()
    if args.dry_run:
        import triton_interpreter  # the Triton kernels interpreted (tests/triton_interpreter.py)

        triton_interpreter.enable()
        DEVICE = "cpu"
        LLAMA_8B.update(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=1100)
    return args, args.phases.split(",")


def main() -> None:
    args, phases = parse_args("gpu_native.json", "correctness,decode,throughput,prefix,server,hf",
                              "on the CPU, a small shape: checks the script only")
    results: dict = {"device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu",
                     "torch": torch.__version__}
    import transformers

    results["transformers"] = transformers.__version__

    def save():
        args.out.write_text(json.dumps(results, indent=2))

    def record(key: str, value: dict) -> None:
        results[key] = value
        log(key, json.dumps(value))
        save()

    def on_own_engine(run, **extra) -> None:
        """Phases on an engine of their own (`extra`: its config), given back before the next phase."""
        engine = big_engine(big, **extra)
        try:
            run(engine)
        finally:
            engine.shutdown()
            del engine
            release()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "correctness" in phases:
            results["correctness"] = correctness(work)
            save()
        big = work / "llama-8b"
        write_model(big, "llama", weights=False, **LLAMA_8B)
        items = offline_workload(args.requests, short=args.dry_run)
        if {"decode", "throughput"} & set(phases):
            on_own_engine(lambda engine: decode_and_throughput(engine, big, items, phases, record))
        if "kernels" in phases:
            record("kernels", kernel_sweep())
        if "gemv" in phases:
            record("gemv", gemv_sweep())
        if "decode_cublas" in phases:  # batch-1 decode with cuBLAS for every projection (the Triton GEMV's A/B)
            import runtime.models.native.triton_gemv as tg

            usable, tg.usable = tg.usable, lambda weight: False
            try:
                on_own_engine(lambda engine: record("decode_bs1_cublas", decode_phase(big, engine)))
            finally:
                tg.usable = usable
        if "pdl" in phases:  # batch-1 decode without programmatic dependent launch (its A/B)
            import runtime.models.native.pdl as pdl

            pdl.ENABLED = False
            try:
                on_own_engine(lambda engine: record("decode_bs1_no_pdl", decode_phase(big, engine)))
            finally:
                pdl.ENABLED = True
        for flag in ("profile", "profile_compiled", "profile_bs1"):
            if flag in phases:
                import runtime.models.native.pdl as pdl

                batch = 1 if flag == "profile_bs1" else 128 if DEVICE == "cuda" else 4
                pdl.ENABLED = False  # kernels that start early would be timed from their start, waiting included
                try:
                    results[flag] = profile_phase(big, batch, flag != "profile")
                finally:
                    pdl.ENABLED = True
                log(flag, {k: v for k, v in results[flag].items() if not k.endswith("profile")})
                log(results[flag]["host_profile"])
                log(results[flag]["device_profile"])
                save()
        if "fp8" in phases:  # --kv-cache-dtype fp8: agreement, then the offline workload
            record("fp8_agreement", fp8_agreement(work))

            def fp8_throughput(engine):
                record("throughput_native_fp8", throughput(engine, items, "fp8"))
                engine.core.config.max_waiting_tokens = 1
                record("throughput_native_c256_join_at_once_fp8", throughput(engine, items, "fp8-join"))

            on_own_engine(fp8_throughput, kv_cache_dtype="fp8")
        if "decode_compiled" in phases:
            on_own_engine(lambda engine: record("decode_bs1_compiled", decode_phase(big, engine)), compile=True)
        if "coldstart" in phases:  # a fresh engine's first steps: where first-wave TTFT goes
            on_own_engine(lambda engine: record("coldstart_c32", throughput(engine, items, "cold32", concurrency=32,
                                                                             slow_steps_s=0.1)),
                          max_waiting_tokens=1)
        if "prefix" in phases:
            record("prefix", {"caching": prefix_phase(big, True), "no_caching": prefix_phase(big, False)})
        if "server" in phases:
            record("server", server_phase(big, work, items))
        if "server_join" in phases:  # joins at once instead of TGIS' min-join rule
            record("server_join_at_once", server_phase(big, work, items, "--max-waiting-tokens", "1"))
        if "hf" in phases:
            record("throughput_transformers", hf_throughput(big, items))
    save()


if __name__ == "__main__":
    main()
