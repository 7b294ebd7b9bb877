"""DeepSpeed AutoTP on 2 GPUs: the architectures it splits for us (runtime/parallel/deepspeed.py TESTED) against
the same model on one GPU. Not run yet: no machine with 2 GPUs was lent when it was written.

Run from the repository root on a machine with 2 GPUs (the device tool's nvidia-h200-x2). Its image has no
DeepSpeed (nor hjson, pydantic): `make gpu-wheels` here fills .whl/, carried to the machine, then there
    python3 -m pip install --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    python3 scripts/gpu_deepspeed.py --out $OUT/deepspeed.json
`--dry-run` runs the same on the CPU (2 gloo ranks), as a check of the script.

Per tiny model of tests/models.py (OPT, GPT-J, Falcon, Phi, StarCoder2, and Llama with DeepSpeed forced), float32
and bfloat16: 8 prompts joining a running batch, 32 forced greedy tokens, on 1 GPU and over 2 ranks (NCCL). float32
tokens must be identical; for bfloat16 the tokens before each sequence's first difference are counted (random tiny
models have near-tied logits). Also the wall time of each run and whether DeepSpeed left anything in /dev/shm.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import models  # noqa: E402
from engine_utils import request, run  # noqa: E402

from runtime.engine.async_engine import AsyncEngine  # noqa: E402
from runtime.engine.config import EngineConfig  # noqa: E402
from runtime.parallel.deepspeed import TESTED  # noqa: E402

PROMPTS = ["Hello world, this is", "def f(x):\n    return", "The quick brown fox jumps over the lazy dog and",
           "import os\nimport sys\n", "for i in range(10):", "If the object is a class instance", "x", "The built-in"]


def generate(path: Path, device: str, dtype: str, tp: int, method: str) -> tuple[list[list[int]], float]:
    engine = AsyncEngine(EngineConfig(model_path=str(path), device=device, dtype=dtype, tensor_parallel_size=tp,
                                      tensor_parallel_method=method, max_batch_size=8))
    try:
        reqs = [request(engine, p, max_new_tokens=32, min_new_tokens=32) for p in PROMPTS]
        start = time.perf_counter()
        results = run(engine, reqs, join_after_steps=[0, 0, 1, 2, 3, 5, 8, 13])
        return [r.token_ids for r in results], time.perf_counter() - start
    finally:
        engine.shutdown()


def _matching(a: list[int], b: list[int]) -> int:
    """Tokens before the first difference (after it, the two sequences continue different texts)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true", help="on the CPU (gloo), to check the script")
    parser.add_argument("--models", default=",".join(TESTED), help="comma-separated tests/models.py names")
    args = parser.parse_args()
    device = "cpu" if args.dry_run else "cuda"
    shm_before = set(Path("/dev/shm").glob("deepspeed*"))
    report = {}
    with tempfile.TemporaryDirectory() as work:
        for name in args.models.split(","):
            path = models.build(name, Path(work))
            method = "auto" if name not in models.NATIVE else "deepspeed"
            for dtype in ("float32", "bfloat16"):
                one, one_s = generate(path, device, dtype, 1, method)
                two, two_s = generate(path, device, dtype, 2, method)
                report[f"{name} {dtype}"] = {"method": method, "identical_sequences": sum(x == y for x, y in
                                                                                           zip(one, two, strict=True)),
                                             "matching_tokens": sum(map(_matching, one, two)),
                                             "tokens": 32 * len(PROMPTS),
                                             "one_rank_s": round(one_s, 3), "two_ranks_s": round(two_s, 3)}
                print(name, dtype, report[f"{name} {dtype}"], flush=True)
    report["deepspeed_shm_left"] = sorted(str(p) for p in set(Path("/dev/shm").glob("deepspeed*")) - shm_before)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
