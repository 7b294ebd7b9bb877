"""`tgis bench`: the workloads send what they document, the reports carry every setting, the gate is direction-aware
and refuses other workloads; in-process (tiny Llama, also with dummy weights), over gRPC against the real server,
and the OpenAI streaming client against the wire format."""

from __future__ import annotations

import asyncio
import copy
import json
import statistics
import time

import pytest
from server_harness import running_server
from transformers import AutoTokenizer
from typer.testing import CliRunner

from runtime.bench import BenchError
from runtime.bench.driver import RequestFailed, RequestRecord, run_requests
from runtime.bench.gate import compare, parse_tolerances, workload_differences
from runtime.bench.prefix_cache import hit_rate, parse_counters
from runtime.bench.target_openai import OpenAITarget
from runtime.bench.workload import Workload, arrival_times, build_requests, identity
from runtime.engine.async_engine import AsyncEngine
from tgis_cli.main import app

SCHEMA = '{"type": "object", "properties": {"a": {"type": "integer"}}}'


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def tok(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def bench(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["bench", *map(str, args)], env={"COLUMNS": "500"})  # no wrapped messages
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, result.output


# ---- workloads ----------------------------------------------------------------------------------------------------

def test_random_workload_counts_lengths_and_seed(tok):
    w = Workload(40, (5, 9), (2, 4), seed=3)
    reqs = build_requests(w, tok)
    assert len(reqs) == 40
    assert all(5 <= len(r.prompt_ids) <= 9 and 2 <= r.output_len <= 4 for r in reqs)
    assert {len(r.prompt_ids) for r in reqs} == set(range(5, 10))  # the whole range is used
    assert all(16 <= i < len(tok) for r in reqs for i in r.prompt_ids)
    assert all(r.prompt_text == tok.decode(r.prompt_ids) for r in reqs)  # servers get the same prompt as text
    assert build_requests(w, tok) == reqs
    assert build_requests(Workload(40, (5, 9), (2, 4), seed=4), tok) != reqs
    assert identity(w, reqs)["requests_sha256"] != identity(w, build_requests(Workload(40, (5, 9), (2, 5)), tok))[
        "requests_sha256"]


def test_shared_prefix_is_shared(tok):
    reqs = build_requests(Workload(10, (3, 6), (1, 1), shared_prefix=12), tok)
    prefix = reqs[0].prompt_ids[:12]
    assert all(r.prompt_ids[:12] == prefix and 3 <= len(r.prompt_ids) - 12 <= 6 for r in reqs)
    assert len({tuple(r.prompt_ids[12:]) for r in reqs}) == 10  # only the prefix is shared
    assert len({r.prompt_text[:len(tok.decode(prefix))] for r in reqs}) == 1
    plain = build_requests(Workload(10, (3, 6), (1, 1)), tok)
    assert len({r.prompt_ids[0] for r in plain}) > 1


def test_dataset_prompts_and_sharegpt(tok, tmp_path):
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "Hello there", "output_len": 7}\n\n"just a string"\n{"prompt": "third"}\n')
    reqs = build_requests(Workload(5, output_len=None, dataset=str(jsonl), seed=1), tok)
    assert [r.prompt_text for r in reqs] == ["Hello there", "just a string", "third", "Hello there", "just a string"]
    assert reqs[0].output_len == 7 and reqs[3].output_len == 7  # the file's length; the others from 16:64
    assert all(16 <= r.output_len <= 64 for r in (reqs[1], reqs[2]))
    assert reqs[2].prompt_ids == tok.encode("third", add_special_tokens=False)
    forced = build_requests(Workload(3, output_len=(2, 2), dataset=str(jsonl), shared_prefix=4), tok)
    assert [r.output_len for r in forced] == [2, 2, 2]  # --output-len overrides the file
    assert all(r.prompt_ids[4:] == tok.encode(t, add_special_tokens=False)
               for r, t in zip(forced, ["Hello there", "just a string", "third"], strict=True))

    sharegpt = tmp_path / "sharegpt.json"
    reply = "four score and seven years ago"
    sharegpt.write_text(json.dumps([
        {"id": "a", "conversations": [{"from": "human", "value": "Q1"}, {"from": "gpt", "value": reply}]},
        {"id": "b", "conversations": [{"from": "gpt", "value": "no human turn"}]},
        {"id": "c", "conversations": [{"from": "system", "value": "sys"}, {"from": "human", "value": "Q2"}]},
    ]))
    reqs = build_requests(Workload(2, dataset=str(sharegpt)), tok)
    assert [r.prompt_text for r in reqs] == ["Q1", "Q2"]
    assert reqs[0].output_len == len(tok.encode(reply, add_special_tokens=False))

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "wrong key"}\n')
    with pytest.raises(BenchError, match="line 2"):
        build_requests(Workload(2, dataset=str(bad)), tok)


def test_poisson_arrivals_follow_the_seed():
    assert arrival_times(Workload(5)) is None
    times = arrival_times(Workload(2000, request_rate=50.0, seed=1))
    assert times == arrival_times(Workload(2000, request_rate=50.0, seed=1))
    assert times != arrival_times(Workload(2000, request_rate=50.0, seed=2))
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert times[0] == 0.0 and all(g > 0 for g in gaps)
    assert statistics.fmean(gaps) == pytest.approx(1 / 50, rel=0.1)
    assert statistics.stdev(gaps) == pytest.approx(1 / 50, rel=0.15)  # exponential: stdev = mean


def test_driver_sends_at_arrival_times_and_bounds_concurrency():
    arrivals = arrival_times(Workload(12, request_rate=40.0, seed=5))
    sent, in_flight, peak = [], 0, 0

    async def send(payload, record: RequestRecord) -> None:
        nonlocal in_flight, peak
        sent.append((payload, time.perf_counter()))
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.05)
        record.tokens(1)
        in_flight -= 1
        if payload == 3:
            raise RequestFailed("INVALID_ARGUMENT", "no")

    async def main():
        t0 = time.perf_counter()
        return t0, await run_requests(list(range(12)), send, None, arrivals)

    t0, result = asyncio.run(main())
    for payload, at in sent:
        assert arrivals[payload] - 0.005 <= at - t0 <= arrivals[payload] + 0.5  # never early; late only by load
    assert [r.error for r in result.records].count("INVALID_ARGUMENT") == 1

    peak = 0
    asyncio.run(run_requests(list(range(12)), send, 3))
    assert peak == 3


# ---- report and gate ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine_report(model_dir, tmp_path_factory):
    """One in-process run (the native engine, prefix caching on) with a shared prefix of two KV blocks and two
    repeats; the requests the engine received."""
    out = tmp_path_factory.mktemp("bench") / "report.json"
    seen = []
    original = AsyncEngine.generate

    def spy(self, request):
        seen.append(request)
        return original(self, request)

    mp = pytest.MonkeyPatch()
    mp.setattr(AsyncEngine, "generate", spy)
    try:
        code, output = bench(model_dir, "-n", 12, "--input-len", "4:20", "--output-len", "3:9", "-c", 6,
                             "--seed", 7, "--shared-prefix", 32, "--repeat", 2, "-o", out)
    finally:
        mp.undo()
    assert code == 0, output
    return json.loads(out.read_text()), seen, output


def test_engine_report_counts_and_what_the_engine_received(engine_report, tok):
    report, seen, output = engine_report
    expected = build_requests(Workload(12, (4, 20), (3, 9), 6, 7, shared_prefix=32), tok)
    assert len(seen) == 24  # 12 requests x 2 repeats
    assert [r.input_ids for r in seen[:12]] == [r.prompt_ids for r in expected]
    assert all(r.input_ids[:32] == seen[0].input_ids[:32] for r in seen)
    assert [r.params.min_new_tokens for r in seen[:12]] == [r.output_len for r in expected]
    m = report["metrics"]
    assert len(report["runs"]) == 2
    assert m["requests"] == 12 and m["errors"] == 0
    assert m["output_tokens"] == sum(r.output_len for r in expected)  # forced lengths, nothing lost
    assert m["prompt_tokens"] == sum(len(r.prompt_ids) for r in expected)
    assert m["output_tok_s"] > 0 and m["request_s"] > 0
    assert 0 < m["ttft_ms"]["p50"] <= m["ttft_ms"]["p99"] <= m["ttft_ms"]["max"] <= m["e2e_ms"]["max"]
    assert m["itl_ms"]["p50"] > 0
    assert m["output_tok_s"] == statistics.median(r["output_tok_s"] for r in report["runs"])
    assert "tok/s" in output and "TTFT" in output


def test_engine_target_sums_step_prefix_cache_counters(engine_report):
    from runtime.bench.target_engine import EngineTarget
    from runtime.engine.core import StepStats

    class Front:
        tokenizer = None

        def add_step_listener(self, fn):
            self.listener = fn

    front = Front()
    target = EngineTarget(front)
    before = asyncio.run(target.prefix_cache())
    for queries, hits in ((40, 0), (0, 0), (41, 32)):
        front.listener(StepStats("prefill", 1, prefix_cache_queries=queries, prefix_cache_hits=hits))
    assert hit_rate(before, asyncio.run(target.prefix_cache())) == 32 / 81


def test_engine_report_prefix_cache_hit_rate(engine_report):
    runs = engine_report[0]["runs"]
    # the shared prefix's two blocks are computed once: later prompts (and the whole second run) find them
    assert 0 < engine_report[0]["metrics"]["prefix_cache_hit_rate"] < 1
    assert runs[1]["prefix_cache_hit_rate"] > runs[0]["prefix_cache_hit_rate"]


def test_report_carries_every_setting(engine_report):
    import typer.main

    report = engine_report[0]
    command = typer.main.get_command(app).commands["bench"]
    names = {p.name for p in command.params} - {"output", "json_output"}
    assert names <= set(report["workload"]) | set(report["settings"])
    assert report["workload"]["shared_prefix"] == 32 and report["workload"]["input_len"] == [4, 20]
    assert report["settings"]["repeat"] == 2
    target = report["target"]
    assert (target["engine"], target["dtype"], target["device"]) == ("native", "float32", "cpu")
    assert target["engine_config"]["max_batch_size"] == 16
    assert {"tgis", "torch", "transformers"} <= set(report["environment"]["versions"])


def test_gate_direction_aware(engine_report):
    report = engine_report[0]
    tolerances = parse_tolerances(["10%"])
    assert not any(v.regressed for v in compare(report, report, tolerances))
    doctored = copy.deepcopy(report)
    doctored["metrics"]["output_tok_s"] *= 2  # the baseline was twice as fast
    doctored["metrics"]["ttft_ms"]["p99"] /= 2  # and had half the tail latency
    doctored["metrics"]["output_tokens"] += 1
    doctored["metrics"]["e2e_ms"]["p50"] *= 2  # now faster: an improvement, not a regression
    regressed = {v.metric for v in compare(doctored, report, tolerances) if v.regressed}
    assert regressed == {"output_tok_s", "ttft_ms.p99", "output_tokens"}
    off = parse_tolerances(["10%", "ttft_ms=off", "output_tok_s=150%"])
    assert {v.metric for v in compare(doctored, report, off) if v.regressed} == {"output_tokens"}
    errors = copy.deepcopy(report)
    errors["metrics"]["errors"] = 1
    assert [v.metric for v in compare(report, errors, tolerances) if v.regressed] == ["errors"]
    with pytest.raises(ValueError, match="no gated metric"):
        parse_tolerances(["tftt_ms=5%"])
    with pytest.raises(ValueError, match="percentage"):
        parse_tolerances(["fast"])


def test_gate_cli_passes_fails_and_refuses_other_workloads(engine_report, model_dir, tmp_path):
    report = engine_report[0]
    args = [model_dir, "-n", 12, "--input-len", "4:20", "--output-len", "3:9", "-c", 6, "--seed", 7,
            "--shared-prefix", 32]
    same = tmp_path / "same.json"
    same.write_text(json.dumps(report))
    code, output = bench(*args, "--baseline", same, "--max-regression", "1000%")
    assert code == 0, output
    assert "gate against the baseline" in output

    doctored = copy.deepcopy(report)
    doctored["metrics"]["output_tokens"] += 5
    doctored["metrics"]["output_tok_s"] *= 100
    bad = tmp_path / "doctored.json"
    bad.write_text(json.dumps(doctored))
    out = tmp_path / "gated.json"
    code, output = bench(*args, "--baseline", bad, "-o", out)
    assert code == 1
    assert "regressed beyond tolerance" in output and "output_tokens" in output and "output_tok_s" in output
    assert {"output_tokens", "output_tok_s"} <= set(json.loads(out.read_text())["gate"]["regressed"])

    code, output = bench(*[a if a != 12 else 10 for a in args], "--baseline", same)
    assert code == 2
    assert "another workload" in output and "num_requests" in output
    assert workload_differences(report, report["workload"] | {"dataset": "/elsewhere/x.jsonl"}) == []


def test_prefix_cache_counters():
    text = ("# HELP tgis_prefix_cache_queries_total x\n# TYPE tgis_prefix_cache_queries_total counter\n"
            'tgis_prefix_cache_queries_total{model="a"} 100.0\ntgis_prefix_cache_queries_total{model="b"} 20\n'
            "tgis_prefix_cache_hits_total 30.0\ntgi_request_count 5\n")
    assert parse_counters(text) == (120, 30)
    assert parse_counters("tgi_request_count 5\n") is None
    assert hit_rate((120, 30), (220, 80)) == 0.5
    assert hit_rate((120, 30), (120, 30)) is None and hit_rate(None, (1, 1)) is None


# ---- in-process options ---------------------------------------------------------------------------------------------

def test_engine_knobs_reach_the_engine(model_dir, tmp_path, monkeypatch):
    """--async-scheduling, --kv-cache-dtype and --max-waiting-tokens configure the in-process engine; the report
    carries them."""
    configs = []
    original = AsyncEngine.__init__

    def spy(self, config, *args):
        configs.append(config)
        original(self, config, *args)

    monkeypatch.setattr(AsyncEngine, "__init__", spy)
    out = tmp_path / "knobs.json"
    code, output = bench(model_dir, "-n", 4, "--output-len", "4", "--async-scheduling", "--kv-cache-dtype", "fp8",
                         "--max-waiting-tokens", 1, "-o", out)
    assert code == 0, output
    [config] = configs
    assert (config.async_scheduling, config.kv_cache_dtype, config.max_waiting_tokens) == (True, "fp8", 1)
    report = json.loads(out.read_text())
    assert report["metrics"]["output_tokens"] == 16 and report["metrics"]["errors"] == 0
    assert {k: report["settings"][k] for k in ("async_scheduling", "kv_cache_dtype", "max_waiting_tokens")} == {
        "async_scheduling": True, "kv_cache_dtype": "fp8", "max_waiting_tokens": 1}


def test_guided_in_process(model_dir, tmp_path):
    out = tmp_path / "guided.json"
    code, output = bench(model_dir, "-n", 2, "--output-len", "8:16", "--guided", SCHEMA, "-o", out)
    assert code == 0, output
    m = json.loads(out.read_text())["metrics"]
    assert m["requests"] == 2 and m["errors"] == 0 and m["output_tokens"] > 0
    code, output = bench(model_dir, "--guided", "{not json")
    assert code == 2 and "JSON schema" in output


def test_dummy_weights_from_config_and_named_shapes(model_dir, tmp_path):
    config = json.loads((model_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 1}))
    for engine, model_class in (("transformers", "LlamaForCausalLM"), ("native", None)):
        out = tmp_path / f"{engine}.json"
        code, output = bench(tmp_path / "config.json", "--load-format", "dummy", "--tokenizer", model_dir,
                             "--engine", engine, "-n", 4, "--input-len", "3:5", "--output-len", "2", "-o", out)
        assert code == 0, output
        report = json.loads(out.read_text())
        assert report["metrics"]["output_tokens"] == 8
        assert report["target"]["engine"] == engine
        assert model_class in (None, report["target"]["model_class"])
        assert report["target"]["max_sequence_length"] == config["max_position_embeddings"]
        assert report["settings"]["load_format"] == "dummy"

    code, output = bench("llama-4-9000b", "--load-format", "dummy")
    assert code == 2 and "llama-3-8b" in output and "qwen3-0.6b" in output
    code, output = bench("qwen3-0.6b", "--load-format", "dummy", "--tokenizer", model_dir, "--grpc", "x:1")
    assert code == 2 and "in-process" in output
    small = tmp_path / "small"
    small.mkdir()
    (small / "config.json").write_text(json.dumps(config | {"vocab_size": 100}))
    code, output = bench(small, "--load-format", "dummy", "--tokenizer", model_dir)
    assert code == 2 and "more than the vocab_size 100" in output


def test_dummy_named_shapes_build():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from runtime.models.dummy import NAMED_SHAPES, dummy_config

    billions = {"llama-3-8b": 8.03, "llama-3.2-1b": 1.24, "qwen3-0.6b": 0.60, "smollm2-135m": 0.135}
    for name, size in billions.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**dummy_config(name.upper())))
        assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(size, rel=0.01), name
    assert set(billions) == set(NAMED_SHAPES)


# ---- gRPC: the real server -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    with running_server(model_dir, tmp_path_factory.mktemp("bench-server"), "--max-batch-size", "8") as srv:
        yield srv


def test_bench_grpc_with_request_rate(server, model_dir, tok, tmp_path):
    out = tmp_path / "grpc.json"
    code, output = bench("--grpc", server.target, "--tokenizer", model_dir, "--metrics-url",
                         f"http://127.0.0.1:{server.http_port}/metrics", "-n", 10, "--input-len", "4:12",
                         "--output-len", "2:6", "--request-rate", 50, "--seed", 2, "-o", out)
    assert code == 0, output
    report = json.loads(out.read_text())
    expected = build_requests(Workload(10, (4, 12), (2, 6), None, 2, request_rate=50.0), tok)
    m = report["metrics"]
    assert m["requests"] == 10 and m["errors"] == 0
    assert m["output_tokens"] == sum(r.output_len for r in expected)
    # the server's own count of the prompts it received (it re-tokenizes the text and adds BOS)
    assert m["prompt_tokens"] == sum(len(tok(r.prompt_text)["input_ids"]) for r in expected)
    assert m["prefix_cache_hit_rate"] == 0.0  # the server's counters: random prompts share no full block
    assert report["target"]["target"] == f"grpc://{server.target}"
    assert report["target"]["server"]["max_sequence_length"] == 512
    assert report["workload"]["request_rate"] == 50.0 and report["workload"]["concurrency"] is None
    counts = server.metrics()
    assert counts['tgi_request_count{kind="stream"}'] >= 10


def test_bench_grpc_guided(server, model_dir, tmp_path):
    out = tmp_path / "guided.json"
    code, output = bench("--grpc", server.target, "--tokenizer", model_dir, "-n", 3, "--output-len", "8:16",
                         "--guided", SCHEMA, "-o", out)
    assert code == 0, output
    assert json.loads(out.read_text())["metrics"]["errors"] == 0


def test_bench_grpc_unreachable(model_dir):
    from server_harness import free_port

    code, output = bench("--grpc", f"127.0.0.1:{free_port()}", "--tokenizer", model_dir)
    assert code == 1
    assert output.strip().splitlines() == [output.strip()] and "no TGIS server answering" in output


# ---- OpenAI streaming client against the wire format -----------------------------------------------------------------

async def _fake_openai(chunks: list[str], usage: dict | None, status: int = 200):
    """A loopback server speaking OpenAI's streamed /v1/completions (chunked server-sent events)."""
    bodies = []

    async def handle(reader, writer):
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        length = next(int(h.split(":")[1]) for h in head.split("\r\n") if h.lower().startswith("content-length"))
        body = await reader.readexactly(length)
        if head.startswith("GET /v1/models"):
            data = json.dumps({"data": [{"id": "served-model"}]}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
        elif status != 200:
            writer.write(b"HTTP/1.1 %d Bad\r\nContent-Length: 5\r\n\r\nnope!" % status)
        else:
            bodies.append(json.loads(body))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            events = [{"choices": [{"text": c, "index": 0, "finish_reason": None}]} for c in chunks]
            events.append({"choices": [{"text": "", "index": 0, "finish_reason": "length"}]})
            if usage:
                events.append({"choices": [], "usage": usage})
            for i, event in enumerate([*(f"data: {json.dumps(e)}\n\n" for e in events), "data: [DONE]\n\n"]):
                if i:
                    await asyncio.sleep(0.3 if i == 1 else 0.01)  # the first token well before the rest
                data = event.encode()
                writer.write(b"%x\r\n%s\r\n" % (len(data), data))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", bodies


def test_openai_client_streams_and_counts(tok):
    reqs = build_requests(Workload(2, (3, 3), (4, 4)), tok)

    async def main(chunks, usage, status=200):
        server, url, bodies = await _fake_openai(chunks, usage, status)
        async with server, OpenAITarget(url, tok, None) as target:
            result = await run_requests(target.prepare(reqs), target.send, 2)
        return target, result, bodies

    target, result, bodies = asyncio.run(main(["a", "b", "c"], {"prompt_tokens": 9, "completion_tokens": 4}))
    assert target.model == "served-model"
    assert bodies[0] | {"prompt": None} == {"model": "served-model", "prompt": None, "max_tokens": 4, "min_tokens": 4,
                                            "temperature": 0.0, "stream": True,
                                            "stream_options": {"include_usage": True}}
    assert {b["prompt"] for b in bodies} == {r.prompt_text for r in reqs}
    rec = result.records[0]
    assert rec.error is None and len(rec.token_times) == 3  # three text chunks, timed as they arrived
    assert rec.start < rec.token_times[0] < rec.token_times[1] - 0.2  # timed as they arrived, not at the end
    assert (rec.prompt_tokens, rec.output_tokens) == (9, 4)  # the usage chunk has the exact counts

    _, result, _ = asyncio.run(main(["a"], None))
    assert (result.records[0].prompt_tokens, result.records[0].output_tokens) == (3, 1)
    _, result, _ = asyncio.run(main([], None, status=400))
    assert [r.error for r in result.records] == ["HTTP 400", "HTTP 400"]
