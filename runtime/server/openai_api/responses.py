"""Engine outputs → OpenAI response bodies: choices, streamed chunks, usage and token logprobs, per endpoint.

A `Choice` accumulates one engine request's outputs. `CompletionsShape` and `ChatShape` turn choices into the unary
body and engine outputs into stream chunks; the service drives both the same way.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from pydantic import BaseModel

from runtime.engine.request import RequestOutput, StopReason, TokenDetail
from runtime.server.frontend import Input
from runtime.server.openai_api.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    Delta,
    TokenLogprob,
    TopLogprob,
    Usage,
)

_STOPPED = {StopReason.EOS_TOKEN, StopReason.STOP_SEQUENCE}


def finish_reason(out: RequestOutput) -> str | None:
    """OpenAI's two reasons: `stop` (EOS or a stop sequence), `length` (any token or time limit)."""
    if not out.finished:
        return None
    return "stop" if out.stop_reason in _STOPPED else "length"


@dataclass
class Choice:
    inp: Input
    prompt_index: int
    echo: str = ""  # text shown before the generated text (completions' `echo`)
    parts: list[str] = field(default_factory=list)
    tokens: list[TokenDetail] = field(default_factory=list)
    final: RequestOutput | None = None
    text_offset: int = 0  # completions logprobs: where the next token's text starts

    def add(self, out: RequestOutput) -> None:
        self.parts.append(out.text)
        self.tokens.extend(out.tokens)
        if out.finished:
            self.final = out

    @property
    def text(self) -> str:
        return "".join(self.parts)


def usage(choices: list[Choice]) -> Usage:
    """Prompt tokens once per prompt (its `n` choices share it), completion tokens of every choice."""
    prompts = {c.prompt_index: c.inp.input_length for c in choices}
    completion = sum(c.final.generated_token_count for c in choices if c.final is not None)
    return Usage(prompt_tokens=sum(prompts.values()), completion_tokens=completion,
                 total_tokens=sum(prompts.values()) + completion)


class _Shape:
    """`top_logprobs` None: no logprobs; else the chosen token's logprob plus that many alternatives."""

    PREFIX: str
    CHUNK: type[BaseModel]

    def __init__(self, tokenizer, model: str, top_logprobs: int | None):
        self.tokenizer, self.model, self.top_logprobs = tokenizer, model, top_logprobs
        self.id, self.created = f"{self.PREFIX}-{uuid.uuid4().hex}", int(time.time())

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def chunk(self, index: int, choice: Choice, out: RequestOutput) -> BaseModel | None:
        """The stream chunk of one engine output; None when it carries nothing (bytes held back)."""
        if not (out.text or out.tokens or out.finished):
            return None
        return self._chunk([self._chunk_choice(index, choice, out)])

    def usage_chunk(self, choices: list[Choice]) -> BaseModel:
        return self._chunk([], usage(choices))

    def _chunk(self, choices: list, usage: Usage | None = None) -> BaseModel:
        return self.CHUNK(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def _chunk_choice(self, index: int, choice: Choice, out: RequestOutput):
        raise NotImplementedError


class CompletionsShape(_Shape):
    PREFIX, CHUNK = "cmpl", Completion

    def _logprobs(self, choice: Choice, details: list[TokenDetail]) -> CompletionLogprobs | None:
        if self.top_logprobs is None:
            return None
        lp = CompletionLogprobs(top_logprobs=[] if self.top_logprobs else None)
        for d in details:
            token = self.token_text(d.token_id)
            lp.tokens.append(token)
            lp.token_logprobs.append(d.logprob)
            lp.text_offset.append(choice.text_offset)
            choice.text_offset += len(token)
            if lp.top_logprobs is not None:
                top = (d.top_tokens or [])[:self.top_logprobs]
                lp.top_logprobs.append({self.token_text(t.token_id): t.logprob for t in top})
        return lp

    def _choice(self, index: int, choice: Choice, text: str, details: list[TokenDetail],
                out: RequestOutput) -> CompletionChoice:
        return CompletionChoice(index=index, text=text, logprobs=self._logprobs(choice, details),
                                finish_reason=finish_reason(out), stop_reason=out.stop_sequence)

    def _chunk_choice(self, index: int, choice: Choice, out: RequestOutput) -> CompletionChoice:
        return self._choice(index, choice, out.text, out.tokens, out)

    def unary(self, choices: list[Choice]) -> Completion:
        for c in choices:
            c.text_offset = len(c.echo)
        return Completion(id=self.id, created=self.created, model=self.model, usage=usage(choices), choices=[
            self._choice(i, c, c.echo + (c.final.output_text or ""), c.tokens, c.final) for i, c in enumerate(choices)])

    def opening(self, choices: list[Choice]) -> list[Completion]:
        echoed = [CompletionChoice(index=i, text=c.echo) for i, c in enumerate(choices) if c.echo]
        for c in choices:
            c.text_offset = len(c.echo)
        return [self._chunk(echoed)] if echoed else []



class ChatShape(_Shape):
    PREFIX, CHUNK = "chatcmpl", ChatCompletionChunk

    def _entry(self, token_id: int, logprob: float | None) -> TopLogprob:
        token = self.token_text(token_id)
        return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode()))

    def _logprobs(self, details: list[TokenDetail]) -> ChoiceLogprobs | None:
        if self.top_logprobs is None:
            return None
        content = []
        for d in details:
            entry = self._entry(d.token_id, d.logprob)
            top = [self._entry(t.token_id, t.logprob) for t in (d.top_tokens or [])[:self.top_logprobs]]
            content.append(TokenLogprob(**entry.model_dump(), top_logprobs=top))
        return ChoiceLogprobs(content=content)

    def unary(self, choices: list[Choice]) -> ChatCompletion:
        return ChatCompletion(id=self.id, created=self.created, model=self.model, usage=usage(choices), choices=[
            ChatChoice(index=i, message=AssistantMessage(content=c.final.output_text or ""),
                       logprobs=self._logprobs(c.tokens), finish_reason=finish_reason(c.final),
                       stop_reason=c.final.stop_sequence) for i, c in enumerate(choices)])

    def opening(self, choices: list[Choice]) -> list[ChatCompletionChunk]:
        return [self._chunk([ChatChunkChoice(index=i, delta=Delta(role="assistant", content=""))
                             for i in range(len(choices))])]

    def _chunk_choice(self, index: int, choice: Choice, out: RequestOutput) -> ChatChunkChoice:
        return ChatChunkChoice(index=index, delta=Delta(content=out.text or None), logprobs=self._logprobs(out.tokens),
                               finish_reason=finish_reason(out), stop_reason=out.stop_sequence)
