"""The OpenAI API over the shared `FrontEnd`: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`.

Each request goes the gRPC path's way: counted (`tgi_request_count{kind="openai"|"openai_stream"}`), permits for
every choice (prompts × n; none left: 429 `Model is overloaded`), parameters checked by TGIS' validation, inputs
tokenized and length-checked, then one engine request per choice. Streams are server-sent events. A client that
goes away (mid-stream, or while a unary answer is being generated) aborts its engine requests at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import time
from collections.abc import AsyncIterator

import pydantic
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route

from runtime.engine.request import RequestOutput, StopReason
from runtime.server.frontend import Checked, FrontEnd, Input, Overloaded
from runtime.server.guided import check_compiles
from runtime.server.http import client_certificate
from runtime.server.openai_api.params import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    ApiError,
    bad_request,
    from_validation,
    generation_params,
)
from runtime.server.openai_api.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ErrorBody,
    ErrorResponse,
    GenerationRequest,
    ModelCard,
    ModelList,
)
from runtime.server.openai_api.responses import ChatShape, Choice, CompletionsShape
from runtime.server.validation import ValidationError, check_length

KIND, STREAM_KIND = "openai", "openai_stream"
U64 = 2**64
MAX_BODY_BYTES = 4 << 20  # gRPC's default message limit


def error_response(exc: ApiError) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(message=exc.message, type=exc.kind, param=exc.param, code=exc.code))
    return JSONResponse(body.model_dump(), exc.status)


def _json(model: pydantic.BaseModel) -> Response:
    """pydantic's JSON: a -inf logprob becomes null instead of invalid JSON."""
    return Response(model.model_dump_json(), media_type="application/json")


def _sse(model) -> str:
    return f"data: {model.model_dump_json(exclude_none=True)}\n\n"


class _HeldStreamingResponse(StreamingResponse):
    """Holds the request's permits until the stream is over, however it ends."""

    def __init__(self, content: AsyncIterator[str], held: contextlib.ExitStack):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._held = held

    async def __call__(self, scope, receive, send) -> None:
        with self._held:
            try:
                await super().__call__(scope, receive, send)
            finally:  # a disconnect may leave the stream suspended: abort its engine requests now
                await self.body_iterator.aclose()


def _correlation_id(request: Request) -> str:
    return request.headers.get("x-correlation-id", "<none>")


async def _client_gone(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _message_text(message: ChatMessage) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    if any(part.type != "text" for part in message.content):
        raise bad_request("only text content parts are supported", "messages")
    return "".join(part.text or "" for part in message.content)


class _ClientCertificateRequired:
    """Mutual TLS for the API: the TLS layer admits connections without a client certificate (for /health and
    /metrics), so the API itself refuses requests that came without one."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and client_certificate(scope) is None:
            refusal = ApiError(401, "a client certificate is required (mutual TLS)",
                               code="client_certificate_required", kind="authentication_error")
            await error_response(refusal)(scope, receive, send)
            return
        await self.app(scope, receive, send)


class OpenAIApi:
    """`require_client_certificate` (mutual TLS configured): a request without a verified client certificate gets
    401."""

    def __init__(self, front: FrontEnd, model_name: str, require_client_certificate: bool = False):
        self.require_client_certificate = require_client_certificate
        self.front = front
        self.engine = front.engine
        self.tokenizer = front.tokenizer
        self.model_name = model_name
        self.created = int(time.time())

    def route(self) -> Mount:
        """The API under `/v1`, for the HTTP port's app."""
        app = self.app()
        return Mount("/v1", app=_ClientCertificateRequired(app) if self.require_client_certificate else app)

    def app(self) -> Starlette:
        routes = [Route("/completions", self.completions, methods=["POST"]),
                  Route("/chat/completions", self.chat_completions, methods=["POST"]),
                  Route("/models", self.models, methods=["GET"])]
        return Starlette(routes=routes, exception_handlers={ApiError: _api_error, HTTPException: _http_error})

    # ---- endpoints -------------------------------------------------------------------------------------------
    async def models(self, request: Request) -> Response:
        models = ModelList(data=[ModelCard(id=self.model_name, created=self.created,
                                           max_model_len=self.front.max_sequence_length)])
        return _json(models)

    async def completions(self, request: Request) -> Response:
        body = await _parsed(request, CompletionRequest)
        start = self._started(body)
        prompts = self._prompts(body.prompt)
        n = body.n or 1
        with self._held(len(prompts) * n) as held:
            with self._validating("prompt"):
                if not prompts:
                    raise bad_request("prompt must not be empty", "prompt")
                if body.best_of not in (None, n):
                    raise bad_request("best_of is not supported (it must equal n)", "best_of")
                if body.suffix:
                    raise bad_request("suffix is not supported", "suffix")
                if body.echo and body.logprobs is not None:
                    raise bad_request("echo with logprobs (prompt logprobs) is not supported", "echo")
                gp = generation_params(body, body.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS,
                                       self.front.max_new_tokens, bool(body.stream))
                await self._compiled(gp)
                self._with_logprobs(gp, body.logprobs)
                prepared = [await self.front.off_loop(self.front.prepare, p) for p in prompts]
                choices = self._choices([(self._prompt_text(p), q) for p, q in zip(prompts, prepared, strict=True)],
                                        gp, body, n, start)
            if body.echo:
                for c in choices:
                    c.echo = c.inp.text
            shape = CompletionsShape(self.tokenizer, self.model_name, body.logprobs)
            return await self._respond(request, body, shape, choices, held, start)

    async def chat_completions(self, request: Request) -> Response:
        body = await _parsed(request, ChatCompletionRequest)
        start = self._started(body)
        n = body.n or 1
        top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
        with self._held(n) as held:
            with self._validating("messages"):
                if body.tools or body.functions or body.tool_choice not in (None, "none") or \
                        body.function_call not in (None, "none"):
                    raise bad_request("tools and function calling are not supported", "tools")
                if body.top_logprobs and not body.logprobs:
                    raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
                gp = generation_params(body, body.max_completion_tokens or body.max_tokens,
                                       self.front.max_new_tokens, self.front.max_new_tokens, bool(body.stream))
                await self._compiled(gp)
                self._with_logprobs(gp, top_logprobs)
                text = await self.front.off_loop(self._render_chat, body.messages)
                prepare = functools.partial(self.front.prepare, text, add_special_tokens=False)
                prepared = await self.front.off_loop(prepare)
                choices = self._choices([(text, prepared)], gp, body, n, start)
            shape = ChatShape(self.tokenizer, self.model_name, top_logprobs)
            return await self._respond(request, body, shape, choices, held, start)

    # ---- admission -------------------------------------------------------------------------------------------
    def _started(self, body: GenerationRequest) -> float:
        """Count the request (TGIS' first step) and check that it names the served model (or none)."""
        start = time.monotonic()
        self.front.metrics.inc("tgi_request_count", kind=STREAM_KIND if body.stream else KIND)
        if body.model and body.model != self.model_name:
            self.front.rejected()
            raise ApiError(404, f"The model `{body.model}` does not exist: this server serves `{self.model_name}`",
                           "model", "model_not_found")
        return start

    @contextlib.contextmanager
    def _held(self, n: int):
        """Permits for `n` choices in an ExitStack: a stream takes them over (`pop_all`), others release them on
        leaving the block."""
        self.front.metrics.inc("tgi_request_input_count", n)
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(self.front.permits(n))
            except Overloaded as exc:
                raise ApiError(429, str(exc), code="model_overloaded", kind="overloaded_error") from exc
            yield held

    @contextlib.contextmanager
    def _validating(self, prompt_param: str):
        """A parameter error (TGIS' checks or the API's own) counts as err="validation" and is a 400."""
        try:
            yield
        except ValidationError as exc:
            self.front.rejected()
            raise from_validation(exc, prompt_param) from exc
        except ApiError as exc:
            if exc.status == 400:
                self.front.rejected()
            raise

    async def _compiled(self, gp) -> None:
        """A guided request's grammar compiles (off the loop, cached) before anything is queued; else a 400."""
        if gp.guided is not None:
            try:
                await check_compiles(self.engine.grammars, gp.guided)
            except ValidationError as exc:
                raise bad_request(str(exc), "response_format") from exc

    @staticmethod
    def _prompts(prompt: str | list) -> list[str | list[int]]:
        """One prompt (text or token ids) or a list of them."""
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        return list(prompt)

    def _prompt_text(self, prompt: str | list[int]) -> str:
        return prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt)

    @staticmethod
    def _with_logprobs(gp, top_logprobs: int | None) -> None:
        if top_logprobs is not None:
            gp.generated_tokens = gp.token_logprobs = True
            gp.top_n_tokens = top_logprobs

    def _render_chat(self, messages: list[ChatMessage]) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise bad_request("this model has no chat template: use /v1/completions", "messages")
        conversation = [{"role": m.role, "content": _message_text(m)} for m in messages]
        try:
            return self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - the template's own complaint (roles, order) is the client's
            raise bad_request(f"the chat template rejected the messages: {exc}", "messages") from exc

    def _choices(self, prepared: list, gp, body: GenerationRequest, n: int, start: float) -> list[Choice]:
        """`n` engine inputs per prompt; a client seed s gives choice j the seed s + j."""
        checked = []
        for text, p in prepared:
            if p.input_length == 0:
                raise ValidationError("the prompt is empty (0 tokens)")
            params = check_length(gp, p.input_length, self.front.max_sequence_length)
            for j in range(n):
                seeded = params if body.seed is None else dataclasses.replace(params, seed=(body.seed + j) % U64)
                checked.append(Checked(text, p, seeded))
        inputs = self.front.admit(checked, start)
        return [Choice(inp, i // n) for i, inp in enumerate(inputs)]

    # ---- running ---------------------------------------------------------------------------------------------
    async def _respond(self, request: Request, body: GenerationRequest, shape, choices: list[Choice],
                       held: contextlib.ExitStack, start: float) -> Response:
        cid = _correlation_id(request)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _HeldStreamingResponse(self._stream(shape, choices, include_usage, start, cid), held.pop_all())
        work = asyncio.ensure_future(self._unary(choices, start, cid))
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            abandoned = not work.done()
            if abandoned:  # the client left (or the server is stopping): abort the engine requests
                work.cancel()
                self.front.cancelled(len(choices), cid)
        if abandoned:
            return Response(status_code=499)  # nobody reads it
        work.result()  # raises a generation failure
        return _json(shape.unary(choices))

    async def _unary(self, choices: list[Choice], start: float, cid: str) -> None:
        async with contextlib.aclosing(self._run(choices)) as outputs:
            async for i, out in outputs:
                choice = choices[i]
                choice.add(out)
                if out.error is not None:
                    raise ApiError(500, self._failed(out, choice, i, len(choices), cid), kind="server_error")
                if out.finished:
                    self.front.completed(out, KIND, self._label(i, len(choices)), choice.inp,
                                         out.output_text or "", start, cid)

    async def _stream(self, shape, choices: list[Choice], include_usage: bool, start: float,
                      cid: str) -> AsyncIterator[str]:
        open_choices = set(range(len(choices)))
        try:
            for chunk in shape.opening(choices):
                yield _sse(chunk)
            async with contextlib.aclosing(self._run(choices)) as outputs:
                async for i, out in outputs:
                    choice = choices[i]
                    choice.add(out)
                    if out.error is not None:
                        open_choices.clear()  # a failure, not a cancellation
                        error = ApiError(500, self._failed(out, choice, i, len(choices), cid), kind="server_error")
                        yield f"data: {error_response(error).body.decode()}\n\n"
                        break
                    chunk = shape.chunk(i, choice, out)
                    if out.finished:
                        open_choices.discard(i)
                        self.front.completed(out, STREAM_KIND, "OpenAI streaming response", choice.inp,
                                             choice.text, start, cid)
                    if chunk is not None:
                        yield _sse(chunk)
                else:
                    if include_usage:
                        yield _sse(shape.usage_chunk(choices))
            yield "data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            if open_choices:
                self.front.cancelled(len(open_choices), cid)
            raise

    async def _run(self, choices: list[Choice]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Every choice's engine stream, interleaved as outputs arrive; leaving early aborts the unfinished ones."""
        queue: asyncio.Queue[tuple[int, RequestOutput]] = asyncio.Queue()

        async def pump(i: int, inp: Input) -> None:
            try:
                async with contextlib.aclosing(self.engine.generate(inp.request)) as outputs:
                    async for out in outputs:
                        queue.put_nowait((i, out))
            except Exception as exc:  # noqa: BLE001 - reported as this choice's failure
                queue.put_nowait((i, RequestOutput(inp.request.request_id, finished=True,
                                                   stop_reason=StopReason.ERROR, error=str(exc))))

        tasks = [asyncio.create_task(pump(i, c.inp)) for i, c in enumerate(choices)]
        try:
            remaining = len(tasks)
            while remaining:
                i, out = await queue.get()
                remaining -= out.finished
                yield i, out
        finally:
            for task in tasks:
                task.cancel()

    def _failed(self, out: RequestOutput, choice: Choice, i: int, n: int, cid: str) -> str:
        self.front.metrics.inc("tgi_request_failure", err="generate")
        return self.front.failed(out, self._label(i, n), choice.inp, cid)

    @staticmethod
    def _label(i: int, n: int) -> str:
        return "OpenAI request" if n == 1 else f"OpenAI sub-request {i} from batch of {n}"


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc)


async def _parsed(request: Request, model: type[pydantic.BaseModel]):
    """The JSON body (whatever the Content-Type says, as curl users forget it) as `model`; else a 400 naming the
    first offending field. Bodies are bounded as gRPC messages are (413 past MAX_BODY_BYTES)."""
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body larger than {MAX_BODY_BYTES} bytes", code="request_too_large")
    try:
        return model.model_validate_json(body)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(part) for part in first.get("loc", ()))
        raise bad_request(f"{loc}: {first['msg']}" if loc else first["msg"], loc or None) from exc


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    code = "not_found" if exc.status_code == 404 else None
    return error_response(ApiError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}", code=code))
