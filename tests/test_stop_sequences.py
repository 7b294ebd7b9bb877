"""Stop-sequence matching and truncation (spec §3.3 hold-back, §3.4), with real tokenizers: SmolLM2's byte-level BPE
for the hand-checked cases, plus the tiny gpt2 (byte-level) and t5 (metaspace) fixtures in the property test."""

from __future__ import annotations

import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from test_detokenizer import SETTINGS, TEXTS, assert_clean_deltas, encode, info_for, load, run

from runtime.engine.detokenizer import decode_full
from runtime.engine.stopping import DecodeStream, hold_back


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return load(smollm2_dir)


@pytest.fixture(scope="module")
def gpt2(tiny_model):
    return load(tiny_model("gpt2"))


@pytest.fixture(scope="module")
def t5(tiny_model):
    return load(tiny_model("t5"))


def both_modes(info, ids, stops, include, check_from=0) -> tuple[str, str | None, int]:
    """Run unary and streaming; they must agree on text, stop and token count, and the stream must be clean."""
    udeltas, unary, ustop, un = run(info, ids, stops, include, stream=False, check_from=check_from)
    deltas, streamed, stop, n = run(info, ids, stops, include, stream=True, check_from=check_from)
    assert (streamed, stop, n) == (unary, ustop, un)
    assert "".join(udeltas) == unary
    assert_clean_deltas(deltas, streamed)
    return unary, stop, n


def test_hold_back_sizes():
    assert hold_back(["ab", "中文"], include_stop_sequence=True, stream=True) == 1
    assert hold_back(["ab", "中文"], include_stop_sequence=False, stream=True) == 6  # UTF-8 bytes, not characters
    assert hold_back(["ab", "中文"], include_stop_sequence=False, stream=False) == 0
    assert hold_back([], include_stop_sequence=False, stream=True) == 0


def test_multi_token_stop(smollm2):
    info = info_for(smollm2)
    ids = encode(smollm2, " I was confused by the movie")
    assert smollm2.convert_ids_to_tokens(ids[:4]) == ["ĠI", "Ġwas", "Ġconfused", "Ġby"]
    assert both_modes(info, ids, ["was confused by"], True) == (" I was confused by", "was confused by", 4)
    assert both_modes(info, ids, ["was confused by"], False) == (" I ", "was confused by", 4)


def test_stop_inside_a_token_discards_the_rest_of_it(smollm2):
    info = info_for(smollm2)
    ids = encode(smollm2, " I was confused by the movie")
    # "confu" ends inside the single token "Ġconfused": its bytes "sed" are dropped, the token still counts
    assert both_modes(info, ids, ["confu"], True) == (" I was confu", "confu", 3)
    assert both_modes(info, ids, ["confu"], False) == (" I was ", "confu", 3)
    deltas, *_ = run(info, ids, ["confu"], True)
    assert not any("sed" in d for d in deltas)


def test_first_listed_stop_wins_on_the_same_token(smollm2):
    info = info_for(smollm2)
    ids = encode(smollm2, " The cat sat")
    assert smollm2.convert_ids_to_tokens(ids[:2]) == ["ĠThe", "Ġcat"]
    assert both_modes(info, ids, ["The cat", "cat"], False) == (" ", "The cat", 2)
    assert both_modes(info, ids, ["cat", "The cat"], False) == (" The ", "cat", 2)
    # list order beats position: "at" ends after "ca" in " cat", but is listed first
    assert both_modes(info, ids, ["at", "ca"], False) == (" The c", "at", 2)
    assert both_modes(info, ids, ["ca", "at"], False) == (" The ", "ca", 2)
    # a later-listed stop that completes on an earlier token still wins over an earlier-listed one completing later
    assert both_modes(info, ids, ["sat", "The"], True) == (" The", "The", 1)


def test_last_occurrence_in_the_window(smollm2):
    info = info_for(smollm2)
    assert smollm2.convert_ids_to_tokens(encode(smollm2, " banana")) == ["Ġbanana"]
    ids = encode(smollm2, " banana")
    assert both_modes(info, ids, ["an"], True) == (" banan", "an", 1)
    assert both_modes(info, ids, ["an"], False) == (" ban", "an", 1)
    ids = encode(smollm2, " aaaa")
    assert smollm2.convert_ids_to_tokens(ids) == ["Ġa", "aa", "a"]
    # after "aa" the output is " aaa"; "aa" occurs at bytes 1 and 2, both overlapping the new bytes: the last wins
    assert both_modes(info, ids, ["aa"], False) == (" a", "aa", 2)
    assert both_modes(info, ids, ["aa"], True) == (" aaa", "aa", 2)


def test_only_matches_overlapping_the_new_bytes(smollm2):
    """An occurrence completed while stop checks were off (min_new_tokens) is never matched later."""
    info = info_for(smollm2)
    ids = encode(smollm2, " The cat sat on the mat. The cat is here")
    assert smollm2.convert_ids_to_tokens(ids)[7:9] == ["ĠThe", "Ġcat"]
    assert both_modes(info, ids, ["cat"], True, check_from=3) == (" The cat sat on the mat. The cat", "cat", 9)
    assert both_modes(info, ids, ["cat"], True, check_from=0) == (" The cat", "cat", 2)
    assert both_modes(info, ids, ["The"], True, check_from=1) == (" The cat sat on the mat. The", "The", 8)


def test_stops_on_split_and_combining_characters(smollm2):
    info = info_for(smollm2)
    ids = encode(smollm2, " 中文 👍🏽 e\u0301 done")
    tokens = smollm2.convert_ids_to_tokens(ids)
    assert tokens[3:6] == ["ĠðŁ", "ĳ", "į"]  # 👍 split over three byte-level tokens
    assert both_modes(info, ids, ["👍"], True) == (" 中文 👍", "👍", 6)
    assert both_modes(info, ids, ["🏽"], False) == (" 中文 👍", "🏽", 9)
    assert both_modes(info, ids, ["文 👍"], True) == (" 中文 👍", "文 👍", 6)
    # bytewise matching may cut a grapheme cluster: the stop is the combining mark itself
    assert both_modes(info, ids, ["\u0301"], False) == (" 中文 👍🏽 e", "\u0301", 12)


def test_max_tokens_on_the_same_step_keeps_the_whole_text(smollm2):
    info = info_for(smollm2)
    ids = encode(smollm2, " I was confused")
    for stream in (False, True):
        ds = DecodeStream(info, ["confu"], False, stream)
        deltas = [ds.add(t) for t in ids]
        assert ds.match_stop() == "confu"
        deltas.append(ds.finish(None))  # the engine's MAX_TOKENS outranks the stop sequence: no truncation
        assert ds.text == "".join(deltas) == " I was confused"


def test_no_match_gives_the_whole_sequence_decode(smollm2):
    info = info_for(smollm2)
    ids = encode(smollm2, " I was confused by the movie 👍🏽")
    for include in (True, False):
        assert both_modes(info, ids, ["xyz", "movies"], include) == (decode_full(info, ids), None, len(ids))


def test_streamed_text_is_held_back_until_safe(smollm2):
    """With include_stop_sequence=False nothing within len(longest stop) bytes of the newest token goes out."""
    info = info_for(smollm2)
    ids = encode(smollm2, " I was confused by the movie")
    ds = DecodeStream(info, ["movie", "x"], False, True)
    sent = ""
    for t in ids:
        sent += ds.add(t)
        newest = len(smollm2.decode([t]).encode())
        assert len(sent.encode()) <= max(0, len(ds.text.encode()) - newest - 5)
    assert sent == " I was confused b"  # 27 bytes out, minus 6 for " movie", minus 5 held back
    assert ds.match_stop() == "movie"
    assert sent + ds.finish("movie") == " I was confused by the "


def _occurrence_ends(data: bytes, stop: bytes) -> list[int]:
    return [i + len(stop) for i in range(len(data) - len(stop) + 1) if data.startswith(stop, i)]


@pytest.mark.parametrize("case", ["gpt2", "smollm2", "t5-seq2seq"])
@SETTINGS
@given(text=TEXTS, data=st.data())
def test_stop_property(case, request, text, data):
    """Against an oracle on the final bytes: the match is the first output position where some stop sequence
    completes (ties on one token broken by list order, then last occurrence), the text is cut exactly there, and
    stream and unary agree."""
    name, _, mode = case.partition("-")
    tok = request.getfixturevalue(name)
    info = info_for(tok, seq2seq=mode == "seq2seq")
    ids = encode(tok, text)
    full = decode_full(info, ids)
    pool = [full[i:j] for i in range(len(full)) for j in range(i + 1, min(len(full), i + 6) + 1)]
    fixed = st.sampled_from(["cat", " ", "👍", "\u0301", "e", "中"])
    stop_strategy = (st.sampled_from(pool) | fixed) if pool else fixed
    stops = data.draw(st.lists(stop_strategy, min_size=1, max_size=3))
    include = data.draw(st.booleans())
    check_from = data.draw(st.integers(0, 2))

    text_out, stop, n = both_modes(info, ids, stops, include, check_from)
    event("no match" if stop is None else f"match, include={include}")

    # output length (bytes) after each token, from a fresh unary stream (its `text` is the output so far)
    ds, lengths = DecodeStream(info, stops, include, False), [0]
    for t in ids[:n]:
        ds.add(t)
        lengths.append(len(ds.text.encode()))
    fb = full.encode()
    assert fb.startswith(ds.text.encode())
    checked_from = lengths[min(check_from, n)]

    def completes(lo: int, hi: int) -> list[str]:
        return [s for s in stops if any(lo < e <= hi for e in _occurrence_ends(fb[:hi], s.encode()))]

    if stop is None:
        assert text_out == full and n == len(ids)
        assert completes(checked_from, lengths[-1]) == []
        return
    assert completes(checked_from, lengths[n - 1]) == []  # no earlier match
    assert completes(lengths[n - 1], lengths[n])[0] == stop  # first in list order among this token's matches
    sb = stop.encode()
    start = max(e for e in _occurrence_ends(fb[: lengths[n]], sb) if e > lengths[n - 1]) - len(sb)
    assert text_out.encode() == fb[: start + len(sb) if include else start]
