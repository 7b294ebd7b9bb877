"""Next-token selection and token information, batch-wise on the device (TGIS spec §5.5, §5.6, §1.9).

Order per step: min_new_tokens EOS mask / exponential length penalty → repetition penalty → (only if some row
samples) temperature, top-k, top-p, typical-p → greedy argmax or sampling → token info from the processed scores.
Sampling divides the softmax by Exponential(1) noise drawn from the row's own seeded generator and takes the argmax
(equivalent to multinomial sampling), so a seeded request gives the same tokens whatever else is in the batch.

One deliberate difference from TGIS: TGIS restores the EOS score after the repetition penalty when EOS == PAD and
the batch has more than one row, because its histories include left padding. Our histories hold only real tokens,
so padding never penalises EOS and the restore (which would make results depend on batch size) is not needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from runtime.engine.request import GenerationParams, TokenDetail, TopToken

NEG_INF = float("-inf")


@dataclass
class SamplerRow:
    params: GenerationParams
    num_generated: int  # tokens generated before this step
    history: list[int]  # repetition-penalty ids: prompt + generated (decoder ids for seq2seq)
    generator: torch.Generator | None  # per request, seeded once; persists across steps


@dataclass
class SampleResult:
    token_ids: list[int]
    details: list[TokenDetail | None]


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).unsqueeze(1)


def _eos_adjust(scores: torch.Tensor, rows: list[SamplerRow], eos: int) -> None:
    """min_new_tokens masks EOS; afterwards the length penalty raises it: e + |e| * (decay^p - 1)."""
    for i, r in enumerate(rows):
        p = r.params
        if r.num_generated < p.min_new_tokens:
            scores[i, eos] = NEG_INF
        elif p.length_penalty is not None:
            start, decay = p.length_penalty
            over = r.num_generated - start
            if over > 0:
                e = scores[i, eos]
                scores[i, eos] = e + e.abs() * (decay**over - 1)


def _repetition_penalty(scores: torch.Tensor, rows: list[SamplerRow]) -> None:
    """CTRL-style: every id in the row's history, score < 0 → score·θ, else score/θ."""
    width = max(len(r.history) for r in rows) or 1
    hist = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r.history:
            hist[i, : len(r.history)] = torch.tensor(r.history)
            hist[i, len(r.history):] = r.history[0]  # duplicates write the same value
    hist = hist.to(scores.device)
    theta = _column([r.params.repetition_penalty for r in rows], scores)
    picked = scores.gather(1, hist)
    picked = torch.where(picked < 0, picked * theta, picked / theta)
    has_history = torch.tensor([bool(r.history) for r in rows], device=scores.device)
    scores.scatter_(1, hist, torch.where(has_history.unsqueeze(1), picked, scores.gather(1, hist)))


def _top_k(scores: torch.Tensor, ks: list[int]) -> torch.Tensor:
    vocab = scores.shape[1]
    k = torch.tensor([min(k, vocab) if k > 0 else vocab for k in ks], device=scores.device)
    kth = scores.sort(dim=1, descending=True).values.gather(1, (k - 1).unsqueeze(1))
    return scores.masked_fill(scores < kth, NEG_INF)


def _top_p(scores: torch.Tensor, ps: list[float]) -> torch.Tensor:
    """Drop tokens whose ascending cumulative probability is ≤ 1 − p, always keeping the most likely one."""
    sorted_scores, order = scores.sort(dim=1)
    cum = sorted_scores.softmax(dim=1).cumsum(dim=1)
    remove = cum <= 1 - _column(ps, cum)
    remove[:, -1] = False
    remove &= torch.tensor([p < 1 for p in ps], device=scores.device).unsqueeze(1)  # p = 1 leaves a row untouched
    return scores.masked_fill(remove.scatter(1, order, remove), NEG_INF)


def _typical_p(scores: torch.Tensor, masses: list[float]) -> torch.Tensor:
    """Keep the smallest set, by distance of −log p from the entropy, whose probability reaches the mass."""
    logp = scores.log_softmax(dim=1)
    entropy = -(logp * logp.exp()).nansum(dim=1, keepdim=True)
    shifted = (-logp - entropy).abs()
    sorted_shifted, order = shifted.sort(dim=1)
    cum = scores.gather(1, order).softmax(dim=1).cumsum(dim=1)
    last = (cum < _column(masses, cum)).sum(dim=1).clamp(max=scores.shape[1] - 1)
    remove = sorted_shifted > sorted_shifted.gather(1, last.unsqueeze(1))
    remove[:, 0] = False
    enabled = torch.tensor([0 < m < 1 for m in masses], device=scores.device).unsqueeze(1)
    return scores.masked_fill(remove.scatter(1, order, remove) & enabled, NEG_INF)


def _top_tokens(scores: torch.Tensor, logprobs: torch.Tensor | None, n: int) -> list[TopToken]:
    """All ids scoring ≥ the n-th best (ties included, at most 4n, vocabulary order), sorted by logprob when known."""
    n = min(n, scores.shape[0])
    nth = scores.topk(n).values[-1]
    if nth == NEG_INF:
        nth = torch.tensor(torch.finfo(scores.dtype).min, device=scores.device)
    ids = (scores >= nth).nonzero().flatten()[: 4 * n].tolist()
    if logprobs is None:
        return [TopToken(i) for i in ids]
    values = logprobs[ids].tolist()
    return [TopToken(i, lp) for lp, i in sorted(zip(values, ids, strict=True), key=lambda t: (-t[0], t[1]))]


def _detail(token: int, scores: torch.Tensor, logprobs: torch.Tensor | None, p: GenerationParams) -> TokenDetail:
    detail = TokenDetail(token)
    if p.token_logprobs:
        detail.logprob = float(logprobs[token])
    if p.token_ranks:
        detail.rank = int((scores > scores[token]).sum()) + 1
    if p.top_n_tokens:
        detail.top_tokens = _top_tokens(scores, logprobs if p.token_logprobs else None, p.top_n_tokens)
    return detail


class Sampler:
    def __init__(self, eos_token_id: int | None, pad_token_id: int | None, vocab_size: int):
        self.eos = eos_token_id
        self.pad = pad_token_id
        self.vocab_size = vocab_size

    def __call__(self, logits: torch.Tensor, rows: list[SamplerRow]) -> SampleResult:
        scores = logits.float().clone()
        params = [r.params for r in rows]
        if self.eos is not None and any(p.min_new_tokens or p.length_penalty for p in params):
            _eos_adjust(scores, rows, self.eos)
        if any(p.repetition_penalty != 1.0 for p in params):
            _repetition_penalty(scores, rows)
        sampling = [p.sampling for p in params]
        if any(sampling):
            scores = scores / _column([p.temperature if p.sampling else 1.0 for p in params], scores)
            if any(p.top_k > 0 for p in params):
                scores = _top_k(scores, [p.top_k if p.sampling else 0 for p in params])
            if any(p.sampling and p.top_p < 1.0 for p in params):
                scores = _top_p(scores, [p.top_p if p.sampling else 1.0 for p in params])
            if any(p.sampling and 0 < p.typical_p < 1.0 for p in params):
                scores = _typical_p(scores, [p.typical_p if p.sampling else 1.0 for p in params])
        chosen = scores.argmax(dim=1)
        if any(sampling):
            probs = scores.softmax(dim=1)
            for i, r in enumerate(rows):
                if sampling[i]:
                    noise = torch.empty_like(probs[i]).exponential_(generator=r.generator)
                    chosen[i] = (probs[i] / noise).argmax()
        tokens = chosen.tolist()
        wanted = [p.generated_tokens for p in params]
        logprobs = scores.log_softmax(dim=1) if any(w and p.token_logprobs for w, p in zip(wanted, params,
                                                                                             strict=True)) else None
        details = [_detail(tokens[i], scores[i], None if logprobs is None else logprobs[i], params[i])
                   if wanted[i] else None for i in range(len(rows))]
        return SampleResult(tokens, details)


def input_token_details(logits: torch.Tensor, input_ids: list[int], params: GenerationParams) -> list[TokenDetail]:
    """Decoder-only input tokens (§1.9): logits [L, V] raw, position i predicting token i+1. The first position
    has logprob NaN (when asked) and no rank or top tokens; the rest are scored against the raw logits."""
    first = TokenDetail(input_ids[0], math.nan if params.token_logprobs else None)
    if len(input_ids) == 1:
        return [first]
    raw = logits[: len(input_ids) - 1].float()
    logprobs = raw.log_softmax(dim=1)
    targets = torch.tensor(input_ids[1:], device=raw.device).unsqueeze(1)
    chosen = logprobs.gather(1, targets).squeeze(1).tolist()
    ranks = ((logprobs > logprobs.gather(1, targets)).sum(dim=1) + 1).tolist() if params.token_ranks else None
    details = [first]
    for i, token in enumerate(input_ids[1:]):
        d = TokenDetail(token)
        if params.token_logprobs:
            d.logprob = chosen[i]
        if ranks is not None:
            d.rank = ranks[i]
        if params.top_n_tokens:
            d.top_tokens = _top_tokens(logprobs[i], logprobs[i] if params.token_logprobs else None,
                                       params.top_n_tokens)
        details.append(d)
    return details


def encoder_input_token_details(input_ids: list[int], params: GenerationParams) -> list[TokenDetail]:
    """Encoder-decoder input tokens: the encoder ids, logprob NaN when asked, never rank or top tokens."""
    return [TokenDetail(t, math.nan if params.token_logprobs else None) for t in input_ids]
