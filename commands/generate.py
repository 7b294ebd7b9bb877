"""`tgis generate`: local generation through the same continuous-batching engine the server uses.

Prompts go through the model's chat template when it has one (instruct models often answer a bare prompt with EOS
at once, i.e. nothing); `--raw` sends them as they are. Everything that can be checked before the model loads is.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from commands._common import CliError, check_dtype, err_console, resolve_model, split_model_argument
from runtime.engine.guided_spec import GuidedSpec, GuidedSpecError, guided_spec

if TYPE_CHECKING:
    from runtime.engine.request import EngineRequest, RequestOutput, TokenDetail

console = Console(highlight=False)
MAX_STOP_SEQUENCES = 6


def _read_prompts(args: list[str], file: Path | None) -> list[str]:
    prompts = list(args)
    if file is not None:
        prompts += [line for line in file.read_text().splitlines() if line.strip()]
    if prompts == ["-"] or (not prompts and not sys.stdin.isatty()):
        prompts = [line for line in sys.stdin.read().splitlines() if line.strip()]
    return prompts


def _detail_json(tokenizer, d: TokenDetail) -> dict:
    out: dict = {"text": tokenizer.convert_ids_to_tokens(d.token_id)}
    if d.logprob is not None:
        out["logprob"] = None if math.isnan(d.logprob) else d.logprob
    if d.rank is not None:
        out["rank"] = d.rank
    if d.top_tokens is not None:
        out["top_tokens"] = [{"text": tokenizer.convert_ids_to_tokens(t.token_id), "logprob": t.logprob}
                             for t in d.top_tokens]
    return out


def _guided(json_schema: Path | None, regex: str | None, choice: str | None,
            grammar: Path | None) -> GuidedSpec | None:
    """The one guided-decoding option given (the proto's oneof), as a spec; a bad one is a usage error."""
    given = {name: value for name, value in (("json_schema", json_schema and json_schema.read_text()),
                                             ("regex", regex), ("choice", choice and choice.split(",")),
                                             ("grammar", grammar and grammar.read_text())) if value is not None}
    if len(given) > 1:
        raise CliError("give at most one of --json-schema, --regex, --choice, --grammar", 2)
    if not given:
        return None
    try:
        return guided_spec(*given.popitem())
    except GuidedSpecError as exc:
        raise CliError(str(exc), 2) from None


def generate(
    args: list[str] = typer.Argument(None, metavar="[MODEL] PROMPT...",
                                     help="Optional model (directory or cached hub id; default: the built-in "
                                          "SmolLM2-135M-Instruct), then prompts ('-' reads stdin, one per line)."),
    model: str | None = typer.Option(None, "--model", "-m", envvar="MODEL_NAME", help="Model (overrides the "
                                     "first argument)."),
    revision: str | None = typer.Option(None, "--revision", help="Hub revision."),
    file: Path | None = typer.Option(None, "--file", "-f", exists=True, dir_okay=False,
                                     help="Read prompts from a file, one per line."),
    max_new_tokens: int = typer.Option(20, "--max-new-tokens", "-n", min=1, help="Tokens to generate at most."),
    min_new_tokens: int = typer.Option(0, "--min-new-tokens", min=0, help="EOS is suppressed until this many."),
    sample: bool | None = typer.Option(None, "--sample/--greedy", help="Sampling or greedy decoding (default: "
                                       "sampling when --temperature > 0 is given, else greedy)."),
    temperature: float | None = typer.Option(None, "--temperature", min=0.0,
                                             help="Sampling temperature; 0 means greedy (default 1.0 when sampling)."),
    top_k: int = typer.Option(0, "--top-k", min=0, help="Keep the k most likely tokens (0: off)."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass (1: off)."),
    typical_p: float = typer.Option(1.0, "--typical-p", max=1.0, help="Typical sampling mass (1: off)."),
    seed: int | None = typer.Option(None, "--seed", min=0, help="Sampling seed (random u32 when omitted)."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", min=0.0, help="CTRL-style penalty."),
    stop: list[str] = typer.Option(None, "--stop", help="Stop sequence (repeatable, at most 6)."),
    include_stop: bool = typer.Option(True, "--include-stop/--exclude-stop", help="Keep the stop sequence."),
    time_limit: int = typer.Option(0, "--time-limit", min=0, help="Time limit in milliseconds (0: none)."),
    truncate_input_tokens: int = typer.Option(0, "--truncate-input-tokens", min=0, help="Keep the last N tokens."),
    chat: bool | None = typer.Option(None, "--chat/--raw", help="Wrap each prompt in the model's chat template "
                                     "(default: when the model has one), or send it as is."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object per prompt, with token details."),
    top_n_tokens: int = typer.Option(0, "--top-n-tokens", min=0, help="With --json: top-n candidates per token."),
    json_schema: Path | None = typer.Option(None, "--json-schema", exists=True, dir_okay=False,
                                            help="Guided decoding: the output follows this JSON schema (a file)."),
    regex: str | None = typer.Option(None, "--regex", help="Guided decoding: the output matches this regex."),
    choice: str | None = typer.Option(None, "--choice", help="Guided decoding: the output is one of these "
                                      "comma-separated choices."),
    grammar: Path | None = typer.Option(None, "--grammar", exists=True, dir_okay=False,
                                        help="Guided decoding: the output follows this grammar file (EBNF/GBNF "
                                             "with ::=, else Lark)."),
    dtype: str | None = typer.Option(None, "--dtype", callback=check_dtype,
                                     help="float32, bfloat16, float16 (default: by device)."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: cuda if present)."),
    max_batch_size: int = typer.Option(12, "--max-batch-size", min=1, help="Engine batch size."),
    num_gpus: int = typer.Option(1, "--num-gpus", min=1, help="Tensor-parallel ranks (processes; one GPU each "
                                 "on CUDA)."),
) -> None:
    """Generate text for one or more prompts, batched through the continuous-batching engine."""
    from transformers import AutoTokenizer

    from runtime.config import check_engine_options
    from runtime.engine.async_engine import AsyncEngine
    from runtime.engine.config import EngineConfig
    from runtime.engine.inputs import prepare_input
    from runtime.engine.request import EngineRequest, GenerationParams
    from runtime.models.loader import DEFAULT_MAX_SEQUENCE_LENGTH, model_max_sequence_length

    model, args = split_model_argument(list(args or []), model)
    prompts = _read_prompts(args, file)
    if not prompts:
        raise CliError("no prompt given: pass it as an argument, with --file, or on stdin", 2)
    if len(stop or []) > MAX_STOP_SEQUENCES:
        raise CliError(f"can specify at most {MAX_STOP_SEQUENCES} stop sequences", 2)
    if temperature is not None and 0 < temperature < 0.05:
        raise CliError("--temperature must be 0 (greedy) or >= 0.05", 2)
    sampling = bool(temperature) if sample is None or temperature == 0 else sample
    guided = _guided(json_schema, regex, choice, grammar)
    path = resolve_model(model, revision)
    check_engine_options(path, dtype, device, num_gpus)
    tok = AutoTokenizer.from_pretrained(path)  # every prompt is checked before the model loads
    limit = model_max_sequence_length(path) or DEFAULT_MAX_SEQUENCE_LENGTH
    requests = []
    for i, text in enumerate(_templated(tok, prompts, chat)):
        prepared = prepare_input(tok, text, truncate_input_tokens)
        room = limit - prepared.input_length
        if room <= 0:
            raise CliError(f"input tokens ({prepared.input_length}) must be < {limit}: use --truncate-input-tokens", 2)
        if not prepared.input_ids:
            raise CliError("the prompt produced no tokens (this model's tokenizer adds no BOS token)", 2)
        params = GenerationParams(
            max_new_tokens=min(max_new_tokens, room), max_is_token_limit=max_new_tokens > room,
            min_new_tokens=min_new_tokens, temperature=(temperature or 1.0) if sampling else 0.0, top_k=top_k,
            top_p=top_p, typical_p=typical_p,
            seed=(seed if seed is not None else random.getrandbits(32)) if sampling else None,
            repetition_penalty=repetition_penalty, stop_sequences=list(stop or []), include_stop_sequence=include_stop,
            generated_tokens=json_output, token_logprobs=json_output, token_ranks=json_output,
            top_n_tokens=top_n_tokens if json_output else 0, stream=True, guided=guided)
        requests.append(EngineRequest(f"cli-{i}", prepared.input_ids, params))
    engine = AsyncEngine(EngineConfig(model_path=str(path), dtype=dtype, device=device,
                                      max_batch_size=max_batch_size, tensor_parallel_size=num_gpus))
    if time_limit:  # counted from now: loading the model is not generation time
        for req in requests:
            req.params.deadline = time.monotonic() + time_limit / 1000
    try:
        if guided is not None:  # compiled against the engine's vocabulary: needs the loaded model
            try:
                engine.grammars.compile(guided).result()
            except GuidedSpecError as exc:
                raise CliError(str(exc), 2) from None
        finals = asyncio.run(_run(engine, requests, stream_to_console=len(requests) == 1 and not json_output))
    finally:
        engine.shutdown()
    for prompt, req, (final, details) in zip(prompts, requests, finals, strict=True):
        if json_output:
            console.print_json(json.dumps({
                "prompt": prompt, "text": final.output_text, "input_token_count": len(req.input_ids),
                "generated_token_count": final.generated_token_count, "stop_reason": final.stop_reason.name,
                "stop_sequence": final.stop_sequence, "seed": req.params.seed or 0,
                "tokens": [_detail_json(tok, d) for d in details]}))
        elif len(requests) > 1:
            console.rule(prompt[:60])
            console.print(final.output_text, markup=False)
        if final.error:
            raise CliError(f"Request failed during generation: {final.error}")
        if not json_output and not final.output_text:
            err_console.print(_why_empty(final, chat is False and tok.chat_template is not None), style="yellow",
                              markup=False)


def _templated(tok, prompts: list[str], chat: bool | None) -> list[str]:
    """The prompts as the model sees them: in its chat template unless --raw (or it has none)."""
    if chat is None:
        chat = tok.chat_template is not None
    if not chat:
        return prompts
    if tok.chat_template is None:
        raise CliError("this model has no chat template: drop --chat", 2)
    return [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            for p in prompts]


def _why_empty(final: RequestOutput, raw_instruct: bool) -> str:
    """Say why no text came, so an empty line is never the whole answer."""
    reason = final.stop_reason.name
    why = (f"no text: the model stopped ({reason}) after {final.generated_token_count} token(s) that decode to "
           "nothing")
    return why + ("; this model has a chat template, try without --raw" if raw_instruct else "")


async def _run(engine, requests: list[EngineRequest], stream_to_console: bool):
    async def one(req: EngineRequest) -> tuple[RequestOutput, list[TokenDetail]]:
        details: list[TokenDetail] = []
        async for out in engine.generate(req):
            details.extend(out.tokens)
            if stream_to_console:
                console.print(out.text, end="", markup=False, soft_wrap=True)
            if out.finished:
                if stream_to_console:
                    console.print()
                return out, details
        raise RuntimeError("engine stream ended without a final output")

    return await asyncio.gather(*(one(r) for r in requests))
