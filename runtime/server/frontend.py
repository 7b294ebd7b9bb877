"""What every API front end (TGIS gRPC, OpenAI HTTP) does around the engine, whatever its wire format.

One instance serves both front ends, so they share the engine's admission limit (`max_concurrent_requests` permits,
never waited on: none left means `Model is overloaded` at once), one request-id sequence, one seed source, the
input preparation and length checks of TGIS (spec §1.5–§1.7) and the per-request metrics and completion log line
(§4.4, §4.7). The wire formats only convert parameters and assemble responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from runtime.engine.inputs import PreparedInput, prepare_input
from runtime.engine.lora import LoraRef
from runtime.engine.request import EngineRequest, GenerationParams, RequestOutput, StopReason
from runtime.models.prefixes import PromptPrefix
from runtime.server.metrics import Metrics
from runtime.server.validation import ValidationError, with_seed

log = logging.getLogger("tgis.server")

OVERLOADED = "Model is overloaded"
_QUIET_REASONS = {StopReason.MAX_TOKENS, StopReason.EOS_TOKEN, StopReason.STOP_SEQUENCE, StopReason.TIME_LIMIT}


class Overloaded(Exception):
    """No permits left; each front end answers it with its own status and `OVERLOADED`."""


@dataclass
class Input:
    """One admitted input: the client's text (for echoes and logs), its token count and the engine request."""

    text: str
    input_length: int
    request: EngineRequest


@dataclass
class Checked:
    """An input that passed tokenization and the length checks, with its (possibly clamped) parameters."""

    text: str
    prepared: PreparedInput
    params: GenerationParams


def reason_name(reason: StopReason) -> str:
    """TGIS logs the Rust Debug form of the enum (`MaxTokens`)."""
    return "".join(part.capitalize() for part in reason.name.split("_"))


class FrontEnd:
    def __init__(self, engine, metrics: Metrics, max_new_tokens: int, max_concurrent_requests: int,
                 tokenization_workers: int = 1):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.metrics = metrics
        self.max_sequence_length: int = engine.max_sequence_length
        self.max_new_tokens = max_new_tokens  # effective server limit: min(configured, S - 1)
        self._free_permits = max_concurrent_requests
        self._ids = itertools.count()
        self._rng = random.Random()
        # tokenization (and what else scales with a request's text) runs here, as TGIS' router's tokenization
        # workers: a multi-megabyte text delays only the work queued behind it, never the event loop
        self._tokenizing = ThreadPoolExecutor(tokenization_workers, thread_name_prefix="tgis-tokenize")

    async def off_loop(self, fn, *args):
        """`fn(*args)` on the tokenization pool."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizing, fn, *args)

    def close(self) -> None:
        """Drop queued tokenization work at shutdown: nobody waits for it any more."""
        self._tokenizing.shutdown(wait=False, cancel_futures=True)

    @contextlib.contextmanager
    def permits(self, n: int):
        """TGIS' semaphore: `n` inputs are admitted together or `Overloaded` is raised (counted as conc_limit)."""
        if self._free_permits < n:
            self.metrics.inc("tgi_request_failure", err="conc_limit")
            raise Overloaded(OVERLOADED)
        self._free_permits -= n
        try:
            yield
        finally:
            self._free_permits += n

    # ---- inputs ----------------------------------------------------------------------------------------------
    def prepare(self, prompt: str | list[int], truncate_input_tokens: int = 0,
                add_special_tokens: bool = True) -> PreparedInput:
        """Tokenize text (a tokenizer failure is the client's: `tokenizer error ...`) or take token ids as they are
        (each must be in the vocabulary), and record the raw length."""
        if isinstance(prompt, list):
            vocab = len(self.tokenizer)
            if any(not 0 <= t < vocab for t in prompt):
                raise ValidationError(f"token ids must be >= 0 and < {vocab} (the vocabulary size)")
            prepared = PreparedInput(prompt, len(prompt), len(prompt))
        else:
            try:
                prepared = prepare_input(self.tokenizer, prompt, truncate_input_tokens, add_special_tokens)
            except Exception as exc:
                raise ValidationError(f"tokenizer error {exc}") from exc
        self.metrics.observe("tgi_request_raw_input_length", prepared.raw_length)
        return prepared

    def admit(self, checked: list[Checked], start: float, prefix: PromptPrefix | None = None,
              lora: LoraRef | None = None) -> list[Input]:
        """Validated inputs → engine requests with their own ids and seeds; validation metrics recorded."""
        self.metrics.observe("tgi_request_validation_duration", time.monotonic() - start)
        inputs = []
        for c in checked:
            self.metrics.observe("tgi_request_input_length", c.prepared.input_length)
            self.metrics.observe("tgi_request_max_new_tokens", c.params.max_new_tokens)
            request = EngineRequest(f"req-{next(self._ids)}", c.prepared.input_ids, with_seed(c.params, self._rng),
                                    prefix, lora)
            inputs.append(Input(c.text, c.prepared.input_length, request))
        return inputs

    def rejected(self) -> None:
        self.metrics.inc("tgi_request_failure", err="validation")

    # ---- outcomes --------------------------------------------------------------------------------------------
    def completed(self, final: RequestOutput, kind: str, label: str, inp: Input, text: str, start: float,
                  correlation_id: str) -> None:
        """Success metrics of spec §4.7 and the completion line of §4.4. A deadline hit while still queued is a
        `timeout` failure in TGIS, not a success."""
        n = final.generated_token_count
        if final.stop_reason == StopReason.TIME_LIMIT and n == 0:
            self.metrics.inc("tgi_request_failure", err="timeout")
        else:
            self.metrics.inc("tgi_request_success", stop_reason=final.stop_reason.name, kind=kind)
            self.metrics.observe("tgi_request_inference_duration", final.inference_time)
            if n:
                self.metrics.observe("tgi_request_mean_time_per_token_duration", final.inference_time / n)
            self.metrics.observe("tgi_request_duration", time.monotonic() - start)
            self.metrics.observe("tgi_request_generated_tokens", n)
            self.metrics.observe("tgi_request_total_tokens", inp.input_length + n)
        level = logging.INFO if final.stop_reason in _QUIET_REASONS else logging.WARNING
        log.log(level, "%s generated %d tokens before %s, output %d bytes: %s", label, n,
                reason_name(final.stop_reason), len(text.encode()), json.dumps(text[:32], ensure_ascii=False),
                extra=self._log_fields(inp, correlation_id))

    def failed(self, out: RequestOutput, label: str, inp: Input, correlation_id: str) -> str:
        """Log a request the engine failed; the client-facing message."""
        log.error("%s generated %d tokens before %s, output 0 bytes: \"\"; error: %s", label,
                  out.generated_token_count, reason_name(StopReason.ERROR), out.error,
                  extra=self._log_fields(inp, correlation_id))
        return f"Request failed during {out.error_stage}: {out.error}"

    def cancelled(self, n: int, correlation_id: str) -> None:
        self.metrics.inc("tgi_request_failure", n, err="cancelled")
        log.warning("%d request(s) cancelled by the client (CANCELLED)", n, extra={"correlation_id": correlation_id})

    @staticmethod
    def _log_fields(inp: Input, correlation_id: str) -> dict:
        return {"correlation_id": correlation_id, "request_id": inp.request.request_id,
                "input_toks": inp.input_length}
