"""The engine core: owns the model and runs `schedule → forward → sample → update → emit`.

It talks to front ends only through messages: `add` / `abort` go into an inbox queue, outputs leave through one
`emit` callback as lists of `RequestOutput`, and per-step statistics through listeners. Nothing else is shared, so
the loop can move from a thread into its own process without the front ends changing.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from runtime.engine.config import EngineConfig
from runtime.engine.detokenizer import DetokenizationError, TokenizerInfo
from runtime.engine.guided import GrammarCompiler, GrammarState
from runtime.engine.kv_cache import KVCacheManager, bytes_per_slot, size_capacity
from runtime.engine.model_runner import Batch, ModelRunner, PrefillItem, layer_groups
from runtime.engine.request import EngineRequest, RequestOutput, StopReason, TokenDetail
from runtime.engine.sampler import (
    Sampler,
    SamplerRow,
    encoder_input_token_details,
    input_token_details,
    make_generator,
)
from runtime.engine.scheduler import Scheduler
from runtime.engine.sequence import SeqStatus, Sequence
from runtime.engine.stopping import DecodeStream
from runtime.models.loader import DEFAULT_MAX_SEQUENCE_LENGTH, LoadedModel, load_model, model_max_sequence_length

if TYPE_CHECKING:
    from runtime.parallel.executor import ShardedRunner

log = logging.getLogger(__name__)


@dataclass
class StepStats:
    """What one engine step did; front ends turn these into metrics (TGIS `tgi_batch_*`, `tgi_queue_*`)."""

    method: str  # "prefill" | "next_token"
    batch_size: int
    duration_s: float = 0.0
    forward_s: float = 0.0
    tokproc_s: float = 0.0
    total_tokens: int = 0
    ok: bool = True
    failure_reason: str | None = None
    queue_size: int = 0
    running: int = 0
    batch_input_tokens: int = 0
    remaining_tokens: int = 0
    concatenated: bool = False
    queue_durations_s: list[float] = field(default_factory=list)
    preempted: int = 0  # running requests sent back to the queue for recomputation (KV cache full)


@dataclass
class Abort:
    """Inbox message: stop a request now (queued or running)."""

    request_id: str


class Shutdown:
    """Inbox message: leave the loop (after the messages before it)."""


@dataclass
class GrammarReady:
    """Inbox message (from the grammar compiler's pool): a guided request's grammar compiled, or failed to."""

    request_id: str


class GrammarRejected(Exception):
    """The grammar refused the sampled token (it cannot when its mask was applied): fails that request alone."""


def _failure_reason(exc: BaseException) -> tuple[str, str]:
    """(metrics reason, client-facing detail) for a failed forward."""
    if isinstance(exc, torch.OutOfMemoryError):
        return "oom", "GPU out of memory"
    return "error", f"Unexpected {type(exc)}: {exc}"


class EngineCore:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None):
        self.config = config
        if loaded is None and config.tensor_parallel_size > 1:
            from runtime.parallel.executor import start_sharded

            self.runner: ModelRunner | ShardedRunner = start_sharded(config)
            self.loaded = self.runner.loaded
        else:
            self.loaded = loaded or load_model(config.model_path, config.dtype, config.device,
                                               config.trust_remote_code)
            self.runner = ModelRunner(self.loaded)
        lm = self.loaded
        self.max_sequence_length = (config.max_sequence_length or model_max_sequence_length(config.model_path)
                                    or DEFAULT_MAX_SEQUENCE_LENGTH)
        self.start_id = lm.decoder_start_token_id if lm.is_encoder_decoder else None
        self.sampler = Sampler(lm.eos_token_id, lm.vocab_size)
        self.grammars = GrammarCompiler(lm.tokenizer, lm.vocab_size, lm.eos_token_id)
        self.compiling: dict[str, tuple[Sequence, Future]] = {}  # guided requests waiting for their grammar
        self.tok_info = TokenizerInfo.from_tokenizer(
            lm.tokenizer, seq2seq=lm.is_encoder_decoder, output_special_tokens=config.output_special_tokens,
            eos_token_id=lm.eos_token_id)
        self.kv = KVCacheManager(self._kv_capacity(), self.start_id)
        self.scheduler = Scheduler(config, self.kv)
        self.batch: Batch | None = None
        self.inbox: queue.Queue = queue.Queue()
        self.emit: Callable[[list[RequestOutput]], None] = lambda outputs: None
        self.listeners: list[Callable[[StepStats], None]] = []
        self.healthy = True

    # ---- messages in -------------------------------------------------------------------------------------
    def add(self, request: EngineRequest) -> None:
        self.inbox.put(request)

    def abort(self, request_id: str) -> None:
        self.inbox.put(Abort(request_id))

    def shutdown(self) -> None:
        self.inbox.put(Shutdown())

    # ---- set-up --------------------------------------------------------------------------------------------
    def _kv_capacity(self) -> int:
        """Slots from config, else measured bytes per slot (a 2-token warm-up prefill) against free memory."""
        per_request = self.max_sequence_length * (2 if self.start_id is not None else 1)
        if self.config.kv_cache_tokens:
            if self.config.kv_cache_tokens < per_request:  # a full-length request could then never be admitted
                raise ValueError(f"kv_cache_tokens ({self.config.kv_cache_tokens}) must be at least one full "
                                 f"request's slots ({per_request} for max_sequence_length "
                                 f"{self.max_sequence_length})")
            return self.config.kv_cache_tokens
        probe = PrefillItem(tokens=[self.loaded.pad_token_id] * 2,
                            encoder_ids=None if self.start_id is None else [self.loaded.pad_token_id])
        batch, _, _ = self.runner.prefill([probe])
        tensors = [t for group in layer_groups(batch.cache) for layer in group for t in (layer.keys, layer.values)]
        per_slot = bytes_per_slot(tensors, batch.slots)
        return size_capacity(per_slot, self.loaded.device, self.config.kv_cache_memory_fraction,
                             self.config.max_batch_size * per_request, per_request)

    # ---- the loop ------------------------------------------------------------------------------------------
    def run(self) -> None:
        """Run until a shutdown message arrives."""
        try:
            while True:
                try:
                    idle = not self.scheduler.running and not self.scheduler.waiting
                    if not self._drain_inbox(block=idle):
                        return
                    self.step()
                except Exception as exc:  # a bug in our own bookkeeping: fail everything in flight, keep serving
                    log.exception("engine step failed")
                    self._fail_all(_failure_reason(exc)[1])
        finally:
            self.grammars.close()
            self.runner.close()

    def _drain_inbox(self, block: bool) -> bool:
        """Apply queued messages; False on shutdown."""
        while True:
            try:
                msg = self.inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if isinstance(msg, Shutdown):
                return False
            if isinstance(msg, Abort):
                self._abort(msg.request_id)
            elif isinstance(msg, GrammarReady):
                self._grammar_ready(msg.request_id)
            else:
                self._admit(msg)

    def _admit(self, request: EngineRequest) -> None:
        try:
            seq = self._new_sequence(request)
        except Exception as exc:  # noqa: BLE001 - a bad request must fail alone, never stall its caller
            log.exception("could not set up request %s", request.request_id)
            self.emit([RequestOutput(request.request_id, finished=True, stop_reason=StopReason.ERROR,
                                     error=_failure_reason(exc)[1])])
            return
        if request.params.guided is None:
            self.scheduler.add(seq)
            return
        # compiled in the pool (at once from the cache); the request joins the queue when its grammar is ready
        future = self.grammars.compile(request.params.guided)
        self.compiling[seq.id] = (seq, future)
        future.add_done_callback(lambda _: self.inbox.put(GrammarReady(seq.id)))

    def _grammar_ready(self, request_id: str) -> None:
        seq, future = self.compiling.pop(request_id, (None, None))
        if seq is None:  # aborted while compiling
            return
        try:
            seq.guide = GrammarState(future.result())
        except Exception as exc:  # noqa: BLE001 - the front end compiled it already; whatever failed here fails it alone
            log.error("grammar for %s failed in the engine: %s", request_id, exc)
            self.emit([self._error_output(seq, str(exc))])
            return
        self.scheduler.add(seq)

    def _new_sequence(self, request: EngineRequest) -> Sequence:
        p = request.params
        stream = DecodeStream(self.tok_info, p.stop_sequences, p.include_stop_sequence, p.stream)
        gen = make_generator(p.seed or 0, self.loaded.device) if p.sampling else None
        return Sequence(request, stream, gen)

    def _abort(self, request_id: str) -> None:
        if self.compiling.pop(request_id, None) is not None:
            return
        seq = self.scheduler.find(request_id)
        if seq is None:
            return
        if seq.status is SeqStatus.WAITING:
            self.scheduler.remove_waiting([seq])
            seq.status = SeqStatus.FINISHED
        else:
            seq.aborted = True
            self._drop_finished()

    def step(self) -> None:
        now = time.monotonic()
        expired = self.scheduler.expired(now)
        if expired:
            self.scheduler.remove_waiting(expired)
            self.emit([self._finish_unstarted(s) for s in expired])
        new = self.scheduler.schedule_prefill()
        if new:
            self._prefill(new)
        if self.scheduler.running:
            self._decode()

    def _finish_unstarted(self, seq: Sequence) -> RequestOutput:
        seq.status = SeqStatus.FINISHED
        return RequestOutput(seq.id, finished=True, stop_reason=StopReason.TIME_LIMIT, output_text="",
                             queue_time=time.monotonic() - seq.arrival)

    def _prefill(self, seqs: list[Sequence]) -> None:
        t0 = time.monotonic()
        items = [s.prefill_item(self.start_id) for s in seqs]
        stats = StepStats("prefill", len(seqs), total_tokens=len(seqs) * max(len(it.tokens) for it in items),
                          concatenated=self.batch is not None)
        try:
            batch, logits, prompt_logits = self.runner.prefill(items)
            t1 = time.monotonic()
            outputs = self._sample_and_advance(seqs, logits, prompt_logits, t0)
        except Exception as exc:  # noqa: BLE001 - any model failure fails just the new entries (TGIS §2.4)
            self._fail(seqs, stats, exc)
            return
        for seq in seqs:
            if seq.first_scheduled is None:
                seq.first_scheduled = t0
                stats.queue_durations_s.append(t0 - seq.arrival)
        self.batch = self.runner.merge(self.batch, batch)
        self.scheduler.running.extend(seqs)
        self._drop_finished()
        self.emit(outputs)
        t2 = time.monotonic()
        stats.forward_s, stats.tokproc_s, stats.duration_s = t1 - t0, t2 - t1, t2 - t0
        self._publish(stats)

    def _decode(self) -> None:
        preempted = self.scheduler.preempt_for_step()
        if preempted:
            log.info("KV cache full: preempted %d request(s) for recomputation", len(preempted))
            self.batch = self.runner.keep(self.batch, list(range(len(self.scheduler.running))))
        seqs = list(self.scheduler.running)
        t0 = time.monotonic()
        stats = StepStats("next_token", len(seqs), preempted=len(preempted))
        try:
            last = torch.tensor([s.generated[-1] for s in seqs], dtype=torch.long)
            logits = self.runner.decode(self.batch, last)
            t1 = time.monotonic()
            outputs = self._sample_and_advance(seqs, logits, None, t0)
        except Exception as exc:  # noqa: BLE001 - a failed step fails every running entry (TGIS §2.4)
            self.batch = None
            self.scheduler.running.clear()
            self._fail(seqs, stats, exc)
            return
        self.scheduler.waiting_steps += 1
        self._drop_finished()
        self.emit(outputs)
        t2 = time.monotonic()
        stats.forward_s, stats.tokproc_s, stats.duration_s = t1 - t0, t2 - t1, t2 - t0
        self._publish(stats)

    def _sample_and_advance(self, seqs: list[Sequence], logits: torch.Tensor,
                            prompt_logits: list[torch.Tensor | None] | None, started: float) -> list[RequestOutput]:
        rows = [SamplerRow(s.params, len(s.generated), self._history(s), s.generator, s.guide) for s in seqs]
        result = self.sampler(logits, rows)
        now = time.monotonic()
        outputs = []
        for i, seq in enumerate(seqs):
            try:
                out = self._advance(seq, result.token_ids[i], result.details[i], now)
            except (DetokenizationError, GrammarRejected) as exc:  # fails this request alone (spec §3.2)
                seq.status = SeqStatus.FINISHED
                stage = "detokenization" if isinstance(exc, DetokenizationError) else "generation"
                out = RequestOutput(seq.id, generated_token_count=len(seq.generated), finished=True,
                                    stop_reason=StopReason.ERROR, error=str(exc), error_stage=stage)
            if seq.params.input_tokens and not seq.input_details_sent:
                out.input_tokens = self._input_details(seq, None if prompt_logits is None else prompt_logits[i])
                seq.input_details_sent = True
            if not seq.aborted:
                outputs.append(out)
        return outputs

    def _history(self, seq: Sequence) -> list[int]:
        """Repetition-penalty ids; only rows with a penalty read them, so the others skip the O(length) copy."""
        return seq.decoder_tokens(self.start_id) if seq.params.repetition_penalty != 1.0 else []

    def _input_details(self, seq: Sequence, prompt_logits: torch.Tensor | None) -> list[TokenDetail]:
        ids = seq.prefixed_prompt(self.start_id is not None)
        if self.start_id is not None:
            return encoder_input_token_details(ids, seq.params)
        return input_token_details(prompt_logits[: len(ids)], ids, seq.params)

    def _advance(self, seq: Sequence, token: int, detail: TokenDetail | None, now: float) -> RequestOutput:
        """Append one token and apply TGIS' stop-reason precedence (§1.11). A guided sequence whose grammar
        accepted EOS has finished, even before min_new_tokens (the grammar allowed nothing else)."""
        p = seq.params
        if seq.guide is not None and not seq.guide.accept(token):
            raise GrammarRejected(f"the grammar rejected token {token}")
        seq.generated.append(token)
        n = len(seq.generated)
        grammar_done = seq.guide is not None and seq.guide.finished
        eos = token == self.loaded.eos_token_id or grammar_done
        reason = None
        if seq.deadline_passed(now):
            reason = StopReason.TIME_LIMIT
        elif n < p.min_new_tokens and not grammar_done:
            pass
        elif eos:
            reason = StopReason.EOS_TOKEN
        elif n >= p.max_new_tokens:
            reason = StopReason.TOKEN_LIMIT if p.max_is_token_limit else StopReason.MAX_TOKENS
        text = "" if eos else seq.stream.add(token)
        stop = None
        if reason is None and n >= p.min_new_tokens:
            stop = seq.stream.match_stop()
            if stop is not None:
                reason = StopReason.STOP_SEQUENCE
        out = RequestOutput(seq.id, [token], text, n, [detail] if detail is not None else [])
        if reason is not None:
            out.text += seq.stream.finish(stop)
            out.finished, out.stop_reason, out.stop_sequence = True, reason, stop
            out.output_text = seq.stream.text
            out.queue_time = (seq.first_scheduled or now) - seq.arrival
            out.inference_time = now - (seq.first_scheduled or now)
            seq.status = SeqStatus.FINISHED
        return out

    def _drop_finished(self) -> None:
        """Remove finished and aborted rows from the running batch."""
        running = self.scheduler.running
        keep = [i for i, s in enumerate(running) if s.status is SeqStatus.RUNNING and not s.aborted]
        if len(keep) != len(running):
            for i, s in enumerate(running):
                if i not in keep:
                    s.status = SeqStatus.FINISHED
            self.batch = self.runner.keep(self.batch, keep) if self.batch is not None else None
            self.scheduler.running = [running[i] for i in keep]

    def _fail(self, seqs: list[Sequence], stats: StepStats, exc: BaseException) -> None:
        reason, detail = _failure_reason(exc)
        log.error("%s step failed: %s", stats.method, detail)
        self.healthy = False
        for seq in seqs:
            seq.status = SeqStatus.FINISHED
        done = [s for s in seqs if not s.aborted]
        self.emit([self._error_output(s, detail) for s in done])
        stats.ok, stats.failure_reason = False, reason
        self._publish(stats)

    def _fail_all(self, detail: str) -> None:
        seqs = [*self.scheduler.running, *self.scheduler.waiting]
        self.scheduler.running.clear()
        self.scheduler.waiting.clear()
        self.batch = None
        self.healthy = False
        self.emit([self._error_output(s, detail) for s in seqs if not s.aborted])

    @staticmethod
    def _error_output(seq: Sequence, detail: str) -> RequestOutput:
        n = len(seq.generated)
        prefix = f"Error after generating {n} tokens: " if n else ""
        return RequestOutput(seq.id, generated_token_count=n, finished=True, stop_reason=StopReason.ERROR,
                             error=prefix + detail)

    def _publish(self, stats: StepStats) -> None:
        if stats.ok:
            self.healthy = True
        sched = self.scheduler
        stats.queue_size = len(sched.waiting)
        stats.running = len(sched.running)
        stats.batch_input_tokens = self.batch.mask.numel() if self.batch is not None else 0
        stats.remaining_tokens = sum(s.remaining for s in sched.running)
        for fn in self.listeners:
            fn(stats)

