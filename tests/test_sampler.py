"""Sampler and token info (spec §5.5, §5.6, §1.9, §1.7), each checked against an independent computation:
plain torch, pure Python, or transformers' own logits processors on the same inputs."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import HAS_TRITON
from transformers.generation.logits_process import (
    ExponentialDecayLengthPenalty,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from runtime.engine import sampler as sampler_mod
from runtime.engine.request import GenerationParams
from runtime.engine.sampler import (
    Sampler,
    SamplerRow,
    TokenHistory,
    encoder_input_token_details,
    input_token_details,
    make_generator,
)

V = 64
EOS = 2


def logits_for(batch: int, seed: int = 0, vocab: int = V) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def row(history: list[int] | None = None, num_generated: int = 0, **kw) -> SamplerRow:
    p = GenerationParams(**kw)
    gen = make_generator(p.seed or 0, "cpu") if p.sampling else None
    return SamplerRow(p, num_generated, TokenHistory(history or [], V), gen)


def full_logprobs(sampler: Sampler, logits: torch.Tensor, rows: list[SamplerRow]) -> torch.Tensor:
    """The processed scores' log-softmax as the client sees it: top-n over the whole vocabulary with logprobs."""
    for r in rows:
        r.params.generated_tokens = r.params.token_logprobs = True
        r.params.top_n_tokens = logits.shape[1]
    result = sampler(logits, rows)
    out = torch.full(logits.shape, float("-inf"))
    for i, d in enumerate(result.details):
        for t in d.top_tokens:
            out[i, t.token_id] = t.logprob
    return out


def ref_logprobs(scores: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(scores.float(), dim=-1)


# ---------------------------------------------------------------- EOS: min_new_tokens and length penalty


def test_min_new_tokens_masks_eos_only_while_short():
    logits = logits_for(1).repeat(3, 1)
    logits[:, EOS] = 50.0  # EOS would win everywhere
    rows = [row(num_generated=0, min_new_tokens=2), row(num_generated=1, min_new_tokens=2),
            row(num_generated=2, min_new_tokens=2)]
    s = Sampler(EOS, V)
    tokens = s(logits, rows).token_ids
    assert tokens[0] == tokens[1] != EOS
    assert tokens[0] == int(torch.cat([logits[0, :EOS], torch.tensor([-1e9]), logits[0, EOS + 1:]]).argmax())
    assert tokens[2] == EOS
    lp = full_logprobs(s, logits[:1], [row(num_generated=1, min_new_tokens=2)])
    masked = logits[:1].clone()
    masked[0, EOS] = float("-inf")
    assert lp[0, EOS] == float("-inf")
    torch.testing.assert_close(lp, ref_logprobs(masked))


@pytest.mark.parametrize("eos_logit", [4.0, -4.0])
def test_length_penalty_formula_and_hf_parity(eos_logit):
    start, decay = 3, 1.5
    logits = logits_for(4)
    logits[:, EOS] = eos_logit
    generated = [2, 3, 4, 6]  # p = -1, 0, 1, 3
    s = Sampler(EOS, V)
    lp = full_logprobs(s, logits, [row(num_generated=g, length_penalty=(start, decay)) for g in generated])
    for i, g in enumerate(generated):
        expected = logits[i].clone()
        p = g - start
        if p > 0:
            e = eos_logit
            expected[EOS] = e + abs(e) * (decay**p - 1)
        torch.testing.assert_close(lp[i], ref_logprobs(expected))
        # transformers' processor on the same logits: cur_len = prompt (5) + generated, regulation start = start + 5
        hf = ExponentialDecayLengthPenalty((start, decay), EOS, 5)(torch.zeros(1, 5 + g, dtype=torch.long),
                                                                  logits[i : i + 1].clone())
        torch.testing.assert_close(lp[i : i + 1], ref_logprobs(hf))
    assert lp[3, EOS] > lp[2, EOS] > lp[1, EOS]  # it only ever raises EOS


def test_min_new_tokens_wins_over_length_penalty():
    logits = logits_for(1)
    s = Sampler(EOS, V)
    lp = full_logprobs(s, logits, [row(num_generated=5, min_new_tokens=6, length_penalty=(0, 2.0))])
    assert lp[0, EOS] == float("-inf")


def test_no_eos_id_leaves_scores_alone():
    logits = logits_for(1)
    lp = full_logprobs(Sampler(None, V), logits, [row(min_new_tokens=3, length_penalty=(0, 2.0),
                                                           num_generated=1)])
    torch.testing.assert_close(lp, ref_logprobs(logits))


# ---------------------------------------------------------------- repetition penalty


def test_repetition_penalty_pure_python_positive_and_negative():
    logits = logits_for(1)
    logits[0, 5], logits[0, 6] = 2.0, -2.0
    history = [5, 6, 5, 5, 9, 63]  # repeats are penalised once
    theta = 1.3
    lp = full_logprobs(Sampler(EOS, V), logits, [row(history=history, repetition_penalty=theta)])
    expected = [float(x) for x in logits[0]]
    for t in set(history):
        expected[t] = expected[t] * theta if expected[t] < 0 else expected[t] / theta
    torch.testing.assert_close(lp[0], ref_logprobs(torch.tensor(expected)))
    assert math.isclose(float(lp[0, 5] - lp[0, 1]), 2.0 / theta - float(logits[0, 1]), rel_tol=1e-5)


def test_repetition_penalty_matches_hf_per_row():
    logits = logits_for(3, seed=1)
    histories = [[1, 4, 4, 7, 30], [3, 3, 50, 63, 0], [8, 9]]
    thetas = [1.2, 0.7, 1.0]  # a θ = 1 row in the batch must come out untouched
    rows = [row(history=h, repetition_penalty=t) for h, t in zip(histories, thetas, strict=True)]
    got = sampler_mod._repetition_penalty(logits.clone(), rows)
    for i, (h, t) in enumerate(zip(histories, thetas, strict=True)):
        hf = RepetitionPenaltyLogitsProcessor(t)(torch.tensor([h]), logits[i : i + 1].clone()) if t != 1.0 \
            else logits[i : i + 1]
        assert torch.equal(got[i : i + 1], hf)


def test_repetition_penalty_greedy_end_to_end():
    logits = logits_for(1, seed=2)
    top = int(logits.argmax())
    history = [top, 11]
    tokens = Sampler(EOS, V)(logits, [row(history=history, repetition_penalty=100.0)]).token_ids
    hf = RepetitionPenaltyLogitsProcessor(100.0)(torch.tensor([history]), logits.clone())
    assert tokens == [int(hf.argmax())] and tokens[0] != top


def test_eos_in_history_penalised_the_same_alone_and_in_a_batch():
    """TGIS restores EOS after the penalty when EOS == PAD in batches (its histories hold padding); ours hold only
    real tokens, so EOS in the history is penalised exactly as alone: results never depend on batch size."""
    logits = logits_for(2, seed=3)
    logits[:, EOS] = 3.0
    history = [EOS, 7]

    def eos_lp(batch):
        lp = full_logprobs(Sampler(EOS, V), logits[:batch],
                           [row(history=history, repetition_penalty=2.0) for _ in range(batch)])
        return lp[0]

    penalised = logits[0].clone()
    penalised[EOS], penalised[7] = penalised[EOS] / 2.0, _ctrl(float(penalised[7]), 2.0)
    torch.testing.assert_close(eos_lp(1), ref_logprobs(penalised))
    torch.testing.assert_close(eos_lp(2), ref_logprobs(penalised))


def _ctrl(x: float, theta: float) -> float:
    return x * theta if x < 0 else x / theta


# ---------------------------------------------------------------- warpers: HF parity on the same inputs


@pytest.mark.parametrize("temperature", [0.5, 1.7])
def test_temperature_matches_hf(temperature):
    logits = logits_for(2, seed=4)
    rows = [row(temperature=temperature, seed=1), row(temperature=temperature, seed=2)]
    got = sampler_mod._warp(logits.clone(), [r.params for r in rows])
    assert torch.equal(got, TemperatureLogitsWarper(temperature)(None, logits.clone()))


@pytest.mark.parametrize("k", [1, 5, V, V + 100])
def test_top_k_matches_hf(k):
    logits = logits_for(2, seed=5)
    logits[1, 10:14] = 9.0  # ties at the k-th value are all kept
    got = sampler_mod._top_k(logits.clone(), [k, k])
    assert torch.equal(got, TopKLogitsWarper(k)(None, logits.clone()))
    kept = (got > float("-inf")).sum(dim=1).tolist()
    assert kept[0] == min(k, V)
    if k == 1:
        assert kept[1] == 4


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_matches_hf(p):
    logits = logits_for(3, seed=6)
    got = sampler_mod._top_p(logits.clone(), [p] * 3)
    assert torch.equal(got, TopPLogitsWarper(p)(None, logits.clone()))
    assert torch.equal(got.argmax(dim=1), logits.argmax(dim=1))  # the top token is always kept


def test_top_p_tiny_keeps_only_top_token():
    logits = torch.zeros(1, V)
    logits[0, 17] = 0.5
    got = sampler_mod._top_p(logits.clone(), [1e-6])
    assert (got[0] > float("-inf")).nonzero().flatten().tolist() == [17]
    # 1 - 1e-9 rounds to 1.0 in float32, and the float32 cumulative sum ends at or below it: only the explicit keep
    # saves the top token from a fully -inf row
    logits = logits_for(1, seed=20, vocab=5000)
    got = sampler_mod._top_p(logits.clone(), [1e-9])
    assert (got[0] > float("-inf")).nonzero().flatten().tolist() == [int(logits.argmax())]


@pytest.mark.parametrize("mass", [0.2, 0.5, 0.95])
def test_typical_p_matches_hf(mass):
    logits = logits_for(3, seed=7)
    got = sampler_mod._typical_p(logits.clone(), [mass] * 3)
    assert torch.equal(got, TypicalLogitsWarper(mass)(None, logits.clone()))
    assert ((got > float("-inf")).sum(dim=1) < V).all()


def test_full_chain_matches_hf_and_greedy_rows_are_not_warped():
    logits = logits_for(3, seed=8)
    history = [3, 4, 5]
    sampling = dict(temperature=0.8, top_k=20, top_p=0.9, typical_p=0.95, repetition_penalty=1.2, seed=5)
    rows = [row(history=history, **sampling), row(history=history, repetition_penalty=1.2, top_k=2, top_p=0.1),
            row(history=history, temperature=1.0, top_k=3, seed=6)]
    lp = full_logprobs(Sampler(EOS, V), logits, rows)
    ids = torch.tensor([history])
    hf0 = logits[0:1].clone()
    for proc in (RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.8), TopKLogitsWarper(20),
                 TopPLogitsWarper(0.9), TypicalLogitsWarper(0.95)):
        hf0 = proc(ids, hf0)
    torch.testing.assert_close(lp[0:1], ref_logprobs(hf0))
    # greedy (temperature 0) ignores its warper fields: penalties only
    hf1 = RepetitionPenaltyLogitsProcessor(1.2)(ids, logits[1:2].clone())
    torch.testing.assert_close(lp[1:2], ref_logprobs(hf1))
    assert (lp[1] > float("-inf")).all()
    assert (lp[2] > float("-inf")).sum() == 3


# ---------------------------------------------------------------- choice


def test_greedy_is_argmax_lowest_index_on_ties():
    logits = logits_for(4, seed=9)
    logits[3, 40] = logits[3, 12] = logits[3].max() + 1
    assert Sampler(EOS, V)(logits, [row() for _ in range(4)]).token_ids == [
        int(logits[i].argmax()) for i in range(3)] + [12]


def test_columns_past_vocab_size_are_never_chosen():
    logits = logits_for(1, seed=10, vocab=V + 8)
    logits[0, V + 3] = 1e4
    assert Sampler(EOS, V)(logits, [row()]).token_ids == [int(logits[0, :V].argmax())]


def _run_steps(rows_factory, target: int, batch_seed: int, steps: int) -> list[int]:
    """Decode `steps` steps; the target row gets the same logits every run, the other rows random ones."""
    s = Sampler(EOS, V)
    rows = rows_factory()
    out = []
    for step in range(steps):
        logits = logits_for(len(rows), seed=1000 * batch_seed + step)
        logits[target] = logits_for(1, seed=7000 + step)[0]
        tokens = s(logits, rows).token_ids
        for r in rows:  # the sampler marked the chosen ids in the histories itself
            r.num_generated += 1
        out.append(tokens[target])
    return out


def test_seeded_sampling_is_batch_independent():
    target = dict(temperature=0.9, top_k=30, top_p=0.95, seed=1234, repetition_penalty=1.1)

    def alone():
        return [row(history=[1, 2, 3], **target)]

    def in_batch():
        others = [row(history=[5], temperature=1.3, seed=s) if s % 2 else row(history=[9], top_n_tokens=2,
                                                                             generated_tokens=True)
                  for s in range(7)]
        return others[:3] + [row(history=[1, 2, 3], **target)] + others[3:]

    solo = _run_steps(alone, 0, 1, 25)
    assert solo == _run_steps(in_batch, 3, 2, 25)
    assert solo == _run_steps(in_batch, 3, 3, 25)  # different neighbours, same tokens
    other_seed = _run_steps(lambda: [row(history=[1, 2, 3], **{**target, "seed": 99})], 0, 1, 25)
    assert other_seed != solo
    assert len(set(solo)) > 3  # it really sampled, not a greedy walk


def test_sampled_frequencies_match_softmax():
    vocab, rows_n, rounds = 8, 2000, 5
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, -3.0])
    temperature = 1.5
    s = Sampler(None, vocab)
    rows = [row(temperature=temperature, seed=s_) for s_ in range(rows_n)]
    counts = torch.zeros(vocab)
    for _ in range(rounds):
        for t in s(logits.expand(rows_n, vocab), rows).token_ids:
            counts[t] += 1
    expected = torch.softmax(logits / temperature, dim=0) * rows_n * rounds
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 30.0, (chi2, counts, expected)  # 7 degrees of freedom: p ≈ 1e-4


def test_bfloat16_logits_same_as_their_float32_values():
    logits = logits_for(3, seed=11).to(torch.bfloat16)
    rows = lambda: [row(temperature=0.7, top_p=0.8, seed=3), row(repetition_penalty=1.5, history=[1]),  # noqa: E731
                    row(temperature=1.2, top_k=5, seed=4, generated_tokens=True, token_logprobs=True)]
    s = Sampler(EOS, V)
    a, b = s(logits, rows()), s(logits.float(), rows())
    assert a.token_ids == b.token_ids
    assert a.details == b.details


# ---------------------------------------------------------------- token info of generated tokens


def test_details_only_requested_fields():
    logits = logits_for(4, seed=12)
    rows = [row(), row(generated_tokens=True), row(generated_tokens=True, token_ranks=True),
            row(generated_tokens=True, token_logprobs=True)]
    d = Sampler(EOS, V)(logits, rows).details
    assert d[0] is None
    assert (d[1].logprob, d[1].rank, d[1].top_tokens) == (None, None, None)
    assert d[2].rank == 1 and d[2].logprob is None and d[2].top_tokens is None
    assert d[3].rank is None and d[3].top_tokens is None
    assert math.isclose(d[3].logprob, float(ref_logprobs(logits[3]).max()), rel_tol=1e-6)


def test_rank_and_logprob_of_sampled_tokens():
    logits = logits_for(1, seed=13)
    r = row(temperature=5.0, seed=42, generated_tokens=True, token_logprobs=True, token_ranks=True)
    s = Sampler(EOS, V)
    seen_ranks = set()
    for _ in range(30):
        res = s(logits, [r])
        t, d = res.token_ids[0], res.details[0]
        scores = [float(x) / 5.0 for x in logits[0]]
        assert d.rank == 1 + sum(x > scores[t] for x in scores)
        lse = math.log(sum(math.exp(x) for x in scores))
        assert math.isclose(d.logprob, scores[t] - lse, rel_tol=1e-5)
        seen_ranks.add(d.rank)
    assert max(seen_ranks) > 3


def test_top_n_ties_cap_and_order():
    logits = torch.full((2, V), -5.0)
    tied = [50, 3, 40, 7, 21, 60, 9, 33, 12, 1]  # 10 ids share the best score
    logits[:, tied] = 2.0
    logits[:, 30] = 1.0
    s = Sampler(EOS, V)
    res = s(logits, [row(generated_tokens=True, top_n_tokens=2),
                     row(generated_tokens=True, top_n_tokens=2, token_logprobs=True)])
    no_lp, with_lp = res.details[0].top_tokens, res.details[1].top_tokens
    first8 = sorted(tied)[:8]  # ties beyond n kept, capped at 4n in vocabulary order
    assert [t.token_id for t in no_lp] == first8 and all(t.logprob is None for t in no_lp)
    assert [t.token_id for t in with_lp] == first8  # equal logprobs: lower id first
    expected_lp = float(ref_logprobs(logits[1])[3])
    assert all(math.isclose(t.logprob, expected_lp, rel_tol=1e-6) for t in with_lp)
    # 3 tied ids > n = 2: all three come back, sorted by logprob then id when logprobs were asked
    logits = torch.full((1, V), -5.0)
    logits[0, [44, 8, 20]] = 1.0
    logits[0, 60] = 3.0
    res = s(logits, [row(generated_tokens=True, top_n_tokens=3, token_logprobs=True)])
    assert [t.token_id for t in res.details[0].top_tokens] == [60, 8, 20, 44]
    res = s(logits, [row(generated_tokens=True, top_n_tokens=3)])
    assert [t.token_id for t in res.details[0].top_tokens] == [8, 20, 44, 60]


def test_top_n_pure_python_on_random_scores():
    logits = logits_for(3, seed=14)
    rows = [row(generated_tokens=True, top_n_tokens=n, token_logprobs=True, temperature=0.6, top_p=0.9, seed=n)
            for n in (1, 4, 10)]
    res = Sampler(EOS, V)(logits, rows)
    for i, n in enumerate((1, 4, 10)):
        processed = sampler_mod._top_p(logits[i : i + 1] / 0.6, [0.9])[0]
        lps = ref_logprobs(processed).tolist()
        finite = sorted((i_ for i_ in range(V) if lps[i_] > float("-inf")), key=lambda j: (-lps[j], j))
        want = finite[:n]
        got = res.details[i].top_tokens
        assert [t.token_id for t in got] == want
        assert all(math.isclose(t.logprob, lps[t.token_id], rel_tol=1e-5) for t in got)


def test_top_k_1_gives_logprob_zero_and_one_top_token():
    logits = logits_for(1, seed=15)
    res = Sampler(EOS, V)(logits, [row(temperature=0.7, top_k=1, seed=1, generated_tokens=True,
                                            token_logprobs=True, token_ranks=True, top_n_tokens=2)])
    d = res.details[0]
    assert res.token_ids == [int(logits.argmax())]
    assert d.logprob == 0.0 and d.rank == 1
    assert [(t.token_id, t.logprob) for t in d.top_tokens] == [(res.token_ids[0], 0.0)]


# ---------------------------------------------------------------- input tokens


@pytest.mark.parametrize("chunk", [256, 3])
def test_input_token_details_against_raw_logits(monkeypatch, chunk):
    monkeypatch.setattr(sampler_mod, "INPUT_CHUNK", chunk)
    ids = [1, 17, 5, 5, 60, 2, 33, 8]
    logits = logits_for(len(ids), seed=16).to(torch.bfloat16)
    p = GenerationParams(input_tokens=True, token_logprobs=True, token_ranks=True, top_n_tokens=3)
    details = input_token_details(logits, ids, p)
    assert [d.token_id for d in details] == ids
    assert math.isnan(details[0].logprob) and details[0].rank is None and details[0].top_tokens is None
    raw = logits.float()
    for i in range(1, len(ids)):
        row_ = raw[i - 1].tolist()
        lse = math.log(sum(math.exp(x) for x in row_))
        assert math.isclose(details[i].logprob, row_[ids[i]] - lse, rel_tol=1e-5, abs_tol=1e-6)
        assert details[i].rank == 1 + sum(x > row_[ids[i]] for x in row_)
        best = sorted(range(V), key=lambda j: (-row_[j], j))
        third = row_[best[2]]
        assert [t.token_id for t in details[i].top_tokens] == [j for j in best if row_[j] >= third][:12]


def test_input_token_details_minimal_fields():
    ids = [4, 9, 11]
    details = input_token_details(logits_for(3, seed=17), ids, GenerationParams(input_tokens=True))
    assert [(d.token_id, d.logprob, d.rank, d.top_tokens) for d in details] == [(t, None, None, None) for t in ids]
    top = input_token_details(logits_for(3, seed=17), ids, GenerationParams(top_n_tokens=2))
    assert all(t.logprob is None for d in top[1:] for t in d.top_tokens)
    assert top[1].top_tokens == sorted(top[1].top_tokens, key=lambda t: t.token_id)  # vocabulary order


def test_encoder_input_token_details():
    ids = [13, 7, 1]
    with_lp = encoder_input_token_details(ids, GenerationParams(token_logprobs=True, token_ranks=True,
                                                                 top_n_tokens=2))
    assert [d.token_id for d in with_lp] == ids
    assert all(math.isnan(d.logprob) and d.rank is None and d.top_tokens is None for d in with_lp)
    assert all(d.logprob is None for d in encoder_input_token_details(ids, GenerationParams()))


def test_length_penalty_past_the_float_range_saturates():
    """10^400 overflows a double (TGIS/transformers raise OverflowError there): EOS gets the largest finite score,
    so greedy picks it and a sampled row still has a finite distribution."""
    logits = logits_for(2)
    rows = [row(num_generated=400, length_penalty=(0, 10.0)),
            row(num_generated=400, length_penalty=(0, 10.0), temperature=0.7, seed=1, generated_tokens=True,
                token_logprobs=True)]
    result = Sampler(EOS, V)(logits, rows)
    assert result.token_ids == [EOS, EOS]
    assert math.isfinite(result.details[1].logprob)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is a dev dependency (`make install` installs it)")
@pytest.mark.parametrize("vocab", [1100, 3072])  # a partial last tile; whole tiles only
def test_two_pass_argmax_matches_torch(vocab):
    """The sampler's greedy choice on CUDA (Triton, run interpreted here): torch.argmax's result on random rows, on
    ties (the lowest id), on rows that are all -inf and on rows with NaN (the first NaN)."""
    from runtime.engine.triton_argmax import argmax

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, vocab, generator=g)
    scores[1, [5, 900, vocab - 1]] = 50.0  # ties across tiles
    scores[2] = float("-inf")
    scores[3, [1050, 7]] = float("nan")
    scores[4, :vocab // 2] = float("-inf")
    scores[5, vocab - 1] = float("inf")
    got = argmax(scores)
    assert got.dtype == torch.long and got.tolist() == scores.argmax(dim=1).tolist()
    assert got[1] == 5 and got[2] == 0 and got[3] == 7
