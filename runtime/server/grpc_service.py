"""`fmaas.GenerationService` on grpc.aio: everything TGIS' router does around the engine.

Per RPC: count it, take permits (one per input, `Model is overloaded` when none are left), convert and validate
parameters, tokenize and length-check every input, draw seeds, then run each input as an independent engine request
and assemble TGIS responses (input-text echo, seed echo, token strings, the stream message sequence of spec §1.10).
A client that goes away cancels the handler task, which closes the engine stream and so aborts the request at once;
it is counted as cancelled wherever it lands (validation, queue, generation).

Tokenization (Generate/GenerateStream validation and Tokenize) runs on a bounded thread pool, as TGIS' router's
tokenization workers: a multi-megabyte text then delays only the RPCs queued behind it on the pool, never the event
loop (ModelInfo, streams, health). Requests arrive as parsed messages; see `runtime/server/wire.py` for the bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from proto import generation_pb2 as pb
from proto import generation_pb2_grpc as pb_grpc
from runtime.echo import echo
from runtime.engine.inputs import prepare_input
from runtime.engine.lora import LoraRef, find_lora
from runtime.engine.request import EngineRequest, GenerationParams, RequestOutput, StopReason, TokenDetail
from runtime.models.prefixes import PrefixError, PrefixNotFound, PrefixStore, PromptPrefix
from runtime.server.metrics import Metrics
from runtime.server.validation import (
    ValidationError,
    check_length,
    check_server_limits,
    convert_params,
    validate_params,
    with_seed,
)
from runtime.tokenization import tokenize

log = logging.getLogger("tgis.server")

_QUIET_REASONS = {StopReason.MAX_TOKENS, StopReason.EOS_TOKEN, StopReason.STOP_SEQUENCE, StopReason.TIME_LIMIT}


@dataclass
class _Input:
    text: str
    input_length: int
    request: EngineRequest


class _GenerationFailed(Exception):
    pass


def _reason_name(reason: StopReason) -> str:
    """TGIS logs the Rust Debug form of the enum (`MaxTokens`)."""
    return "".join(part.capitalize() for part in reason.name.split("_"))


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    def __init__(self, engine, metrics: Metrics, max_new_tokens: int, max_concurrent_requests: int,
                 default_include_stop_seqs: bool, prefix_store: PrefixStore | None = None,
                 max_top_n_tokens: int | None = None, tokenization_workers: int = 1):
        self.engine = engine
        self.prefix_store = prefix_store
        self.tokenizer = engine.tokenizer
        self.metrics = metrics
        self.max_sequence_length: int = engine.max_sequence_length
        self.max_new_tokens = max_new_tokens  # effective server limit: min(configured, S - 1)
        self.default_include_stop_seqs = default_include_stop_seqs
        self._free_permits = max_concurrent_requests
        self.max_top_n_tokens = max_top_n_tokens
        self._ids = itertools.count()
        self._rng = random.Random()
        self._tokenizing = ThreadPoolExecutor(tokenization_workers, thread_name_prefix="tgis-tokenize")
        self._handlers: set[asyncio.Task] = set()

    async def close(self, timeout: float = 10.0) -> None:
        """Once the gRPC server has stopped: cancel the generation handlers still running (grpcio leaves them
        awaiting the engine even after its grace period), which aborts their engine requests, and drop queued
        tokenization work. Nobody waits for any of it any more."""
        self._tokenizing.shutdown(wait=False, cancel_futures=True)
        running = [task for task in self._handlers if not task.done()]
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running, timeout=timeout)

    async def _off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._tokenizing, fn, *args)

    # ---- RPCs --------------------------------------------------------------------------------------------------
    async def Generate(self, request: pb.BatchedGenerationRequest, context) -> pb.BatchedGenerationResponse:  # noqa: N802
        start = time.monotonic()
        n = len(request.requests)
        kind = "single" if n == 1 else "batch"
        self.metrics.inc("tgi_request_count", kind=kind)
        if n == 0:
            return pb.BatchedGenerationResponse()
        self.metrics.inc("tgi_request_input_count", n)
        async with self._permits(n, context), self._cancellation(n, context):
            inputs = await self._validated(request, [r.text for r in request.requests], context, start, stream=False)
            failure = None
            try:
                async with asyncio.TaskGroup() as group:
                    tasks = [group.create_task(self._unary(inp, request.params, kind, i, n, start, context))
                             for i, inp in enumerate(inputs)]
            except ExceptionGroup as group_error:  # siblings were cancelled by the TaskGroup
                failed, rest = group_error.split(_GenerationFailed)
                if rest is not None:
                    raise
                failure = str(failed.exceptions[0])
            if failure is not None:
                self.metrics.inc("tgi_request_failure", err="generate")
                await context.abort(grpc.StatusCode.UNKNOWN, failure)
        return pb.BatchedGenerationResponse(responses=[t.result() for t in tasks])

    async def GenerateStream(self, request: pb.SingleGenerationRequest, context):  # noqa: N802
        start = time.monotonic()
        self.metrics.inc("tgi_request_count", kind="stream")
        self.metrics.inc("tgi_request_input_count")
        finished = False  # a client leaving after the final message cancelled nothing
        async with self._permits(1, context), self._cancellation(1, context, lambda: finished):
            if not request.HasField("request"):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "missing request")
            [inp] = await self._validated(request, [request.request.text], context, start, stream=True)
            params = inp.request.params
            yield pb.GenerationResponse(input_token_count=inp.input_length, seed=self._seed(inp),
                                        text=inp.text if request.params.response.input_text else "")
            text: list[str] = []
            async with contextlib.aclosing(self.engine.generate(inp.request)) as outputs:
                async for out in outputs:
                    if out.error is not None:
                        await self._fail(out, "Streaming response", inp, context)
                    if out.input_tokens is not None:
                        infos = self._token_infos(out.input_tokens)
                        yield pb.GenerationResponse(input_tokens=infos, input_token_count=len(infos))
                    msg = pb.GenerationResponse(generated_token_count=out.generated_token_count, text=out.text)
                    if params.generated_tokens:
                        msg.tokens.extend(self._token_infos(out.tokens))
                    text.append(out.text)
                    if out.finished:
                        msg.stop_reason, msg.stop_sequence = out.stop_reason, out.stop_sequence or ""
                        msg.seed = self._seed(inp)
                        finished = True
                        self._completed(out, "stream", "Streaming response", inp, "".join(text), start, context)
                        yield msg
                    elif msg.text or msg.tokens:
                        yield msg

    async def Tokenize(self, request: pb.BatchedTokenizeRequest, context) -> pb.BatchedTokenizeResponse:  # noqa: N802
        start = time.monotonic()
        self.metrics.inc("tgi_tokenize_request_count")
        self.metrics.inc("tgi_tokenize_request_input_count", len(request.requests))
        try:
            response = await self._off_loop(self._tokenize_all, request)
        except Exception as exc:  # the tokenizer's own error text, as TGIS
            await context.abort(grpc.StatusCode.UNKNOWN, str(exc))
        self.metrics.observe("tgi_tokenize_request_tokens", sum(r.token_count for r in response.responses))
        self.metrics.observe("tgi_tokenize_request_duration", time.monotonic() - start)
        return response

    def _tokenize_all(self, request: pb.BatchedTokenizeRequest) -> pb.BatchedTokenizeResponse:
        """On the tokenization pool: the response is built there too (a long text has millions of offsets)."""
        response = pb.BatchedTokenizeResponse()
        for r in request.requests:
            result = tokenize(self.tokenizer, r.text, request.truncate_input_tokens)
            item = response.responses.add(token_count=result.token_count)
            if request.return_tokens:
                item.tokens.extend(result.tokens)
            if request.return_offsets:
                item.offsets.extend(pb.TokenizeResponse.Offset(start=s, end=e) for s, e in result.offsets)
        return response

    async def ModelInfo(self, request: pb.ModelInfoRequest, context) -> pb.ModelInfoResponse:  # noqa: N802
        kind = pb.ModelInfoResponse.ENCODER_DECODER if self.engine.is_encoder_decoder else \
            pb.ModelInfoResponse.DECODER_ONLY
        return pb.ModelInfoResponse(model_kind=kind, max_sequence_length=self.max_sequence_length,
                                    max_new_tokens=self.max_new_tokens)

    # ---- admission and validation ----------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _permits(self, n: int, context):
        """TGIS' semaphore, never waited on: no permits left means `Model is overloaded` at once."""
        if self._free_permits < n:
            self.metrics.inc("tgi_request_failure", err="conc_limit")
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "Model is overloaded")
        self._free_permits -= n
        try:
            yield
        finally:
            self._free_permits += n

    @contextlib.asynccontextmanager
    async def _cancellation(self, n: int, context, done: Callable[[], bool] = lambda: False):
        """Count a cancellation (err="cancelled") wherever it lands: validation, queue or generation; the handler
        is tracked meanwhile so that shutdown can cancel it."""
        task = asyncio.current_task()
        self._handlers.add(task)
        try:
            yield
        except (asyncio.CancelledError, GeneratorExit):
            if not done():
                self._cancelled(n, context)
            raise
        finally:
            self._handlers.discard(task)

    async def _validated(self, request, texts: list[str], context, start: float, stream: bool) -> list[_Input]:
        """Conversion, the checks of spec §1.5 in order, per-input length checks and seeds; INVALID_ARGUMENT on
        the first failure (in a batch, the first failing input decides). Server limits TGIS lacks come last, so a
        request TGIS would reject still gets TGIS' message."""
        has_params = request.HasField("params")
        try:
            gp = convert_params(request.params if has_params else None, self.default_include_stop_seqs,
                                time.monotonic())
            gp.stream = stream
            guided = request.params.decoding.WhichOneof("guided") if has_params else None
            validate_params(gp, self.max_new_tokens, guided)
            adapter_id = request.adapter_id or request.prefix_id
            lora = self._lora(adapter_id)
            prefix = None if lora else await self._prefix(adapter_id)
            prefix_length = 0 if prefix is None else prefix.length
            checked = await self._off_loop(self._tokenized, texts, request.params.truncate_input_tokens, gp,
                                           prefix_length)
            check_server_limits(gp, self.max_top_n_tokens)
        except ValidationError as exc:
            self.metrics.inc("tgi_request_failure", err="validation")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self.metrics.observe("tgi_request_validation_duration", time.monotonic() - start)
        inputs = []
        for text, prepared, params in checked:
            self.metrics.observe("tgi_request_input_length", prepared.input_length)
            self.metrics.observe("tgi_request_max_new_tokens", gp.max_new_tokens)
            request_id = f"req-{next(self._ids)}"
            inputs.append(_Input(text, prepared.input_length,
                                 EngineRequest(request_id, prepared.input_ids, with_seed(params, self._rng), prefix,
                                               lora)))
        return inputs

    def _tokenized(self, texts: list[str], truncate: int, gp: GenerationParams, prefix_length: int):
        """On the tokenization pool: checks #13-#15 per input, in order."""
        checked = []
        for text in texts:
            try:
                prepared = prepare_input(self.tokenizer, text, truncate)
            except Exception as exc:
                raise ValidationError(f"tokenizer error {exc}") from exc
            self.metrics.observe("tgi_request_raw_input_length", prepared.raw_length)
            checked.append((text, prepared, check_length(gp, prepared.input_length, self.max_sequence_length,
                                                         prefix_length)))
        return checked

    def _lora(self, adapter_id: str) -> LoraRef | None:
        """A PEFT LoRA adapter directory in the store (checked here, loaded by the engine); None for anything else,
        which the prompt-prefix lookup then handles."""
        if not adapter_id or self.prefix_store is None:
            return None
        try:
            lora = find_lora(self.prefix_store.folder(adapter_id), adapter_id)
        except (PrefixError, OSError):
            return None  # the prefix lookup reports it with TGIS' wording
        except ValueError as exc:
            raise ValidationError(str(exc)) from exc
        if lora is not None and self.engine.facts.tensor_parallel_size > 1:
            raise ValidationError("LoRA adapters are not supported with tensor parallelism yet")
        return lora

    async def _prefix(self, prefix_id: str) -> PromptPrefix | None:
        """Check #12: load (or find cached) the prompt prefix; every failure is the client's INVALID_ARGUMENT."""
        if not prefix_id:
            return None
        start = time.monotonic()
        try:
            if self.prefix_store is None:
                raise PrefixNotFound(prefix_id)
            prefix, loaded = await asyncio.to_thread(self.prefix_store.get, prefix_id)
        except PrefixNotFound as exc:
            self.metrics.inc("tgi_prompt_load_failure")
            shown = echo(prefix_id)
            raise ValidationError(f"can't retrieve prompt prefix with id '{shown}': prefix id \"{shown}\" "
                                  "not found") from exc
        except Exception as exc:  # noqa: BLE001 - bad files, bad tensors: TGIS reports the shard's exception text
            self.metrics.inc("tgi_prompt_load_failure")
            kind = "Exception" if isinstance(exc, PrefixError) else type(exc).__name__
            detail = str(exc).replace(f"{self.prefix_store.root}/", "")  # the store's location is not the client's
            raise ValidationError(f"can't retrieve prompt prefix with id '{echo(prefix_id)}': Unexpected "
                                  f"<class '{kind}'>: {echo(detail, 500)}") from exc
        if loaded:
            self.metrics.observe("tgi_prompt_load_duration", time.monotonic() - start)
        return prefix

    # ---- running and responses -------------------------------------------------------------------------------
    async def _unary(self, inp: _Input, params: pb.Parameters, kind: str, index: int, count: int, start: float,
                     context) -> pb.GenerationResponse:
        label = "Request" if count == 1 else f"Sub-request {index} from batch of {count}"
        tokens: list[TokenDetail] = []
        input_tokens: list[TokenDetail] | None = None
        final: RequestOutput | None = None
        async with contextlib.aclosing(self.engine.generate(inp.request)) as outputs:
            async for out in outputs:
                tokens.extend(out.tokens)
                if out.input_tokens is not None:
                    input_tokens = out.input_tokens
                final = out
        if final.error is not None:
            self._log_failure(final, label, inp, context)
            raise _GenerationFailed(f"Request failed during {final.error_stage}: {final.error}")
        text = final.output_text or ""
        timed_out_queued = final.stop_reason == StopReason.TIME_LIMIT and final.generated_token_count == 0
        if params.response.input_text and not timed_out_queued:
            text = inp.text + ("\n\n" if self.engine.is_encoder_decoder else "") + text
        response = pb.GenerationResponse(
            input_token_count=inp.input_length, generated_token_count=final.generated_token_count, text=text,
            stop_reason=final.stop_reason, stop_sequence=final.stop_sequence or "", seed=self._seed(inp))
        if inp.request.params.generated_tokens:
            response.tokens.extend(self._token_infos(tokens))
        if input_tokens is not None:
            response.input_tokens.extend(self._token_infos(input_tokens))
        self._completed(final, kind, label, inp, final.output_text or "", start, context)
        return response

    async def _fail(self, out: RequestOutput, label: str, inp: _Input, context) -> None:
        self._log_failure(out, label, inp, context)
        self.metrics.inc("tgi_request_failure", err="generate")
        await context.abort(grpc.StatusCode.UNKNOWN, f"Request failed during {out.error_stage}: {out.error}")

    def _seed(self, inp: _Input) -> int:
        params = inp.request.params
        return params.seed if params.sampling else 0

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.convert_ids_to_tokens(token_id) or ""

    def _token_infos(self, details: list[TokenDetail]) -> list[pb.TokenInfo]:
        infos = []
        for d in details:
            info = pb.TokenInfo(text=self._token_text(d.token_id))
            if d.logprob is not None:
                info.logprob = d.logprob
            if d.rank is not None:
                info.rank = d.rank
            for top in d.top_tokens or ():
                entry = info.top_tokens.add(text=self._token_text(top.token_id))
                if top.logprob is not None:
                    entry.logprob = top.logprob
            infos.append(info)
        return infos

    # ---- metrics and logs ------------------------------------------------------------------------------------
    def _completed(self, final: RequestOutput, kind: str, label: str, inp: _Input, text: str, start: float,
                   context) -> None:
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
                _reason_name(final.stop_reason), len(text.encode()), json.dumps(text[:32], ensure_ascii=False),
                extra=self._log_fields(inp, context))

    def _log_failure(self, out: RequestOutput, label: str, inp: _Input, context) -> None:
        log.error("%s generated %d tokens before %s, output 0 bytes: \"\"; error: %s", label,
                  out.generated_token_count, _reason_name(StopReason.ERROR), out.error,
                  extra=self._log_fields(inp, context))

    def _cancelled(self, n: int, context) -> None:
        self.metrics.inc("tgi_request_failure", n, err="cancelled")
        log.warning("%d request(s) cancelled (CANCELLED)", n,
                    extra={"correlation_id": self._correlation_id(context)})

    def _log_fields(self, inp: _Input, context) -> dict:
        return {"correlation_id": self._correlation_id(context), "request_id": inp.request.request_id,
                "input_toks": inp.input_length}

    @staticmethod
    def _correlation_id(context) -> str:
        for key, value in context.invocation_metadata() or ():
            if key == "x-correlation-id":
                return value
        return "<none>"
