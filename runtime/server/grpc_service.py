"""`fmaas.GenerationService` on grpc.aio: everything TGIS' router does around the engine.

Per RPC: count it, take permits (one per input, `Model is overloaded` when none are left), convert and validate
parameters, tokenize and length-check every input, draw seeds, then run each input as an independent engine request
and assemble TGIS responses (input-text echo, seed echo, token strings, the stream message sequence of spec §1.10).
A client that goes away cancels the handler task, which closes the engine stream and so aborts the request at once;
it is counted as cancelled wherever it lands (validation, queue, generation). What is not about the gRPC wire
(permits, inputs, ids, seeds, outcome metrics and logs) is `FrontEnd`'s, shared with the OpenAI HTTP API.

Tokenization (Generate/GenerateStream validation and Tokenize) runs on a bounded thread pool, as TGIS' router's
tokenization workers: a multi-megabyte text then delays only the RPCs queued behind it on the pool, never the event
loop (ModelInfo, streams, health). Requests arrive as parsed messages; see `runtime/server/wire.py` for the bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import grpc

from proto import generation_pb2 as pb
from proto import generation_pb2_grpc as pb_grpc
from runtime.echo import echo
from runtime.engine.lora import LoraRef, find_lora
from runtime.engine.request import GenerationParams, RequestOutput, StopReason, TokenDetail
from runtime.models.prefixes import PrefixError, PrefixNotFound, PrefixStore, PromptPrefix
from runtime.server.frontend import Checked, FrontEnd, Input, Overloaded
from runtime.server.guided import check_compiles, proto_guided_spec
from runtime.server.validation import (
    ValidationError,
    check_length,
    check_server_limits,
    convert_params,
    validate_params,
)
from runtime.tokenization import tokenize


class _GenerationFailed(Exception):
    pass


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    def __init__(self, front: FrontEnd, default_include_stop_seqs: bool, prefix_store: PrefixStore | None = None,
                 max_top_n_tokens: int | None = None):
        self.front = front
        self.engine = front.engine
        self.prefix_store = prefix_store
        self.tokenizer = front.tokenizer
        self.metrics = front.metrics
        self.max_sequence_length: int = front.max_sequence_length
        self.max_new_tokens = front.max_new_tokens
        self.default_include_stop_seqs = default_include_stop_seqs
        self.max_top_n_tokens = max_top_n_tokens
        self._handlers: set[asyncio.Task] = set()

    async def close(self, timeout: float = 10.0) -> None:
        """Once the gRPC server has stopped: cancel the generation handlers still running (grpcio leaves them
        awaiting the engine even after its grace period), which aborts their engine requests, and drop queued
        tokenization work. Nobody waits for any of it any more."""
        self.front.close()
        running = [task for task in self._handlers if not task.done()]
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running, timeout=timeout)

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
                        self.front.completed(out, "stream", "Streaming response", inp, "".join(text), start,
                                             _correlation_id(context))
                        yield msg
                    elif msg.text or msg.tokens:
                        yield msg

    async def Tokenize(self, request: pb.BatchedTokenizeRequest, context) -> pb.BatchedTokenizeResponse:  # noqa: N802
        start = time.monotonic()
        self.metrics.inc("tgi_tokenize_request_count")
        self.metrics.inc("tgi_tokenize_request_input_count", len(request.requests))
        try:
            response = await self.front.off_loop(self._tokenize_all, request)
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
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(self.front.permits(n))
            except Overloaded as exc:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
            yield

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
                self.front.cancelled(n, _correlation_id(context))
            raise
        finally:
            self._handlers.discard(task)

    async def _validated(self, request, texts: list[str], context, start: float, stream: bool) -> list[Input]:
        """Conversion, the checks of spec §1.5 in order, per-input length checks and seeds; INVALID_ARGUMENT on
        the first failure (in a batch, the first failing input decides). Server limits TGIS lacks come last, so a
        request TGIS would reject still gets TGIS' message."""
        has_params = request.HasField("params")
        try:
            gp = convert_params(request.params if has_params else None, self.default_include_stop_seqs,
                                time.monotonic())
            gp.stream = stream
            validate_params(gp, self.max_new_tokens)
            gp.guided = proto_guided_spec(request.params.decoding) if has_params else None
            adapter_id = request.adapter_id or request.prefix_id
            lora = self._lora(adapter_id)
            prefix = None if lora else await self._prefix(adapter_id)
            prefix_length = 0 if prefix is None else prefix.length
            checked = await self.front.off_loop(self._tokenized, texts, request.params.truncate_input_tokens, gp,
                                           prefix_length)
            if gp.guided is not None:  # the only other check that can take milliseconds
                await check_compiles(self.engine.grammars, gp.guided)
            check_server_limits(gp, self.max_top_n_tokens)
        except ValidationError as exc:
            self.front.rejected()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return self.front.admit(checked, start, prefix, lora)

    def _tokenized(self, texts: list[str], truncate: int, gp: GenerationParams, prefix_length: int) -> list[Checked]:
        """On the tokenization pool: checks #13-#15 per input, in order."""
        checked = []
        for text in texts:
            prepared = self.front.prepare(text, truncate)
            checked.append(Checked(text, prepared, check_length(gp, prepared.input_length, self.max_sequence_length,
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
    async def _unary(self, inp: Input, params: pb.Parameters, kind: str, index: int, count: int, start: float,
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
            raise _GenerationFailed(self.front.failed(final, label, inp, _correlation_id(context)))
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
        self.front.completed(final, kind, label, inp, final.output_text or "", start, _correlation_id(context))
        return response

    async def _fail(self, out: RequestOutput, label: str, inp: Input, context) -> None:
        message = self.front.failed(out, label, inp, _correlation_id(context))
        self.metrics.inc("tgi_request_failure", err="generate")
        await context.abort(grpc.StatusCode.UNKNOWN, message)

    def _seed(self, inp: Input) -> int:
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


def _correlation_id(context) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-correlation-id":
            return value
    return "<none>"
