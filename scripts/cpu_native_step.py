"""Where a native decode step goes on the CPU: time steps of B decode rows over contexts spread like `tgis bench`'s
workload, as built and without each CPU refinement (oneDNN-packed weights, the C++ decode attention kernel), and
list the top operators of one profiled step.

    python scripts/cpu_native_step.py --batch 16 --dtype bfloat16 [--context 32:800] [--steps 8] [--profile]

Runs the native runner directly on the built-in default model (SmolLM2-135M-Instruct), one torch thread (what
`tgis serve` gives the engine on a 2-core machine), no scheduler: the per-step cost of the model, attention and
block bookkeeping alone.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.default_model import ensure_default_model  # noqa: E402
from runtime.engine.config import EngineConfig  # noqa: E402
from runtime.engine.native_runner import NativeRunner  # noqa: E402
from runtime.engine.plan import RowPlan, StepPlan  # noqa: E402
from runtime.models.native.loader import load_native  # noqa: E402

VARIANTS = {"native": {}, "no-oneDNN": {"onednn": False}, "torch-attention": {"attention_backend": "torch"}}


def prefilled(config: EngineConfig, lengths: list[int], steps: int) -> NativeRunner:
    """A runner holding `lengths` prompts (one chunk each), with room for `steps` more tokens per row."""
    runner = NativeRunner(load_native(config), config)
    runner.kv_capacity(config, max(lengths) + steps + 1)
    next_block, rng = 1, random.Random(0)
    for i, n in enumerate(lengths):
        count = -(-(n + steps + 1) // config.block_size)
        runner.execute(StepPlan([RowPlan(f"s{i}", [rng.randrange(1000) for _ in range(n)], 0, sample=True,
                                         new=True, new_blocks=list(range(next_block, next_block + count)))]))
        next_block += count
    return runner


def decode_step(runner: NativeRunner, lengths: list[int], step: int) -> float:
    """Milliseconds of one decode step of every row."""
    plan = StepPlan([RowPlan(f"s{i}", [7], n + step, sample=True) for i, n in enumerate(lengths)])
    t = time.perf_counter()
    runner.execute(plan)
    return (time.perf_counter() - t) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--context", default="32:800", help="uniform range of the rows' context lengths")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--profile", action="store_true", help="operator table of the last step")
    args = ap.parse_args()
    torch.set_num_threads(1)
    lo, hi = map(int, args.context.split(":"))
    rng = random.Random(0)
    lengths = [rng.randint(lo, hi) for _ in range(args.batch)]
    model = str(ensure_default_model())
    runners = {name: prefilled(EngineConfig(model_path=model, dtype=args.dtype, device="cpu", engine="native",
                                            max_batch_size=args.batch, max_num_batched_tokens=max(lengths),
                                            **extra), lengths, args.steps)
               for name, extra in VARIANTS.items()}
    times: dict[str, list[float]] = {name: [] for name in runners}
    for step in range(args.steps):  # interleaved: the machine's slow phases hit every variant alike
        for name, runner in runners.items():
            times[name].append(decode_step(runner, lengths, step))
    print(f"batch {args.batch}, {args.dtype}, contexts {lo}-{hi} (mean {statistics.mean(lengths):.0f}), decode "
          f"step median ms: " + ", ".join(f"{n} {statistics.median(t[1:]):.1f}" for n, t in times.items()))
    if args.profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            decode_step(runners["native"], lengths, args.steps)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
