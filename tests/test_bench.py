"""`tgis bench` runs the real engine on a fixed workload and reports consistent numbers."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from runtime.bench import Workload
from tgis_cli.main import app


def test_bench_engine_report(tiny_model, tmp_path):
    path = tiny_model("llama")
    out = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["bench", str(path), "-n", "12", "--input-len", "4:40", "--output-len", "3:9",
                                      "-c", "6", "--seed", "7", "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    from transformers import AutoTokenizer

    items = Workload(12, (4, 40), (3, 9), 6, 7).sample(len(AutoTokenizer.from_pretrained(path)))
    assert report["requests"] == 12
    assert report["output_tokens"] == sum(n for _, n in items)  # forced lengths, nothing lost
    assert report["input_tokens"] == sum(len(p) for p, _ in items)
    assert report["output_tokens_per_s"] > 0
    assert 0 < report["ttft_ms"]["p50"] <= report["latency_ms"]["p99"]
    assert "tok/s" in result.output
