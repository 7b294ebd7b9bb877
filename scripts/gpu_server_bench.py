"""GPU check of the whole server: `tgis serve` in a subprocess, driven over gRPC.

Run on a CUDA machine from the repository root:
    python scripts/gpu_server_bench.py --out server_bench.json

1. Correctness: a small random Llama served in float32 on CUDA; greedy text from Generate for 8 prompts must equal
   transformers' `generate` on the CPU in float32 (the reference); a prompt-tuning prefix must give the same tokens as
   transformers fed the same embeddings, and a LoRA adapter (`adapter_id`) the same as a copy with it merged in.
2. Timing: a Llama-1B-shape random model served in bfloat16; `runtime.bench.bench_grpc` with the workload of
   `scripts/gpu_bench.py` (in-process numbers there), so the two show what the gRPC front end costs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts"), str(ROOT / "tests")]

from gpu_bench import PROMPTS, random_model, script_args, workload  # noqa: E402
from lora_utils import merged_copy, write_lora  # noqa: E402

from runtime.bench import bench_grpc  # noqa: E402


def serve(model: Path, log: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tgis_cli", "serve", "--model-name", str(model), "--host", "127.0.0.1",
           "--grpc-port", "8033", "--port", "3000", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen("http://127.0.0.1:3000/health", timeout=5).status == 200:
                return proc
        except OSError:
            time.sleep(0.5)
        if proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"server did not start:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=60)


def correctness(work: Path) -> dict:
    import grpc
    import models as tiny
    from transformers import LlamaConfig, LlamaForCausalLM

    from proto import generation_pb2 as pb
    from proto import generation_pb2_grpc as pb_grpc

    tok = tiny.llama_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    path = work / "small"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    prefix = torch.randn(5, 256) * 0.5
    (work / "prefixes" / "tuned").mkdir(parents=True)
    torch.save(prefix, work / "prefixes" / "tuned" / "decoder.pt")
    lora = merged_copy(model, write_lora(work / "prefixes" / "lora", model, ["q_proj", "v_proj", "down_proj"], 1))
    expected, expected_prefixed, expected_lora = [], [], []
    with torch.inference_mode():
        for text in PROMPTS:
            ids = tok(text, return_tensors="pt").input_ids
            out = model.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
            expected.append(out[0, ids.shape[1]:].tolist())
            out = lora.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
            expected_lora.append(out[0, ids.shape[1]:].tolist())
            embeds = torch.cat([prefix[None], model.get_input_embeddings()(ids)], dim=1)
            out = model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                 max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
            expected_prefixed.append(out[0].tolist())
    proc = serve(path, work / "small.log", "--dtype", "float32", env={"PREFIX_STORE_PATH": str(work / "prefixes")})
    try:
        stub = pb_grpc.GenerationServiceStub(grpc.insecure_channel("127.0.0.1:8033"))
        params = pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=32),
                               response=pb.ResponseOptions(generated_tokens=True))
        got, got_prefixed, got_lora = ([[t.text for t in r.tokens] for r in stub.Generate(
            pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text=t) for t in PROMPTS], params=params,
                                        adapter_id=p)).responses] for p in ("", "tuned", "lora"))
    finally:
        stop(proc)

    def as_text(rows):
        return [tok.convert_ids_to_tokens(r) for r in rows]

    counts = {f"{kind}identical_sequences": sum(a == b for a, b in zip(g, as_text(e), strict=True))
              for kind, g, e in (("", got, expected), ("prefixed_", got_prefixed, expected_prefixed),
                                 ("lora_", got_lora, expected_lora))}
    return {**counts, "sequences": len(PROMPTS), "ok": all(n == len(PROMPTS) for n in counts.values())}


def main() -> None:
    args, results = script_args("server_bench.json")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results["correctness"] = correctness(work)
        print(json.dumps(results["correctness"]), flush=True)
        path, loaded = random_model(work, "llama-1b")
        loaded.model.save_pretrained(path)
        del loaded
        torch.cuda.empty_cache()
        proc = serve(path, work / "1b.log", "--dtype", "bfloat16", "--max-batch-size", "64",
                     "--max-num-batched-tokens", "16384", "--engine", "transformers", "--max-sequence-length", "1024")
        try:
            from transformers import AutoTokenizer

            results["llama-1b-grpc"] = bench_grpc("127.0.0.1:8033", AutoTokenizer.from_pretrained(path),
                                                  workload(args.requests))
        finally:
            stop(proc)
        print(json.dumps(results["llama-1b-grpc"]), flush=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
