"""Guided decoding on a GPU: the CUDA bitmask path (plain torch unpacking) against xgrammar's CPU kernel, and a
tiny model's guided outputs through the engine on CUDA (`--device cpu` runs the same checks on the CPU).

    python scripts/gpu_guided_check.py [--device cuda]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from models import build  # noqa: E402

from runtime.engine.async_engine import AsyncEngine  # noqa: E402
from runtime.engine.config import EngineConfig  # noqa: E402
from runtime.engine.guided import apply_token_bitmask, unpack_and_apply  # noqa: E402
from runtime.engine.guided_spec import guided_spec  # noqa: E402
from runtime.engine.request import EngineRequest, GenerationParams  # noqa: E402


def check_kernel(device: str) -> None:
    torch.manual_seed(0)
    scores = torch.randn(16, 49157)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (16, (49157 + 31) // 32), dtype=torch.int32)
    rows = [0, 3, 4, 9, 15]
    cpu, other = scores.clone(), scores.to(device)
    apply_token_bitmask(cpu, bitmask, rows)
    unpack_and_apply(other, bitmask, rows)
    assert torch.equal(cpu, other.cpu()), f"{device} and CPU masks differ"
    print(f"bitmask: unpacking on {device} == xgrammar CPU kernel")


def check_engine(path: Path, device: str) -> None:
    engine = AsyncEngine(EngineConfig(model_path=str(path), device=device,
                                      dtype="float16" if device.startswith("cuda") else "float32"))
    cases = [(guided_spec("choice", ["red", "green", "blue"]), lambda t: t in ("red", "green", "blue")),
             (guided_spec("regex", r"\d{4}-\d\d-\d\d"), lambda t: re.fullmatch(r"\d{4}-\d\d-\d\d", t)),
             (guided_spec("json_schema", json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}},
                                                     "required": ["ok"]})), lambda t: "ok" in json.loads(t))]

    async def one(i: int, spec, sampling: bool):
        engine.grammars.compile(spec).result()
        ids = engine.tokenizer(f"prompt {i}")["input_ids"]
        params = GenerationParams(max_new_tokens=40, guided=spec, temperature=1.0 if sampling else 0.0, seed=i)
        return [out async for out in engine.generate(EngineRequest(f"r{i}-{sampling}", ids, params))][-1]

    async def main():
        return await asyncio.gather(*(one(i, s, smp) for i, (s, _) in enumerate(cases) for smp in (False, True)))

    try:
        outs = asyncio.run(main())
    finally:
        engine.shutdown()
    for out, (_, check) in zip(outs, [c for c in cases for _ in (0, 1)], strict=True):
        assert out.error is None and check(out.output_text), (out.output_text, out.error)
    print(f"engine on {device}:", [o.output_text for o in outs])


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    device = ap.parse_args().device
    check_kernel(device)
    with tempfile.TemporaryDirectory() as tmp:
        check_engine(build("gpt2", Path(tmp)), device)
