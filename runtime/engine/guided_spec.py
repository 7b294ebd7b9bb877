"""What a guided (structured-output) request asks for, as a small picklable value: the `oneof guided` of the proto
(`format`, `json_schema`, `regex`, `choice`, `grammar`) turned into one `GuidedSpec`, checked as far as that can be
done without compiling. It crosses the engine's process boundary with the request and keys the compiler's cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

# the option names of the proto's `oneof guided`, in field order
OPTIONS = ("format", "json_schema", "regex", "choice", "grammar")
Kind = Literal["json_object", "json_schema", "regex", "choice", "ebnf", "lark"]
ANY_JSON_OBJECT = '{"type": "object"}'  # format JSON, as vLLM maps it for xgrammar


class GuidedSpecError(ValueError):
    """The spec cannot be used (bad syntax, unsupported feature, no library): the client's error, with the reason."""


@dataclass(frozen=True)
class GuidedSpec:
    kind: Kind
    value: str | tuple[str, ...]  # schema / regex / grammar text; the choices for "choice"
    option: str  # the proto option it came from, for messages

    def describe(self) -> str:
        return f"guided decoding {self.option}"


def is_lark(grammar: str) -> bool:
    """vLLM's rule: a grammar without `::=` is Lark, anything else EBNF/GBNF."""
    return "::=" not in grammar


def guided_spec(option: str, value: str | list[str]) -> GuidedSpec | None:
    """The spec for one proto option (`format` takes the enum name, `choice` the list); None when the option
    constrains nothing (format TEXT)."""
    if option == "format":
        if value == "TEXT":
            return None
        if value != "JSON":
            raise GuidedSpecError(f"guided decoding format {value!r} is not supported")
        return GuidedSpec("json_object", ANY_JSON_OBJECT, option)
    if option == "json_schema":
        try:
            json.loads(value)
        except ValueError as exc:
            raise GuidedSpecError(f"guided decoding json_schema is not valid JSON: {exc}") from exc
        return GuidedSpec("json_schema", value, option)
    if option == "regex":
        return GuidedSpec("regex", value, option)
    if option == "choice":
        if len(value) < 2:  # vllm-tgis-adapter's rule and message
            raise GuidedSpecError("Must provide at least two choices")
        return GuidedSpec("choice", tuple(value), option)
    if option == "grammar":
        if not value.strip():
            raise GuidedSpecError("guided decoding grammar is empty")
        return GuidedSpec("lark" if is_lark(value) else "ebnf", value, option)
    raise GuidedSpecError(f"unknown guided decoding option {option!r}")


def choice_grammar(choices: tuple[str, ...]) -> str:
    """EBNF whose language is exactly the choices (JSON string escapes are EBNF string escapes)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


EXAMPLES: dict[str, str | list[str]] = {
    "format": "JSON",
    "json_schema": json.dumps({
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                       "city": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["name", "age", "city"]}),
    "regex": r"[A-Z][a-z]+( [a-z]+)*\.",
    "choice": ["positive", "negative", "neutral"],
    "grammar": 'root ::= expr\nexpr ::= term (("+" | "-") term)*\nterm ::= [0-9]+ | "(" expr ")"',
}


def example_spec(option: str = "json_schema") -> GuidedSpec:
    """A realistic spec per option, for benchmark workloads (`tgis bench --guided`) and tests."""
    return guided_spec(option, EXAMPLES[option])
