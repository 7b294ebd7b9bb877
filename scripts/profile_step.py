"""Profile engine steps on a GPU: where does a decode step of a large batch spend its time?

    python scripts/profile_step.py [--batch 48] [--shape llama-1b]
Drives EngineCore.step() directly (no threads) and prints a cProfile summary of steady-state decode steps plus
synchronized timings of the model forward and the sampler.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts"), str(ROOT / "tests")]

from gpu_bench import random_model  # noqa: E402

from runtime.engine.config import EngineConfig  # noqa: E402
from runtime.engine.core import EngineCore  # noqa: E402
from runtime.engine.request import EngineRequest, GenerationParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--shape", default="llama-1b")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path, loaded = random_model(Path(tmp), args.shape)
        core = EngineCore(EngineConfig(model_path=str(path), dtype="bfloat16", device="cuda",
                                       max_batch_size=args.batch, max_prefill_tokens=1 << 20), loaded)
        for i in range(args.batch):
            core.scheduler.add(core._new_sequence(EngineRequest(
                f"r{i}", list(range(100, 100 + 256 + i)), GenerationParams(max_new_tokens=400, min_new_tokens=400))))
        for _ in range(5):
            core.step()
        torch.cuda.synchronize()
        seqs = core.scheduler.running
        last = torch.tensor([s.generated[-1] for s in seqs])
        t0 = time.perf_counter()
        for _ in range(10):
            logits = core.runner.decode(core.batch, last)
        torch.cuda.synchronize()
        print(f"forward only: {(time.perf_counter() - t0) * 100:.2f} ms/step at batch {len(seqs)}")
        from runtime.engine.sampler import SamplerRow

        rows = [SamplerRow(s.params, len(s.generated), s.decoder_tokens(None), s.generator) for s in seqs]
        t0 = time.perf_counter()
        for _ in range(10):
            core.sampler(logits, rows)
        torch.cuda.synchronize()
        print(f"sampler only: {(time.perf_counter() - t0) * 100:.2f} ms/step")
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        for _ in range(20):
            core.step()
        torch.cuda.synchronize()
        prof.disable()
        print(f"full step: {(time.perf_counter() - t0) * 50:.2f} ms/step")
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
