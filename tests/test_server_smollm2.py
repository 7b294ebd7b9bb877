"""`tgis serve` with the real SmolLM2-135M-Instruct (float32, S=200, max_new_tokens 169, as TGIS' own tests):
greedy parity with transformers, TOKEN_LIMIT clamping, and a graceful SIGTERM during a running stream."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import torch
from server_harness import REPO, running_server
from transformers import AutoModelForCausalLM, AutoTokenizer

from proto import generation_pb2 as pb

pytestmark = pytest.mark.slow
T = 120


@pytest.fixture(scope="module")
def server(smollm2_dir, tmp_path_factory):
    # a grace period no busy machine runs out of: the SIGTERM test measures the exit from the stream's end
    with running_server(smollm2_dir, tmp_path_factory.mktemp("smollm2"), "--dtype", "float32",
                        "--max-sequence-length", "200", "--max-new-tokens", "169",
                        "--shutdown-grace-period", "600") as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(server):
    with server.channel() as channel:
        yield server.stub(channel)


def test_model_info(stub):
    info = stub.ModelInfo(pb.ModelInfoRequest(), timeout=T)
    assert (info.model_kind, info.max_sequence_length, info.max_new_tokens) == (
        pb.ModelInfoResponse.DECODER_ONLY, 200, 169)


def test_greedy_matches_transformers(stub, smollm2_dir):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    prompts = ["The capital of France is", "def fibonacci(n):"]
    resp = stub.Generate(pb.BatchedGenerationRequest(
        requests=[pb.GenerationRequest(text=p) for p in prompts],
        params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=24))), timeout=T)
    for prompt, r in zip(prompts, resp.responses, strict=True):
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
        assert r.text == tok.decode(out, skip_special_tokens=True)
        assert r.generated_token_count == len(out) and r.input_token_count == ids.shape[1]
    assert "Paris" in resp.responses[0].text


def test_token_limit_when_output_does_not_fit(stub):
    text = "one two three four five six seven eight nine ten " * 40
    [r] = stub.Generate(pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text=text)], params=pb.Parameters(
        truncate_input_tokens=186, stopping=pb.StoppingCriteria(max_new_tokens=100, min_new_tokens=14))),
        timeout=T).responses
    assert (r.input_token_count, r.generated_token_count, r.stop_reason) == (186, 14, pb.TOKEN_LIMIT)


def test_readme_python_client_works(server):
    readme = (REPO / "README.md").read_text()
    block = readme.split("From Python", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert "localhost:8033" in block
    out = subprocess.run([sys.executable, "-c", block.replace("localhost:8033", server.target)], cwd=REPO,
                         capture_output=True, text=True, timeout=T)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def test_sigterm_lets_the_running_stream_finish_then_exits_0(server, stub):
    req = pb.SingleGenerationRequest(request=pb.GenerationRequest(text="Tell me a long story."), params=pb.Parameters(
        stopping=pb.StoppingCriteria(max_new_tokens=50, min_new_tokens=50)))
    call = stub.GenerateStream(req, timeout=5 * T)  # 50 tokens on a loaded 2-core machine can take minutes
    msgs = [next(call), next(call)]
    server.signal(signal.SIGTERM)
    msgs += list(call)
    assert (msgs[-1].stop_reason, msgs[-1].generated_token_count) == (pb.MAX_TOKENS, 50)
    assert server.wait(timeout=30) == 0  # it leaves once nothing is in flight, long before the grace period ends
    assert "Shutdown complete" in server.logs()
