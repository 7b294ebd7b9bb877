"""`tgis generate`: local generation through the same continuous-batching engine the server uses."""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import time
from pathlib import Path

import typer
from rich.console import Console

from commands._common import err_console, is_model, resolve_model
from runtime.engine.guided_spec import GuidedSpec, GuidedSpecError, guided_spec
from runtime.engine.inputs import prepare_input
from runtime.engine.request import EngineRequest, GenerationParams, RequestOutput, TokenDetail

console = Console(highlight=False)


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
    """The one guided-decoding option given (the proto's oneof), as a spec; exits 2 on a bad one."""
    given = {name: value for name, value in (("json_schema", json_schema and json_schema.read_text()),
                                             ("regex", regex), ("choice", choice and choice.split(",")),
                                             ("grammar", grammar and grammar.read_text())) if value is not None}
    if len(given) > 1:
        err_console.print("[red]give at most one of --json-schema, --regex, --choice, --grammar[/red]")
        raise typer.Exit(code=2)
    if not given:
        return None
    try:
        return guided_spec(*given.popitem())
    except GuidedSpecError as exc:
        err_console.print(str(exc), style="red", markup=False)
        raise typer.Exit(code=2) from None


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
    sample: bool = typer.Option(False, "--sample/--greedy", help="Sampling or greedy decoding."),
    temperature: float = typer.Option(1.0, "--temperature", min=0.05, help="Sampling temperature."),
    top_k: int = typer.Option(0, "--top-k", min=0, help="Keep the k most likely tokens (0: off)."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass (1: off)."),
    typical_p: float = typer.Option(1.0, "--typical-p", max=1.0, help="Typical sampling mass (1: off)."),
    seed: int | None = typer.Option(None, "--seed", min=0, help="Sampling seed (random u32 when omitted)."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", min=0.0, help="CTRL-style penalty."),
    stop: list[str] = typer.Option(None, "--stop", help="Stop sequence (repeatable, at most 6)."),
    include_stop: bool = typer.Option(True, "--include-stop/--exclude-stop", help="Keep the stop sequence."),
    time_limit: int = typer.Option(0, "--time-limit", min=0, help="Time limit in milliseconds (0: none)."),
    truncate_input_tokens: int = typer.Option(0, "--truncate-input-tokens", min=0, help="Keep the last N tokens."),
    chat: bool = typer.Option(False, "--chat", help="Wrap each prompt in the tokenizer's chat template."),
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
    dtype: str | None = typer.Option(None, "--dtype", help="float32, bfloat16, float16 (default: by device)."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: cuda if present)."),
    max_batch_size: int = typer.Option(12, "--max-batch-size", min=1, help="Engine batch size."),
    num_gpus: int = typer.Option(1, "--num-gpus", min=1, help="Tensor-parallel ranks (processes; one GPU each "
                                 "on CUDA)."),
) -> None:
    """Generate text for one or more prompts, batched through the continuous-batching engine."""
    from runtime.engine.async_engine import AsyncEngine
    from runtime.engine.config import EngineConfig

    args = list(args or [])
    if model is None and len(args) > 1 and is_model(args[0]):
        model = args.pop(0)
    prompts = _read_prompts(args, file)
    if not prompts:
        err_console.print("[red]no prompt given[/red]")
        raise typer.Exit(code=2)
    if len(stop or []) > 6:
        err_console.print("[red]can specify at most 6 non-empty stop sequences[/red]")
        raise typer.Exit(code=2)
    guided = _guided(json_schema, regex, choice, grammar)
    path = resolve_model(model, revision)
    engine = AsyncEngine(EngineConfig(model_path=str(path), dtype=dtype, device=device,
                                      max_batch_size=max_batch_size, tensor_parallel_size=num_gpus))
    tok = engine.tokenizer
    if guided is not None:
        try:
            engine.grammars.compile(guided).result()
        except GuidedSpecError as exc:
            engine.shutdown()
            err_console.print(str(exc), style="red", markup=False)
            raise typer.Exit(code=2) from None
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             if chat else p for p in prompts]
    requests = []
    for i, text in enumerate(texts):
        prepared = prepare_input(tok, text, truncate_input_tokens)
        room = engine.max_sequence_length - prepared.input_length
        if room <= 0:
            engine.shutdown()
            err_console.print(f"[red]input tokens ({prepared.input_length}) must be < "
                              f"{engine.max_sequence_length}: use --truncate-input-tokens[/red]")
            raise typer.Exit(code=2)
        params = GenerationParams(
            max_new_tokens=min(max_new_tokens, room), max_is_token_limit=max_new_tokens > room,
            min_new_tokens=min_new_tokens, temperature=temperature if sample else 0.0, top_k=top_k, top_p=top_p,
            typical_p=typical_p, seed=(seed if seed is not None else random.getrandbits(32)) if sample else None,
            repetition_penalty=repetition_penalty, stop_sequences=list(stop or []),
            include_stop_sequence=include_stop, deadline=time.monotonic() + time_limit / 1000 if time_limit else None,
            generated_tokens=json_output, token_logprobs=json_output, token_ranks=json_output,
            top_n_tokens=top_n_tokens if json_output else 0, stream=True, guided=guided)
        requests.append(EngineRequest(f"cli-{i}", prepared.input_ids, params))
    try:
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
            err_console.print(f"[red]Request failed during generation: {final.error}[/red]")
            raise typer.Exit(code=1)


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
