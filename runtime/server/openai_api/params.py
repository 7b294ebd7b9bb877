"""OpenAI request fields → the engine's `GenerationParams`, checked by TGIS' own validation, and the API's errors.

Defaults are OpenAI's: temperature 1 (sampling; 0 is greedy), `max_tokens` 16 for completions and as many as fit
for chat, stop sequences excluded from the text. The engine has TGIS' multiplicative `repetition_penalty` (accepted
as an extra field, as vLLM does) but no additive presence/frequency penalties, logit bias, suffix or best_of: a
value for those is a 400, never silently ignored.
"""

from __future__ import annotations

import json

from runtime.engine.guided_spec import GuidedSpecError, guided_spec
from runtime.engine.request import GenerationParams
from runtime.server.openai_api.protocol import GenerationRequest, ResponseFormat
from runtime.server.validation import ValidationError, validate_params

COMPLETIONS_DEFAULT_MAX_TOKENS = 16
# TGIS parameter names in validation messages → the OpenAI names the client used
_RENAMED = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}
_STOP_MESSAGE_START = "can specify at most"


class ApiError(Exception):
    """Answered as `{"error": {"message", "type", "param", "code"}}` with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param)


def from_validation(exc: ValidationError, prompt_param: str) -> ApiError:
    """A TGIS validation message in OpenAI terms, with the parameter it is about."""
    message = str(exc)
    for tgis, openai in _RENAMED.items():
        message = message.replace(tgis, openai)
    first = message.split(" ", 1)[0]
    if message.startswith(_STOP_MESSAGE_START):
        param = "stop"
    elif message.startswith(("input tokens", "tokenizer error", "token ids", "the prompt")):
        param = prompt_param
    elif message.startswith("guided decoding"):
        param = "response_format"
    else:
        param = first
    return bad_request(message, param)


def apply_response_format(response_format: ResponseFormat | None, gp: GenerationParams) -> None:
    """The one place `response_format` meets the engine: JSON output formats become guided decoding (`json_object`:
    any JSON object, TGIS `format: JSON`; `json_schema`: its `schema`). Compiling is the caller's next step."""
    if response_format is None or response_format.type == "text":
        return
    try:
        if response_format.type == "json_object":
            gp.guided = guided_spec("format", "JSON")
            return
        schema = (response_format.json_schema or {}).get("schema")
        if schema is None:
            raise bad_request("response_format json_schema needs a `schema`", "response_format")
        gp.guided = guided_spec("json_schema", json.dumps(schema))
    except GuidedSpecError as exc:
        raise bad_request(str(exc), "response_format") from exc


def _refuse_unsupported(body: GenerationRequest) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise bad_request(f"{name} is not supported: this server has the multiplicative repetition_penalty "
                              "(> 0.0, 1.0 is off) instead", name)
    if body.logit_bias:
        raise bad_request("logit_bias is not supported", "logit_bias")


def generation_params(body: GenerationRequest, max_tokens: int | None, default_max_tokens: int,
                      server_max_new_tokens: int, stream: bool) -> GenerationParams:
    """Effective parameters, checked by TGIS' per-request validation (ValidationError on the first failure)."""
    _refuse_unsupported(body)
    gp = GenerationParams(
        max_new_tokens=default_max_tokens if max_tokens is None else max_tokens,
        min_new_tokens=body.min_tokens or 0,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_k=max(body.top_k or 0, 0),  # -1 and 0 disable, as in vLLM
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        stop_sequences=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
        include_stop_sequence=bool(body.include_stop_str_in_output),
        stream=stream,
    )
    apply_response_format(body.response_format, gp)
    validate_params(gp, server_max_new_tokens)
    return gp
