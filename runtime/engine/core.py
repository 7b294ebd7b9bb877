"""The engine core: `schedule → execute the plan → sample → update sequences → emit`, once per step.

It talks to front ends only through messages: `add` / `abort` go into an inbox queue, outputs leave through one
`emit` callback as lists of `RequestOutput`, and per-step statistics through listeners. The runner sees only step
plans; the core never reads a runner's internals. Nothing a client sends may raise inside a step: what is one
request's fault fails that request alone.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from runtime.engine.config import EngineConfig
from runtime.engine.detokenizer import DetokenizationError, TokenizerInfo
from runtime.engine.guided import GrammarCompiler, GrammarState
from runtime.engine.kv_cache import PaddedKVManager, PagedKVManager
from runtime.engine.plan import ModelOutput, RowPlan, StepPlan
from runtime.engine.request import EngineRequest, RequestOutput, StopReason, TokenDetail
from runtime.engine.runner import make_runner
from runtime.engine.sampler import (
    Sampler,
    SampleResult,
    SamplerRow,
    TokenHistory,
    encoder_input_token_details,
    input_token_details,
    make_generator,
)
from runtime.engine.scheduler import Scheduled, Scheduler
from runtime.engine.sequence import SeqStatus, Sequence, new_sequence
from runtime.engine.staging import to_device
from runtime.engine.stopping import DecodeStream
from runtime.models.loader import DEFAULT_MAX_SEQUENCE_LENGTH, LoadedModel, model_max_sequence_length

log = logging.getLogger(__name__)


@dataclass
class StepStats:
    """What one engine step did; front ends turn these into metrics (TGIS `tgi_batch_*`, `tgi_queue_*`).

    `method` is "prefill" when the step computed prompt tokens (possibly beside decodes: `decode_rows`), else
    "next_token"; "idle" carries only the gauges, after work left the batch outside a step (an abort)."""

    method: str
    batch_size: int
    duration_s: float = 0.0
    forward_s: float = 0.0
    tokproc_s: float = 0.0
    total_tokens: int = 0  # prompt tokens computed this step
    ok: bool = True
    failure_reason: str | None = None
    queue_size: int = 0
    running: int = 0
    batch_input_tokens: int = 0
    remaining_tokens: int = 0
    concatenated: bool = False
    queue_durations_s: list[float] = field(default_factory=list)
    preempted: int = 0  # running requests sent back to the queue for recomputation (KV cache full)
    prompt_rows: int = 0  # rows computing prompt tokens
    decode_rows: int = 0  # rows computing one generated token
    scheduled_tokens: int = 0  # tokens computed this step (the budget's use)
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache this step
    prefix_cache_hits: int = 0  # of those, tokens found computed


@dataclass
class Abort:
    """Inbox message: stop a request now (queued or running)."""

    request_id: str


class Shutdown:
    """Inbox message: drop all work and leave the loop (after the messages before it)."""


@dataclass
class GrammarReady:
    """Inbox message (from the grammar compiler's pool): a guided request's grammar compiled, or failed to."""

    request_id: str


class GrammarRejected(Exception):
    """The grammar refused the sampled token (it cannot when its mask was applied): fails that request alone."""


@dataclass
class InFlight:
    """A launched step whose sampled ids the host has not read yet: its rows, what the runner returned, the
    sequences sampled (in the order of `chosen`) and how to read them back."""

    number: int
    rows: list[tuple[Sequence, int]]
    plan: StepPlan
    output: ModelOutput
    stats: StepStats
    started: float
    launched: float
    sampled: list[Sequence] = field(default_factory=list)
    chosen: torch.Tensor | None = None  # the sampled ids on the device
    read: Callable[[], tuple[list[int | None], list]] | None = None  # ids and details on the host (synchronises)


def _top_n_details(p) -> bool:
    """Top-n token details: computed when the step is read back (their size per row depends on the scores)."""
    return p.generated_tokens and p.top_n_tokens > 0


def _failure_reason(exc: BaseException) -> tuple[str, str]:
    """(metrics reason, client-facing detail) for a failed forward."""
    if isinstance(exc, torch.OutOfMemoryError):
        return "oom", "GPU out of memory"
    return "error", f"Unexpected {type(exc)}: {exc}"


class EngineCore:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None):
        self.config = config
        self.runner = make_runner(config, loaded)
        self.loaded = lm = self.runner.loaded
        self.max_sequence_length = (config.max_sequence_length or model_max_sequence_length(config.model_path)
                                    or DEFAULT_MAX_SEQUENCE_LENGTH)
        self.start_id = lm.decoder_start_token_id if lm.is_encoder_decoder else None
        self.sampler = Sampler(lm.eos_token_id, lm.vocab_size)
        self.grammars = GrammarCompiler(lm.tokenizer, lm.vocab_size, lm.eos_token_id)
        self.compiling: dict[str, tuple[Sequence, Future]] = {}  # guided requests waiting for their grammar
        self.tok_info = TokenizerInfo.from_tokenizer(
            lm.tokenizer, seq2seq=lm.is_encoder_decoder, output_special_tokens=config.output_special_tokens,
            eos_token_id=lm.eos_token_id)
        per_request = self.max_sequence_length * (2 if lm.is_encoder_decoder else 1)
        if config.kv_cache_tokens and config.kv_cache_tokens < per_request:  # it could never be admitted
            raise ValueError(f"kv_cache_tokens ({config.kv_cache_tokens}) must be at least one full request's slots "
                             f"({per_request} for max_sequence_length {self.max_sequence_length})")
        capacity = self.runner.kv_capacity(config, self.max_sequence_length)
        if self.runner.paged:
            self.kv: PagedKVManager | PaddedKVManager = PagedKVManager(capacity, config.block_size,
                                                                      config.prefix_caching)
            if (capacity - 1) * config.block_size < self.max_sequence_length:
                raise ValueError(f"the KV cache holds {(capacity - 1) * config.block_size} tokens, less than one "
                                 f"full request (max_sequence_length {self.max_sequence_length})")
        else:
            self.kv = PaddedKVManager(capacity, lm.is_encoder_decoder)
        chunked = self.runner.chunked_prefill and config.chunked_prefill
        self.scheduler = Scheduler(config, self.kv, config.token_budget(lm.device.type), chunked,
                                   padded=not self.runner.paged)
        self.plan_ahead = self._async_scheduling(config)
        log.info("engine loop: async scheduling %s", "on" if self.plan_ahead else "off")
        self.in_flight: InFlight | None = None
        self.steps = 0  # steps launched
        self.steps_ahead = 0  # of those, planned while the one before was still in flight
        self.released: list[str] = []  # sequences whose runner state goes with the next plan
        self.inbox: queue.Queue = queue.Queue()
        self.emit: Callable[[list[RequestOutput]], None] = lambda outputs: None
        self.listeners: list[Callable[[StepStats], None]] = []
        self.healthy = True

    def _async_scheduling(self, config: EngineConfig) -> bool:
        """Plan and launch step N+1 while the GPU runs step N (vLLM v1's async scheduling): the host's per-step work
        (scheduling, inputs, reading back, detokenizing, emitting) then overlaps the forward. Needs a runner that
        takes a row's last id from the device (the native one, in this process); default: on CUDA."""
        able = getattr(self.runner, "reads_device_tokens", False)
        wanted = config.async_scheduling
        if wanted is None:
            return able and self.loaded.device.type == "cuda"
        if wanted and not able:
            log.info("async scheduling: not with this runner (the native engine in one process has it)")
        return wanted and able

    # ---- messages in -------------------------------------------------------------------------------------
    def add(self, request: EngineRequest) -> None:
        self.inbox.put(request)

    def abort(self, request_id: str) -> None:
        self.inbox.put(Abort(request_id))

    def shutdown(self) -> None:
        self.inbox.put(Shutdown())

    # ---- the loop ------------------------------------------------------------------------------------------
    def run(self) -> None:
        """Run until a shutdown message arrives."""
        try:
            while True:
                try:
                    idle = not self.scheduler.running and not self.scheduler.waiting and self.in_flight is None
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
        """Apply queued messages; False on shutdown (all work is dropped: nobody waits for it any more)."""
        dropped = False
        while True:
            try:
                msg = self.inbox.get(block=block)
            except queue.Empty:
                break
            block = False
            if isinstance(msg, Shutdown):
                self.scheduler.finish(list(self.scheduler.running))
                self.scheduler.waiting.clear()
                self.compiling.clear()
                return False
            if isinstance(msg, Abort):
                dropped |= self._abort(msg.request_id)
            elif isinstance(msg, GrammarReady):
                self._grammar_ready(msg.request_id)
            else:
                self._admit(msg)
        if dropped and not self.scheduler.running:
            self._publish(StepStats("idle", 0))  # gauges must be true at rest too
        return True

    def _admit(self, request: EngineRequest) -> None:
        try:
            seq = self._new_sequence(request)
        except Exception as exc:  # noqa: BLE001 - a bad request must fail alone, never stall its caller
            log.exception("could not set up request %s", request.request_id)
            self.emit([RequestOutput(request.request_id, finished=True, stop_reason=StopReason.ERROR,
                                     error=str(exc) if isinstance(exc, ValueError) else _failure_reason(exc)[1])])
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
        if not request.input_ids and self.start_id is None:
            raise ValueError("the input has no tokens to generate from")
        if request.lora is not None:
            self.runner.check_adapter(request.lora)  # a broken adapter fails its request here, never a step
        p = request.params
        stream = DecodeStream(self.tok_info, p.stop_sequences, p.include_stop_sequence, p.stream)
        gen = make_generator(p.seed or 0, self.loaded.device) if p.sampling else None
        return new_sequence(request, stream, gen, self.start_id)

    def _abort(self, request_id: str) -> bool:
        """True when a running sequence left the batch."""
        if self.compiling.pop(request_id, None) is not None:
            return False
        seq = self.scheduler.find(request_id)
        if seq is None:
            return False
        seq.aborted = True
        if seq.status is SeqStatus.WAITING:
            self.scheduler.remove_waiting([seq])
            self.scheduler.kv.release(seq)
            seq.status = SeqStatus.FINISHED
            return False
        self._leave([seq])
        return True

    def _leave(self, seqs: list[Sequence]) -> None:
        """Running sequences leave the batch: the cache and, with the next plan, the runner let go of them."""
        self.scheduler.finish(seqs)
        for seq in seqs:
            if seq.runner_has_state:
                self.released.append(seq.id)
                seq.runner_has_state = False

    # ---- one step ------------------------------------------------------------------------------------------
    def step(self) -> None:
        """Schedule and launch a step, then read back the one launched before it (async scheduling) or this one."""
        if self.in_flight is not None and not self._can_plan_ahead():
            self._finish(self._take_in_flight())
        counters = (self.kv.counters.queries, self.kv.counters.hits) if self.runner.paged else (0, 0)
        sched = self.scheduler.schedule()  # admissions look prompts up in the prefix cache
        expired = self.scheduler.expired(time.monotonic())  # after scheduling: a request that reached a batch
        if expired:                                          # always gets its first token (spec §1.11)
            self.scheduler.remove_waiting(expired)
            self.emit([self._finish_unstarted(s) for s in expired])
        for seq in sched.preempted:
            log.info("KV cache full: preempted %s for recomputation", seq.id)
            if seq.runner_has_state:
                self.released.append(seq.id)
                seq.runner_has_state = False
            seq.sent_blocks = 0
            if not seq.input_details_sent:  # a prompt preempted mid-prefill is scored again from its start
                seq.input_details = []
        if not sched.rows:
            if self.in_flight is not None:
                self._finish(self._take_in_flight())
            if self.released:
                self.runner.execute(StepPlan([], self._take_released()))
            return
        launched = self._launch(sched, counters)
        previous, self.in_flight = self.in_flight, launched
        if previous is not None:
            self.steps_ahead += 1
            self._finish(previous)
        if not self.plan_ahead and self.in_flight is not None:
            self._finish(self._take_in_flight())

    def _can_plan_ahead(self) -> bool:
        """Whether the next step may be planned before the in-flight one is read back: only when nothing in it needs
        the in-flight ids on the host. A grammar must accept its token before it masks the next one, and a preempted
        sequence must not have a token in flight, so every running sequence needs room for its next token. Top-n
        tokens and input-token details are computed on reading back: launched behind the next step, they would make
        every stream wait a step longer (token logprobs and ranks are queued with the ids)."""
        running = self.scheduler.running
        return (self.plan_ahead and self.kv.num_free >= len(running) and not any(
            s.guide is not None or s.wants_input_details or _top_n_details(s.params) for s in running))

    def _take_in_flight(self) -> InFlight:
        step, self.in_flight = self.in_flight, None
        return step

    def _take_released(self) -> list[str]:
        released, self.released = self.released, []
        return released

    def _launch(self, sched: Scheduled, counters: tuple[int, int]) -> InFlight | None:
        """Plan, run and sample a step without waiting for the device; None if the forward failed."""
        t0 = time.monotonic()
        prev = self.in_flight
        plan = StepPlan([self._row_plan(seq, n) for seq, n in sched.rows], self._take_released(),
                        prev_tokens=prev.chosen if prev is not None else None)
        prompt_rows = [r for r in plan.rows if not r.is_decode]
        stats = StepStats("prefill" if prompt_rows else "next_token", len(plan.rows), preempted=len(sched.preempted),
                          prompt_rows=len(prompt_rows), decode_rows=len(plan.rows) - len(prompt_rows),
                          scheduled_tokens=plan.num_tokens, total_tokens=sum(len(r.tokens) for r in prompt_rows),
                          concatenated=bool(sched.admitted) and len(sched.admitted) < len(plan.rows))
        if self.runner.paged:
            stats.prefix_cache_queries = self.kv.counters.queries - counters[0]
            stats.prefix_cache_hits = self.kv.counters.hits - counters[1]
        seqs = [seq for seq, _ in sched.rows]
        for seq in sched.admitted:
            if seq.first_scheduled is None:
                seq.first_scheduled = t0
                stats.queue_durations_s.append(t0 - seq.arrival)
        try:
            output = self.runner.execute(plan)
        except Exception as exc:  # noqa: BLE001 - a failed forward fails the rows it computed (TGIS §2.4)
            self._fail(seqs, stats, exc)
            return None
        for seq, n in sched.rows:
            seq.num_computed += n
            seq.runner_has_state = True
            self.kv.commit(seq)
        self.steps += 1
        step = InFlight(self.steps, sched.rows, plan, output, stats, t0, time.monotonic())
        logit_rows: list[int] = []  # output.logits has one row per sampled plan row, in plan order
        position = 0
        for (seq, _), row in zip(sched.rows, plan.rows, strict=True):
            if row.sample:
                if seq.status is SeqStatus.RUNNING:
                    step.sampled.append(seq)
                    logit_rows.append(position)
                position += 1
        if step.sampled:
            logits = output.logits
            if len(logit_rows) != position:
                logits = logits[to_device(logit_rows, torch.long, logits.device)]
            step.chosen, step.read = self._sample(logits, step.sampled)
            for i, seq in enumerate(step.sampled):
                seq.pending = (step.number, i)
        return step

    def _row_plan(self, seq: Sequence, n: int) -> RowPlan:
        start, new = seq.num_computed, not seq.runner_has_state
        prefix = seq.request.prefix
        tokens = seq.tokens[start:start + n]
        pending = -1
        if len(tokens) < n:  # the last one is still on the device, sampled by the step in flight
            tokens.append(0)
            pending = seq.pending[1]
        row = RowPlan(seq.id, tokens, start, sample=start + n == seq.num_tokens,
                      prompt_logits=seq.wants_input_details and self.start_id is None, new=new,
                      new_blocks=seq.blocks[seq.sent_blocks:], reused_blocks=start // self.config.block_size if new
                      else 0, pending=pending)
        seq.sent_blocks = len(seq.blocks)
        if new:
            row.encoder_ids = seq.encoder_ids
            row.lora = seq.request.lora
            if prefix is not None:
                row.decoder_prefix, row.encoder_prefix = prefix.decoder, prefix.encoder
        return row

    def _finish(self, step: InFlight) -> None:
        """Read a launched step back: input-token details of its prompt rows, then one token for every sampled
        sequence still running (one that finished or left meanwhile computed a token nobody gets), then emit. What
        fails for one request (its details, its sampling parameters, its text, its grammar) fails it alone."""
        t1 = time.monotonic()
        outputs: list[RequestOutput] = []
        for (seq, _), row in zip(step.rows, step.plan.rows, strict=True):
            if row.prompt_logits and seq.status is SeqStatus.RUNNING:
                try:
                    self._collect_input_details(seq, row, step.output.prompt_logits[row.seq_id])
                except Exception:  # noqa: BLE001
                    log.exception("input-token details failed for request %s", seq.id)
                    self._failed(seq, "scoring the input tokens failed", outputs)
        if step.sampled:
            tokens, details = step.read()
            now = time.monotonic()
            for i, seq in enumerate(step.sampled):
                if seq.pending == (step.number, i):
                    seq.pending = None
                if seq.status is not SeqStatus.RUNNING or seq.aborted:
                    continue
                if tokens[i] is None:  # this request's own parameters broke sampling
                    self._failed(seq, "sampling failed for this request's parameters", outputs)
                    continue
                outputs.append(self._advance_safely(seq, tokens[i], details[i], now))
        self._leave([s for s, _ in step.rows if s.status is SeqStatus.FINISHED and s.runner_has_state])
        self.emit(outputs)
        if self.config.debug_checks and self.runner.paged:
            self.kv.check(self.scheduler.running + list(self.scheduler.waiting))
        t2 = time.monotonic()
        stats = step.stats
        stats.forward_s, stats.tokproc_s, stats.duration_s = step.launched - step.started, t2 - t1, t2 - step.started
        self._publish(stats)

    def _advance_safely(self, seq: Sequence, token: int, detail: TokenDetail | None, now: float) -> RequestOutput:
        try:
            out = self._advance(seq, token, detail, now)
        except (DetokenizationError, GrammarRejected) as exc:  # fails this request alone (spec §3.2)
            seq.status = SeqStatus.FINISHED
            stage = "detokenization" if isinstance(exc, DetokenizationError) else "generation"
            out = RequestOutput(seq.id, generated_token_count=len(seq.generated), finished=True,
                                stop_reason=StopReason.ERROR, error=str(exc), error_stage=stage)
        if seq.params.input_tokens and not seq.input_details_sent:
            out.input_tokens = self._input_details(seq)
            seq.input_details_sent = True
        return out

    def _failed(self, seq: Sequence, detail: str, outputs: list[RequestOutput]) -> None:
        """One request fails alone; a client that already went away gets nothing."""
        seq.status = SeqStatus.FINISHED
        if not seq.aborted:
            outputs.append(self._error_output(seq, detail))

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]):
        """Queue the batch's sampling: (the ids on the device, how to read ids and details back). If the batch
        raises, each row alone, so that only rows that fail by themselves fail (their id: None)."""
        rows = [self._sampler_row(s) for s in seqs]
        try:
            sampled = self.sampler.launch(logits, rows)
        except Exception:  # noqa: BLE001 - isolate the row at fault
            log.exception("sampling failed for a batch of %d; retrying row by row", len(rows))
            tokens, details = self._sample_rows(logits, rows, seqs)
            chosen = to_device([t or 0 for t in tokens], torch.long, logits.device)
            return chosen, lambda: (tokens, details)

        def read() -> tuple[list[int | None], list]:
            try:
                result: SampleResult = sampled.result()
                return result.token_ids, result.details
            except Exception:  # noqa: BLE001
                log.exception("reading back a batch of %d failed; sampling row by row", len(rows))
                return self._sample_rows(logits, rows, seqs)

        return sampled.chosen, read

    def _sample_rows(self, logits: torch.Tensor, rows: list[SamplerRow], seqs: list[Sequence]):
        tokens: list[int | None] = []
        details: list = []
        for i, row in enumerate(rows):
            try:
                one = self.sampler(logits[i:i + 1], [row])
                tokens.append(one.token_ids[0])
                details.append(one.details[0])
            except Exception:  # noqa: BLE001
                log.exception("sampling failed for request %s", seqs[i].id)
                tokens.append(None)
                details.append(None)
        return tokens, details

    def _sampler_row(self, seq: Sequence) -> SamplerRow:
        if seq.params.repetition_penalty != 1.0 and seq.history is None:
            seq.history = TokenHistory(seq.tokens, self.loaded.vocab_size, self.loaded.device)
        # an id still in flight counts as generated (min_new_tokens, the length penalty)
        return SamplerRow(seq.params, len(seq.generated) + (seq.pending is not None), seq.history, seq.generator,
                          seq.guide)

    def _collect_input_details(self, seq: Sequence, row: RowPlan, logits: torch.Tensor) -> None:
        """Input-token details of the prompt positions this chunk scored (position i scores token i + 1)."""
        ids = seq.tokens[:seq.prompt_length]
        seq.input_details += input_token_details(logits, ids, seq.params, start=row.start)

    def _input_details(self, seq: Sequence) -> list[TokenDetail]:
        if self.start_id is not None:
            return encoder_input_token_details(seq.encoder_ids, seq.params)
        return seq.input_details

    def _finish_unstarted(self, seq: Sequence) -> RequestOutput:
        seq.status = SeqStatus.FINISHED
        self.scheduler.kv.release(seq)
        return RequestOutput(seq.id, finished=True, stop_reason=StopReason.TIME_LIMIT, output_text="",
                             queue_time=time.monotonic() - seq.arrival)

    def _advance(self, seq: Sequence, token: int, detail: TokenDetail | None, now: float) -> RequestOutput:
        """Append one token and apply TGIS' stop-reason precedence (§1.11). A guided sequence whose grammar
        accepted EOS has finished, even before min_new_tokens (the grammar allowed nothing else)."""
        p = seq.params
        if seq.guide is not None and not seq.guide.accept(token):
            raise GrammarRejected(f"the grammar rejected token {token}")
        seq.append(token)
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

    def _fail(self, seqs: list[Sequence], stats: StepStats, exc: BaseException) -> None:
        reason, detail = _failure_reason(exc)
        log.error("%s step failed: %s", stats.method, detail)
        self.healthy = False
        for seq in seqs:
            seq.status = SeqStatus.FINISHED
            seq.runner_has_state = True  # the failed step may have set it up: the next plan releases it
        self._leave(seqs)
        self.emit([self._error_output(s, detail) for s in seqs if not s.aborted])
        stats.ok, stats.failure_reason = False, reason
        self._publish(stats)

    def _fail_all(self, detail: str) -> None:
        seqs = [*self.scheduler.running, *self.scheduler.waiting]
        self._leave(list(self.scheduler.running))
        for seq in self.scheduler.waiting:
            self.scheduler.kv.release(seq)
        self.scheduler.waiting.clear()
        self.healthy = False
        self.emit([self._error_output(s, detail) for s in seqs if not s.aborted])

    @staticmethod
    def _error_output(seq: Sequence, detail: str) -> RequestOutput:
        n = len(seq.generated)
        prefix = f"Error after generating {n} tokens: " if n else ""
        return RequestOutput(seq.id, generated_token_count=n, finished=True, stop_reason=StopReason.ERROR,
                             error=prefix + detail)

    def _publish(self, stats: StepStats) -> None:
        if stats.ok and stats.method != "idle":
            self.healthy = True
        running = self.scheduler.running
        stats.queue_size = len(self.scheduler.waiting)
        stats.running = len(running)
        if running:
            lengths = [len(s.tokens) + s.encoder_length for s in running]
            stats.batch_input_tokens = len(lengths) * max(lengths) if self.scheduler.padded else sum(lengths)
        stats.remaining_tokens = sum(s.remaining for s in running)
        for fn in self.listeners:
            fn(stats)
