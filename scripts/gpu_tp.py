"""Tensor parallelism on two GPUs over NCCL: identical results first, then scaling (issue 15).

Run on a 2-GPU machine from the repository root (one call; .whl carries the wheels the image lacks, DeepSpeed's
included when the DeepSpeed phase runs):
    python scripts/gpu_tp.py --out $OUT/tp.json [--phases serve_equal,decode,throughput,deepspeed,kill]

NVLink multicast stays off (NCCL_NVLS_ENABLE=0 and the variables KINDS.md names), also in every process this
starts (servers, their engine and rank processes inherit the environment).

Phases (JSON report):
- serve_equal: `tgis serve --num-gpus 2` and `--num-gpus 1` on small random Llama and T5 configs in float32; over
  gRPC the greedy tokens are identical, seeded sampling is identical, input-token logprobs agree within 1e-4.
- decode: batch-1 decode of the Llama-3-8B shape (bf16, dummy weights) at TP=2 against TP=1 (target <= 0.62 x).
- throughput: the 256-request offline workload of scripts/gpu_native.py at TP=2 against TP=1 (target >= 1.6 x).
- deepspeed: a tiny Falcon (DeepSpeed AutoTP) served over 2 GPUs == 1 GPU over gRPC; then in-process, every
  architecture runtime/parallel/deepspeed.py allows (tiny models of tests/models.py), float32 (tokens must be
  identical) and bfloat16 (tokens before each sequence's first difference), and no DeepSpeed file left in /dev/shm.
  The image lacks DeepSpeed: `make gpu-wheels` puts its wheel and the dependencies the image lacks into .whl/.
- kill: SIGKILL of rank 1 mid-stream: the stream fails with TGIS' message, the server exits non-zero within 30 s,
  and no process is left on the GPUs.
`--dry-run` runs the same on the CPU (gloo ranks, small shapes) to check the script before a device call.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for var, value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                   ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ[var] = value

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts"), str(ROOT / "tests")]

import gpu_native as native  # noqa: E402
import torch  # noqa: E402

T = 300


def log(*args) -> None:
    print(*args, flush=True)


def grpc_results(port: int, prompts: list[str]) -> dict:
    """Greedy tokens, seeded sampled tokens and input-token logprobs of `prompts` from the server on `port`."""
    import grpc

    from proto import generation_pb2 as pb
    from proto import generation_pb2_grpc as pb_grpc

    stub = pb_grpc.GenerationServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    details = pb.ResponseOptions(generated_tokens=True, input_tokens=True, token_logprobs=True)

    def generate(params: pb.Parameters) -> list:
        return list(stub.Generate(pb.BatchedGenerationRequest(
            requests=[pb.GenerationRequest(text=t) for t in prompts], params=params), timeout=T).responses)

    greedy = generate(pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=24), response=details))
    sampled = generate(pb.Parameters(method=pb.SAMPLE, sampling=pb.SamplingParameters(temperature=0.8, seed=7),
                                     stopping=pb.StoppingCriteria(max_new_tokens=16), response=details))
    return {"greedy": [[t.text for t in r.tokens] for r in greedy],
            "sampled": [[t.text for t in r.tokens] for r in sampled],
            "input_logprobs": [[t.logprob for t in r.input_tokens][1:] for r in greedy]}


def served(path: Path, work: Path, gpus: int, *extra: str) -> dict:
    proc = native.serve(path, work / f"serve-{path.name}-{gpus}.log", "--dtype", "float32", "--num-gpus",
                        str(gpus), *extra)
    try:
        return grpc_results(8033, native.PROMPTS)
    finally:
        proc.terminate()
        proc.wait(timeout=120)


def compare(one: dict, two: dict) -> dict:
    lp1, lp2 = (torch.tensor([x for row in d["input_logprobs"] for x in row]) for d in (one, two))
    return {"greedy_identical": one["greedy"] == two["greedy"], "sampled_identical": one["sampled"] == two["sampled"],
            "input_logprobs_max_abs_diff": float((lp1 - lp2).abs().max()) if len(lp1) else 0.0}


def serve_equal(work: Path) -> dict:
    out = {}
    for name, model_type, shape in (
            ("llama", "llama", dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                    num_attention_heads=8, num_key_value_heads=4)),
            ("t5", "t5", dict(d_model=256, d_kv=32, d_ff=512, num_layers=2, num_heads=8, is_encoder_decoder=True))):
        path = work / f"tp-{name}"
        if model_type == "t5":
            write_t5(path)
        else:
            native.write_model(path, model_type, **shape)
        out[name] = compare(served(path, work, 1), served(path, work, 2))
        log(name, json.dumps(out[name]))
    return out


def write_t5(path: Path) -> None:
    import models as tiny

    tiny.build_t5(path)


def decode_and_throughput(work: Path, phases: list[str], requests: int) -> dict:
    big = work / "llama-8b"
    native.write_model(big, "llama", weights=False, **native.LLAMA_8B)
    items = native.offline_workload(requests, short=native.DEVICE == "cpu")
    out: dict = {}
    for tp in (1, 2):
        engine = native.big_engine(big, tensor_parallel_size=tp)
        try:
            if "decode" in phases:
                out[f"decode_tp{tp}"] = native.decode_phase(big, engine)
            if "throughput" in phases:
                out[f"throughput_tp{tp}"] = native.throughput(engine, items, f"tp{tp}")
            log(tp, json.dumps({k: v for k, v in out.items() if k.endswith(f"tp{tp}")}))
        finally:
            engine.shutdown()
            del engine
            native.release()
    if "decode" in phases:
        out["decode_ratio_tp2_over_tp1"] = out["decode_tp2"]["ms_per_token"] / out["decode_tp1"]["ms_per_token"]
    if "throughput" in phases:
        out["throughput_speedup_tp2"] = (out["throughput_tp2"]["generated_tok_per_s"]
                                         / out["throughput_tp1"]["generated_tok_per_s"])
    return out


def deepspeed_phase(work: Path) -> dict:
    """The tiny Falcon served over gRPC; then in-process, per architecture DeepSpeed splits for us (Llama forced),
    float32 and bfloat16, 8 prompts joining a running batch, 32 forced greedy tokens: 2 GPUs against 1."""
    import models as tiny

    from runtime.parallel.deepspeed import TESTED

    shm = set(Path("/dev/shm").glob("deepspeed*"))
    out: dict = {"served_falcon": compare(served(tiny.build("falcon", work), work, 1),
                                          served(tiny.build("falcon", work), work, 2))}
    log("deepspeed falcon served", json.dumps(out["served_falcon"]))
    for name in TESTED:
        method = "deepspeed" if name in tiny.NATIVE else "auto"
        for dtype in ("float32", "bfloat16"):
            (one, one_s), (two, two_s) = (_greedy(tiny.build(name, work), dtype, tp, method) for tp in (1, 2))
            out[f"{name} {dtype}"] = {"method": method, "tokens": sum(map(len, one)),
                                      "identical_sequences": sum(a == b for a, b in zip(one, two, strict=True)),
                                      "matching_tokens": sum(map(_matching, one, two)),
                                      "one_gpu_s": round(one_s, 3), "two_gpus_s": round(two_s, 3)}
            log("deepspeed", name, dtype, json.dumps(out[f"{name} {dtype}"]))
    out["shm_left"] = sorted(str(p) for p in set(Path("/dev/shm").glob("deepspeed*")) - shm)
    return out


def _greedy(path: Path, dtype: str, tp: int, method: str) -> tuple[list[list[int]], float]:
    from engine_utils import request, run

    from runtime.engine.async_engine import AsyncEngine
    from runtime.engine.config import EngineConfig

    engine = AsyncEngine(EngineConfig(model_path=str(path), device=native.DEVICE, dtype=dtype, max_batch_size=8,
                                      tensor_parallel_size=tp, tensor_parallel_method=method))
    try:
        reqs = [request(engine, p, max_new_tokens=32, min_new_tokens=32) for p in native.PROMPTS]
        start = time.perf_counter()
        results = run(engine, reqs, join_after_steps=[0, 0, 1, 2, 3, 5, 8, 13])
        return [r.token_ids for r in results], time.perf_counter() - start
    finally:
        engine.shutdown()
        native.release()


def _matching(a: list[int], b: list[int]) -> int:
    """Tokens before the first difference (after it, the two sequences continue different texts)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


def kill_phase(work: Path) -> dict:
    import grpc

    from proto import generation_pb2 as pb
    from proto import generation_pb2_grpc as pb_grpc

    path = work / "tp-llama"
    if not (path / "config.json").exists():
        native.write_model(path, "llama", hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=4)
    proc = native.serve(path, work / "kill.log", "--dtype", "float32", "--num-gpus", "2")
    rank = _rank_pid(proc.pid)  # found first: the stream must still run when the rank dies
    stub = pb_grpc.GenerationServiceStub(grpc.insecure_channel("127.0.0.1:8033"))
    stream = stub.GenerateStream(pb.SingleGenerationRequest(
        request=pb.GenerationRequest(text="Tell me a long story."),
        params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=1000, min_new_tokens=1000),
                             # a message per token: a random model's held-back text sends none otherwise
                             response=pb.ResponseOptions(generated_tokens=True))), timeout=T)
    next(stream), next(stream)
    killed = time.monotonic()
    os.kill(rank, signal.SIGKILL)
    error = None
    try:
        list(stream)
    except grpc.RpcError as exc:
        error = (exc.code().name, exc.details())
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = None
    exited_after = time.monotonic() - killed
    left = []
    if native.DEVICE == "cuda":
        left = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                              capture_output=True, text=True).stdout.split()
    return {"stream_error": error, "exit_code": code, "exited_after_s": exited_after, "gpu_processes_left": left,
            "ok": bool(error and error[0] == "UNKNOWN" and error[1].startswith("Request failed during generation")
                       and code not in (0, None) and exited_after < 30 and not left)}


def _rank_pid(server: int) -> int:
    """Rank 1: a spawned grandchild of the server (server → engine process → ranks)."""
    def children(pid: int) -> list[int]:
        return [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
                for c in (task / "children").read_text().split()]

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for engine in children(server):
            for rank in children(engine):
                if b"multiprocessing.spawn" in Path(f"/proc/{rank}/cmdline").read_bytes():
                    return rank
        time.sleep(0.2)
    raise RuntimeError("no rank process found")


def main() -> None:
    args, phases = native.parse_args("gpu_tp.json", "serve_equal,decode,throughput,deepspeed,kill",
                                     "on the CPU (gloo ranks, small shapes)")
    results: dict = {"devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                     "torch": torch.__version__}

    def save() -> None:
        args.out.write_text(json.dumps(results, indent=2))

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "serve_equal" in phases:
            results["serve_equal"] = serve_equal(work)
            save()
        if {"decode", "throughput"} & set(phases):
            results.update(decode_and_throughput(work, phases, args.requests))
            save()
        if "deepspeed" in phases:
            results["deepspeed"] = deepspeed_phase(work)
            save()
        if "kill" in phases:
            results["kill"] = kill_phase(work)
            log("kill", json.dumps(results["kill"]))
            save()
    save()


if __name__ == "__main__":
    main()
