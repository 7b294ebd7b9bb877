"""Next-token selection and token information, batch-wise on the device (TGIS spec §5.5, §5.6, §1.9).

Order per step: min_new_tokens EOS mask / exponential length penalty → repetition penalty → guided-decoding grammar
mask (guided rows only) → (only for sampling rows) temperature, top-k, top-p, typical-p → greedy argmax or sampling
→ token info from the processed scores. Per-row
parameters become [B, 1] tensors and a stage runs only when some row needs it, on just those rows.

Sampling divides the softmax by Exponential(1) noise drawn from the row's own seeded generator and takes the argmax
(equivalent to multinomial sampling without a host sync), so a seeded request gives the same tokens whatever else is
in the batch. One TGIS rule is deliberately not reproduced: with EOS == PAD and more than one row, TGIS restores the
EOS score after the repetition penalty, because its histories include left padding. Our histories hold only real
tokens, so padding never penalises EOS, and the restore would make a request's tokens depend on batch size (SmolLM2
chat prompts contain EOS == PAD `<|im_end|>`), breaking batch invariance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from runtime.engine.guided import GrammarState, apply_grammars
from runtime.engine.request import GenerationParams, TokenDetail, TopToken
from runtime.engine.staging import to_device

NEG_INF = float("-inf")
INPUT_CHUNK = 256  # prompt positions scored at once: bounds the [chunk, V] temporaries for long prompts


class TokenHistory:
    """The ids a sequence has seen (prompt + generated; decoder ids for seq2seq), as a device bitmap updated in place:
    the repetition penalty then costs O(vocabulary) per step, never O(context). Ids past the vocabulary (added
    tokens the model has no logits for) land in one extra column."""

    def __init__(self, ids: list[int], vocab_size: int, device: torch.device | str = "cpu"):
        self.vocab_size = vocab_size
        self.mask = torch.zeros(vocab_size + 1, dtype=torch.bool, device=device)
        if ids:
            self.mask[to_device(ids, torch.long, device).clamp_(max=vocab_size)] = True

    def mark(self, token: torch.Tensor) -> None:
        """A sampled id still on the device (always inside the vocabulary): no host round trip."""
        self.mask.index_fill_(0, token, True)


@dataclass
class SamplerRow:
    params: GenerationParams
    num_generated: int  # tokens generated before this step
    history: TokenHistory | None  # needed only with a repetition penalty; the sampler appends the chosen token
    generator: torch.Generator | None  # per request, seeded once; persists across steps
    guide: GrammarState | None = None  # guided decoding: the grammar's state before this step


@dataclass
class SampleResult:
    token_ids: list[int]
    details: list[TokenDetail | None]  # per row; None unless params.generated_tokens


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def _column(values: list[float], like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-row parameters as a [B, 1] tensor on the scores' device (one host-to-device copy)."""
    return to_device(values, dtype or like.dtype, like.device).unsqueeze(1)


def _index(rows: list[int], like: torch.Tensor) -> torch.Tensor:
    return to_device(rows, torch.long, like.device)


def _decay(decay: float, power: int) -> float:
    """decay^power - 1 in double, as HF computes it; past the float range it is infinite instead of raising."""
    try:
        return decay**power - 1
    except OverflowError:
        return math.inf


def _eos_adjust(scores: torch.Tensor, rows: list[SamplerRow], eos: int) -> None:
    """min_new_tokens masks EOS; past `start`, the length penalty raises it: e + |e| * (decay^p - 1). A penalty
    beyond float32 saturates at the largest finite score, so the row still has a finite softmax."""
    masked, penalised, factors = [], [], []
    for i, r in enumerate(rows):
        if r.num_generated < r.params.min_new_tokens:
            masked.append(i)
        elif r.params.length_penalty is not None:
            start, decay = r.params.length_penalty
            if r.num_generated - start > 0:
                penalised.append(i)
                factors.append(_decay(decay, r.num_generated - start))
    column = scores[:, eos]  # a view: indexed through device tensors only (a host index would synchronise)
    if penalised:
        idx = _index(penalised, scores)
        e = column.index_select(0, idx)
        penalty = (e.abs() * to_device(factors, scores.dtype, scores.device)).nan_to_num_(nan=0.0)
        raised = (e + penalty.masked_fill(~e.isfinite(), 0.0)).clamp_(max=torch.finfo(scores.dtype).max)
        column.index_copy_(0, idx, raised)  # ±inf scores stay put instead of turning NaN
    if masked:
        column.index_fill_(0, _index(masked, scores), NEG_INF)


def _repetition_penalty(scores: torch.Tensor, rows: list[SamplerRow]) -> torch.Tensor:
    """CTRL style: each id in the row's history, once: score < 0 → score·θ, else score/θ (θ = 1 rows untouched).
    A tiny θ could push a score past float32: it saturates at the largest finite score."""
    chosen = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]

    def penalise(part: torch.Tensor, _) -> torch.Tensor:
        seen = torch.stack([rows[i].history.mask[: part.shape[1]] for i in chosen])
        theta = _column([rows[i].params.repetition_penalty for i in chosen], part)
        penalised = torch.where(part < 0, part * theta, part / theta).clamp_(max=torch.finfo(part.dtype).max)
        return torch.where(seen, penalised, part)

    return _on_rows(scores, chosen, penalise, chosen)


def _top_k(scores: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """Keep scores ≥ the row's k-th highest (k clamped to the vocabulary)."""
    ks = [min(k, scores.shape[1]) for k in ks]
    top = scores.topk(max(ks), dim=1).values
    kth = top.gather(1, _column([k - 1 for k in ks], top, torch.long))
    return scores.masked_fill(scores < kth, NEG_INF)


def _top_p(scores: torch.Tensor, ps: list[float]) -> torch.Tensor:
    """Drop tokens whose ascending cumulative probability is ≤ 1 − p, always keeping the most likely one."""
    ascending, order = scores.sort(dim=1, stable=True)
    cum = ascending.softmax(dim=1).cumsum(dim=1)
    remove = cum <= _column([1 - p for p in ps], cum)
    remove[:, -1] = False
    return scores.masked_fill(remove.scatter(1, order, remove), NEG_INF)


def _typical_p(scores: torch.Tensor, masses: list[float]) -> torch.Tensor:
    """Keep the smallest set, by distance of −log p from the entropy, whose probability reaches the mass."""
    logp = scores.log_softmax(dim=1)
    entropy = -(logp * logp.exp()).nansum(dim=1, keepdim=True)
    shifted = (-logp - entropy).abs()
    sorted_shifted, order = shifted.sort(dim=1, stable=True)
    cum = scores.gather(1, order).softmax(dim=1).cumsum(dim=1)
    last = (cum < _column(masses, cum)).sum(dim=1, keepdim=True).clamp_(max=scores.shape[1] - 1)
    remove = sorted_shifted > sorted_shifted.gather(1, last)  # ties with the last kept distance stay (never the 1st)
    return scores.masked_fill(remove.scatter(1, order, remove), NEG_INF)


def _on_rows(scores: torch.Tensor, rows: list[int], warp, values: list) -> torch.Tensor:
    """Apply a warper to a subset of rows only: disabled rows must stay bit-identical and cost nothing."""
    if len(rows) == scores.shape[0]:
        return warp(scores, values)
    idx = _index(rows, scores)
    scores[idx] = warp(scores[idx], values)
    return scores


def _warp(scores: torch.Tensor, params: list[GenerationParams]) -> torch.Tensor:
    """Temperature, top-k, top-p, typical-p, in that order; greedy rows are never warped."""
    samp = [i for i, p in enumerate(params) if p.sampling]
    if any(params[i].temperature != 1.0 for i in samp):
        scores = scores / _column([p.temperature if p.sampling else 1.0 for p in params], scores)
        scores.clamp_(max=torch.finfo(scores.dtype).max)  # a saturated score stays finite at temperatures < 1
    stages = (
        (_top_k, lambda p: p.top_k > 0, lambda p: p.top_k),
        (_top_p, lambda p: 0 < p.top_p < 1, lambda p: p.top_p),
        (_typical_p, lambda p: 0 < p.typical_p < 1, lambda p: p.typical_p),
    )
    for warp, enabled, value in stages:
        rows = [i for i in samp if enabled(params[i])]
        if rows:
            scores = _on_rows(scores, rows, warp, [value(params[i]) for i in rows])
    return scores


def _argmax(scores: torch.Tensor) -> torch.Tensor:
    """torch.argmax over rows; on CUDA the two-pass Triton kernel (runtime/engine/triton_argmax.py), same result."""
    if scores.is_cuda and scores.stride(1) == 1:
        try:
            from runtime.engine.triton_argmax import argmax
        except ImportError:  # a CUDA build of torch without Triton
            return scores.argmax(dim=1)
        return argmax(scores)
    return scores.argmax(dim=1)


def _choose(scores: torch.Tensor, rows: list[SamplerRow]) -> torch.Tensor:
    """Greedy: argmax (lowest id on ties). Sampling: argmax of softmax / Exponential(1) noise from the row's RNG."""
    chosen = _argmax(scores)
    samp = [i for i, r in enumerate(rows) if r.params.sampling]
    if not samp:
        return chosen
    idx = _index(samp, scores)
    probs = scores[idx].softmax(dim=1)
    noise = torch.empty_like(probs)
    for j, i in enumerate(samp):
        noise[j].exponential_(generator=rows[i].generator)
    # a zero draw on a filtered (zero-probability) token would give 0/0 = NaN, which argmax would pick
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    chosen[idx] = _argmax(probs / noise)
    return chosen


def _chosen_columns(scores: torch.Tensor, tokens: torch.Tensor, params: list[GenerationParams]) -> torch.Tensor:
    """[N, 2] float32 on the device, queued without a host wait: each token's logprob under `scores` and its 1-based
    rank (1 + count strictly greater); NaN where no row asked for that column."""
    tok = tokens.unsqueeze(1)
    out = torch.full((len(params), 2), math.nan, dtype=torch.float32, device=scores.device)
    if any(p.token_logprobs for p in params):
        out[:, 0] = scores.log_softmax(dim=1).gather(1, tok).squeeze(1)
    if any(p.token_ranks for p in params):
        out[:, 1] = (scores > scores.gather(1, tok)).sum(dim=1) + 1
    return out


def _details(scores: torch.Tensor, tokens: torch.Tensor, params: list[GenerationParams],
             ids: list[int] | None = None, columns: list[list[float]] | None = None) -> list[TokenDetail]:
    """Token info of `tokens` [N] against `scores` [N, V] (§1.9). For generated tokens `scores` is the distribution
    the token was chosen from: after the penalties, the grammar mask of a guided row (forbidden tokens are -inf, so
    logprobs are renormalised over what the grammar allows) and, when sampling, the warpers: TGIS' "final processed
    scores". Logprob from their log-softmax, 1-based rank (1 + count strictly greater), top-n = all ids ≥ the n-th
    best (ties, at most 4n, vocabulary order), sorted by (logprob desc, id asc) only when logprobs were asked. One
    device-to-host transfer per field (`ids`: `tokens` already on the host; `columns`: `_chosen_columns` there)."""
    vocab = scores.shape[1]
    lp_rows = [p.token_logprobs for p in params]
    ns = [min(p.top_n_tokens, vocab) for p in params]
    if columns is None:
        columns = _chosen_columns(scores, tokens, params).tolist()
    logprobs = scores.log_softmax(dim=1) if any(lp_rows) and max(ns) > 0 else None
    tops: list[list[TopToken]] = [[] for _ in params]
    if max(ns) > 0:
        n = _column(ns, scores, torch.long)
        nth = scores.topk(max(ns), dim=1).values.gather(1, (n - 1).clamp(min=0))
        nth = nth.masked_fill(nth == NEG_INF, torch.finfo(scores.dtype).min)  # fewer than n finite: all of them
        picked = scores >= nth
        if min(ns) == 0:
            picked &= n > 0
        r, c = picked.nonzero(as_tuple=True)  # row-major: each row's ids ascend
        counts = torch.bincount(r, minlength=len(params))
        place = torch.arange(len(r), device=r.device) - (counts.cumsum(0) - counts)[r]
        keep = place < 4 * n[r, 0]  # the 4n cap counts in vocabulary order
        r, c = r[keep], c[keep]
        values = logprobs[r, c].tolist() if logprobs is not None else [None] * len(r)
        for row, token, lp in zip(r.tolist(), c.tolist(), values, strict=True):
            tops[row].append(TopToken(token, lp if lp_rows[row] else None))
    details = []
    for i, (p, token) in enumerate(zip(params, tokens.tolist() if ids is None else ids, strict=True)):
        d = TokenDetail(token)
        if p.token_logprobs:
            d.logprob = columns[i][0]
        if p.token_ranks:
            d.rank = int(columns[i][1])
        if ns[i] > 0:
            d.top_tokens = sorted(tops[i], key=lambda t: (-t.logprob, t.token_id)) if p.token_logprobs else tops[i]
        details.append(d)
    return details


@dataclass
class Sampled:
    """A batch's chosen ids, still on the device: the next step can read them before the host does (async
    scheduling). Queued with them: the logprobs and ranks of rows that asked. On CUDA their copy to pinned host
    memory is queued right behind the sampling, so `result()` waits for this step only, never for a step launched
    after it. Top-n tokens are computed by `result()` (their count per row is data-dependent): steps with such rows
    are read back before the next one is launched."""

    chosen: torch.Tensor
    scores: torch.Tensor  # the processed scores the ids were chosen from
    params: list[GenerationParams]
    want: list[int] = field(default_factory=list)  # rows with token details
    want_scores: torch.Tensor | None = None  # their scores and ids
    want_chosen: torch.Tensor | None = None
    columns: torch.Tensor | None = None  # their `_chosen_columns`
    host: tuple[torch.Tensor, torch.Tensor | None] | None = None
    ready: torch.cuda.Event | None = None

    def queue(self) -> None:
        """The details' columns, and on CUDA the copies to the host, behind the sampling."""
        self.want = [i for i, p in enumerate(self.params) if p.generated_tokens]
        if self.want:
            rows = None if len(self.want) == len(self.params) else _index(self.want, self.chosen)
            self.want_scores = self.scores if rows is None else self.scores[rows]
            self.want_chosen = self.chosen if rows is None else self.chosen[rows]
            self.columns = _chosen_columns(self.want_scores, self.want_chosen, self._want_params())
        if self.chosen.is_cuda:
            self.host = tuple(None if t is None else _pinned_copy(t) for t in (self.chosen, self.columns))
            self.ready = torch.cuda.Event()
            self.ready.record()

    def _want_params(self) -> list[GenerationParams]:
        return [self.params[i] for i in self.want]

    def result(self) -> SampleResult:
        chosen, columns = self.chosen, self.columns
        if self.ready is not None:
            self.ready.synchronize()
            chosen, columns = self.host
        tokens = chosen.tolist()
        details: list[TokenDetail | None] = [None] * len(tokens)
        if self.want:
            picked = _details(self.want_scores, self.want_chosen, self._want_params(), [tokens[i] for i in self.want],
                              columns.tolist())
            for i, d in zip(self.want, picked, strict=True):
                details[i] = d
        return SampleResult(tokens, details)


def _pinned_copy(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


class Sampler:
    def __init__(self, eos_token_id: int | None, vocab_size: int):
        self.eos = eos_token_id
        self.vocab_size = vocab_size

    def launch(self, logits: torch.Tensor, rows: list[SamplerRow]) -> Sampled:
        """Queue the step's sampling on the device without waiting for it. logits: [B, V] last-position logits, any
        float dtype and device; processing is float32. Columns past vocab_size (padded embedding rows in some
        checkpoints) are never chosen. Repetition-penalty histories take the chosen ids on the device."""
        scores = logits[:, : self.vocab_size].to(torch.float32, copy=True)
        params = [r.params for r in rows]
        if self.eos is not None and any(p.min_new_tokens or p.length_penalty for p in params):
            _eos_adjust(scores, rows, self.eos)
        if any(p.repetition_penalty != 1.0 for p in params):
            scores = _repetition_penalty(scores, rows)
        if any(r.guide is not None for r in rows):
            apply_grammars(scores, [r.guide for r in rows], self.eos,
                           [i for i, r in enumerate(rows) if r.num_generated < r.params.min_new_tokens])
        if any(p.sampling for p in params):
            scores = _warp(scores, params)
        chosen = _choose(scores, rows)
        for i, r in enumerate(rows):
            if r.history is not None:
                r.history.mark(chosen[i:i + 1])
        sampled = Sampled(chosen, scores, params)
        sampled.queue()
        return sampled

    def __call__(self, logits: torch.Tensor, rows: list[SamplerRow]) -> SampleResult:
        return self.launch(logits, rows).result()


def input_token_details(logits: torch.Tensor, input_ids: list[int], params: GenerationParams,
                        start: int = 0) -> list[TokenDetail]:
    """Decoder-only input tokens (§1.9). `logits` [n, V] are the raw logits of positions start .. start + n - 1
    (position i predicting token i + 1), a whole prompt or one chunk of it; returns the details of the input tokens
    they score. The first position has logprob NaN (when asked) and no rank or top tokens; the rest are scored
    against the raw logits, no processing."""
    details = [TokenDetail(input_ids[0], math.nan if params.token_logprobs else None)] if start == 0 else []
    stop = min(start + logits.shape[0], len(input_ids) - 1)  # positions whose next token is an input token
    for a in range(start, stop, INPUT_CHUNK):
        b = min(a + INPUT_CHUNK, stop)
        raw = logits[a - start:b - start].float()
        targets = to_device(input_ids[a + 1:b + 1], torch.long, raw.device)
        details += _details(raw, targets, [params] * (b - a))
    return details


def encoder_input_token_details(input_ids: list[int], params: GenerationParams) -> list[TokenDetail]:
    """Encoder-decoder input tokens: the encoder ids, logprob NaN when asked, never rank or top tokens."""
    return [TokenDetail(t, math.nan if params.token_logprobs else None) for t in input_ids]
