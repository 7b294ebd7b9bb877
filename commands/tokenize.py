"""`tgis tokenize`: token count, tokens and UTF-8 byte offsets, with the Tokenize RPC's rules."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from commands._common import resolve_model, split_model_argument

console = Console(highlight=False)


def tokenize(
    args: list[str] = typer.Argument(..., metavar="[MODEL] TEXT...",
                                     help="Optional model (directory or cached hub id; default: the built-in "
                                          "SmolLM2-135M-Instruct), then the texts to tokenize."),
    model: str | None = typer.Option(None, "--model", "-m", envvar="MODEL_NAME", help="Model (overrides the first "
                                     "argument)."),
    revision: str | None = typer.Option(None, "--revision", help="Hub revision."),
    truncate_input_tokens: int = typer.Option(0, "--truncate-input-tokens", min=0,
                                              help="Keep only the last N tokens (0: all)."),
    json_output: bool = typer.Option(False, "--json", help="Print JSON (one object per text)."),
) -> None:
    """Tokenize texts exactly as the server counts them (special tokens added, byte offsets)."""
    from transformers import AutoTokenizer

    from runtime.tokenization import tokenize as tokenize_text

    model, args = split_model_argument(list(args), model)
    tok = AutoTokenizer.from_pretrained(resolve_model(model, revision))
    for text in args:
        result = tokenize_text(tok, text, truncate_input_tokens)
        if json_output:
            console.print_json(json.dumps({"text": text, "token_count": result.token_count, "tokens": result.tokens,
                                           "offsets": [list(o) for o in result.offsets]}))
            continue
        table = Table(title=f"{result.token_count} tokens: {text[:60]!r}")
        for col in ("#", "token", "bytes"):
            table.add_column(col)
        for i, (token, (start, end)) in enumerate(zip(result.tokens, result.offsets, strict=True)):
            table.add_row(str(i), repr(token), f"{start}-{end}")
        console.print(table)
