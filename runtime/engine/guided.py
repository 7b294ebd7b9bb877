"""Guided decoding with xgrammar: compiling specs off the engine loop, per-sequence grammar state, token bitmasks.

Engine-agnostic: an engine needs one `GrammarCompiler` (its own: the engine may run in another process), a
`GrammarState` per guided sequence, and `apply_grammars` in its sampler. The bitmask layout is xgrammar's (and
llguidance's): int32 rows of ceil(V/32) words, bit j of word i allowing token 32·i + j, V being the logits width
(the LM head's rows, which may exceed the tokenizer's length; padded rows are never allowed).

xgrammar is optional (`pip install 'tgis[guided]'`) and imported only when a guided request arrives.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

from runtime.engine.guided_spec import GuidedSpec, GuidedSpecError, choice_grammar

if TYPE_CHECKING:
    import xgrammar

INSTALL_HINT = "guided decoding needs the xgrammar package: pip install 'tgis[guided]'"
# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: " and sometimes a failed-check preamble
_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


def _xgr():
    try:
        import xgrammar
    except ImportError as exc:
        raise GuidedSpecError(INSTALL_HINT) from exc
    return xgrammar


def library_reason(exc: BaseException) -> str:
    return _LOCATION.sub("", str(exc).strip()) or type(exc).__name__


class GrammarCompiler:
    """Compiles specs for one tokenizer and logits width on a small thread pool, never on the caller's thread.

    The cache holds futures keyed by the spec (kind and text), so requests with the same spec, concurrent or later,
    share one compilation; failures are cached too (they are deterministic). The tokenizer's vocabulary is read
    (~0.5 s) by the first compilation, in the pool, so servers without guided requests never pay for it.
    """

    def __init__(self, tokenizer, vocab_size: int, eos_token_id: int | None, threads: int = 2,
                 cache_size: int = 256):
        self.tokenizer, self.vocab_size, self.eos_token_id = tokenizer, vocab_size, eos_token_id
        self.cache_size = cache_size
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="tgis-grammar")
        self._threads = threads
        self._cache: OrderedDict[GuidedSpec, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._init_lock = threading.Lock()
        self._compiler: xgrammar.GrammarCompiler | None = None

    def compile(self, spec: GuidedSpec) -> Future:
        """A future of the compiled grammar; it raises GuidedSpecError with the library's reason."""
        with self._lock:
            future = self._cache.get(spec)
            if future is None or future.cancelled():  # cancelled only by close()
                future = self._cache[spec] = self._pool.submit(self._compile, spec)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(spec)
            return future

    def _library(self) -> xgrammar.GrammarCompiler:
        with self._init_lock:
            if self._compiler is None:
                xgr = _xgr()
                stop = None if self.eos_token_id is None else [self.eos_token_id]
                try:
                    info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                              stop_token_ids=stop)
                except Exception as exc:  # noqa: BLE001 - an unusual tokenizer: no guided request can be served
                    raise GuidedSpecError(f"guided decoding is unavailable for this model's tokenizer: "
                                          f"{library_reason(exc)}") from exc
                # our own cache keys by spec; xgrammar's would hold every grammar a second time
                self._compiler = xgr.GrammarCompiler(info, max_threads=self._threads, cache_enabled=False)
            return self._compiler

    def _compile(self, spec: GuidedSpec):
        compiler = self._library()
        try:
            if spec.kind in ("json_object", "json_schema"):
                # compact separators: with free whitespace small models tend to pad until max_new_tokens
                return compiler.compile_json_schema(spec.value, any_whitespace=False)
            if spec.kind == "regex":
                return compiler.compile_regex(spec.value)
            if spec.kind == "choice":
                return compiler.compile_grammar(choice_grammar(spec.value))
            if spec.kind == "lark":
                return compiler.compile_lark(spec.value)
            return compiler.compile_grammar(spec.value)
        except Exception as exc:  # noqa: BLE001 - every library failure is the spec's fault: the client's error
            raise GuidedSpecError(f"invalid {spec.describe()}: {library_reason(exc)}") from exc

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class GrammarState:
    """One sequence's position in its grammar. It terminates by accepting the EOS (stop) token once the grammar is
    complete; the mask allows EOS exactly when the grammar can end."""

    def __init__(self, compiled):
        self._matcher = _xgr().GrammarMatcher(compiled)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into bitmask[row] (a CPU int32 tensor)."""
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> bool:
        """Advance by one generated token; False (state unchanged) if the grammar does not allow it."""
        return self._matcher.accept_token(token_id)

    @property
    def finished(self) -> bool:
        return self._matcher.is_terminated()

    def rollback(self, num_tokens: int) -> None:
        """Undo the last accepted tokens (speculative decoding, jump-forward)."""
        self._matcher.rollback(num_tokens)


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


_BITS = torch.arange(32, dtype=torch.int32)


def apply_token_bitmask(scores: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """In place: scores[i, t] = -inf where bit t of bitmask[i] is 0, for each i in `rows` (other rows untouched).
    scores: float32 [B, V] on any device; bitmask: CPU int32 [B, ceil(V/32)]. On CPU xgrammar's C++ kernel
    (0.15-5 ms for 16x49152 depending on the masks; unpacking with torch or numpy ops takes longer); on other
    devices the unpacking, which is cheap there and needs no triton."""
    if scores.device.type == "cpu":
        _xgr().apply_token_bitmask_inplace(scores, bitmask, vocab_size=scores.shape[1], indices=rows)
    else:
        unpack_and_apply(scores, bitmask, rows)


def unpack_and_apply(scores: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """apply_token_bitmask with plain torch ops, on the scores' device."""
    idx = torch.tensor(rows, device=scores.device)
    words = bitmask[rows].to(scores.device, non_blocking=True)
    allowed = ((words.unsqueeze(-1) >> _BITS.to(scores.device)) & 1).view(len(rows), -1)[:, : scores.shape[1]]
    scores[idx] = scores[idx].masked_fill(allowed == 0, float("-inf"))


def _only_eos_allowed(words: torch.Tensor, eos: int) -> bool:
    """Whether a bitmask row allows no token but EOS."""
    word, bit = divmod(eos, 32)
    rest = int(words[word]) & 0xFFFFFFFF & ~(1 << bit)
    return rest == 0 and not words[:word].any() and not words[word + 1 :].any()


def apply_grammars(scores: torch.Tensor, guides: list[GrammarState | None], eos: int | None,
                   eos_blocked: list[int]) -> None:
    """The sampler's grammar step, in place on the processed scores (after the TGIS penalties, before the warpers):
    every token a row's grammar forbids gets -inf; unguided rows (None) stay bit-identical. `eos_blocked` rows had
    EOS masked by min_new_tokens: min_new_tokens holds while the grammar can go on, but a row whose grammar can only
    end gets EOS back (score 0: it is then the only finite one), so a finished grammar always stops with EOS."""
    bitmask = torch.full((len(guides), bitmask_words(scores.shape[1])), -1, dtype=torch.int32)
    rows = []
    for i, guide in enumerate(guides):
        if guide is not None:
            guide.fill(bitmask, i)
            rows.append(i)
    ending = [i for i in eos_blocked if guides[i] is not None and eos is not None
              and _only_eos_allowed(bitmask[i], eos)]
    apply_token_bitmask(scores, bitmask, rows)
    if ending:
        scores[torch.tensor(ending, device=scores.device), eos] = 0.0
