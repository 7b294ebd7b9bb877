"""What a benchmark sends: the workload settings and the fixed list of requests (and arrival times) they produce.

Everything is drawn from the seed, so the same settings and tokenizer vocabulary give the same requests on every
machine; `identity` records the settings and a digest of the requests, which is what the gate compares.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from runtime.bench.dataset import read_dataset

DEFAULT_OUTPUT_LEN = (16, 64)
FIRST_ID = 16  # random prompt ids avoid the first ids, where special tokens live


@dataclass
class Workload:
    num_requests: int = 32
    input_len: tuple[int, int] = (16, 128)  # uniform range of random prompt tokens (after the shared prefix)
    output_len: tuple[int, int] | None = None  # forced output lengths; None: the dataset's, else DEFAULT_OUTPUT_LEN
    concurrency: int | None = 16  # requests in flight at most; None: unbounded (arrivals set the load)
    seed: int = 0
    shared_prefix: int = 0  # tokens every prompt starts with (the same ones): what prefix caching saves
    dataset: str | None = None  # prompts from this file (runtime/bench/dataset.py) instead of random ids
    request_rate: float | None = None  # Poisson arrivals per second; None: all at once, held back by concurrency
    guided: str | None = None  # a JSON schema every request's output must follow

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class BenchRequest:
    prompt_ids: list[int]  # what the in-process engine receives (no special tokens added)
    prompt_text: str  # what a server receives (it tokenizes, adding its special tokens)
    output_len: int  # forced with min_new_tokens = max_new_tokens (an upper bound only for guided requests)
    guided: str | None = None


def build_requests(workload: Workload, tokenizer) -> list[BenchRequest]:
    """The workload's requests, in order. The shared prefix is the same ids (and text) at the start of every prompt;
    random prompts are uniform ids, dataset prompts are the file's records in order, cycled to `num_requests`."""
    rng = random.Random(workload.seed)
    vocab = len(tokenizer)
    prefix = [rng.randrange(FIRST_ID, vocab) for _ in range(workload.shared_prefix)]
    prefix_text = tokenizer.decode(prefix) if prefix else ""
    out_range = workload.output_len or DEFAULT_OUTPUT_LEN
    requests = []
    if workload.dataset:
        def count(text: str) -> int:
            return len(tokenizer.encode(text, add_special_tokens=False))

        entries = read_dataset(Path(workload.dataset), count)
        for i in range(workload.num_requests):
            entry = entries[i % len(entries)]
            n = entry.output_len if entry.output_len and workload.output_len is None else rng.randint(*out_range)
            ids = tokenizer.encode(entry.prompt, add_special_tokens=False)
            requests.append(BenchRequest(prefix + ids, prefix_text + entry.prompt, n, workload.guided))
        return requests
    for _ in range(workload.num_requests):
        body = [rng.randrange(FIRST_ID, vocab) for _ in range(rng.randint(*workload.input_len))]
        requests.append(BenchRequest(prefix + body, prefix_text + tokenizer.decode(body), rng.randint(*out_range),
                                     workload.guided))
    return requests


def arrival_times(workload: Workload) -> list[float] | None:
    """Seconds after the start at which each request is sent: a seeded Poisson process (exponential gaps, the first
    at 0); None without a request rate (everything is ready at once)."""
    if workload.request_rate is None:
        return None
    rng = random.Random(f"arrivals-{workload.seed}")
    times, t = [], 0.0
    for _ in range(workload.num_requests):
        times.append(t)
        t += rng.expovariate(workload.request_rate)
    return times


def identity(workload: Workload, requests: list[BenchRequest]) -> dict:
    """The workload as reports record it: its settings and a digest of the token ids and lengths it sends."""
    digest = hashlib.sha256()
    for r in requests:
        digest.update(json.dumps([r.prompt_ids, r.output_len, r.guided]).encode())
    return workload.to_dict() | {"requests_sha256": digest.hexdigest()}
