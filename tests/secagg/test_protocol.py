"""The masking protocol, offline over a LocalBoard: sums exact, dropouts, and the attacks it must defeat.

Uniformity tests: chi-square of the top 8 bits of 2^14 ring elements in 256 bins, false-alarm rate
ALPHA = 1e-3 per test; five such tests run per session, so about 0.5 % of runs would see one fail by
chance (masks come from os.urandom and cannot be seeded; the inputs are). Each test is also shown to
reject the unmasked figures, so it can fail.
"""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys

import numpy as np
import orjson
import pytest
from Crypto.Protocol.SecretSharing import Shamir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

from qis_fhir.errors import RoundRepeatedError, SecAggAbortedError
from qis_fhir.secagg.local import LocalBoard, run_round
from qis_fhir.secagg.protocol import (
    RoundJournal,
    SiteRound,
    _pairwise_sum,
    _revealed,
    _s_key,
    _self_key,
    opened,
    prg,
    seal,
    threshold,
    unmask,
)
from qis_fhir.secagg.round import RoundRef

from .conftest import Sites, make_ref

ALPHA = 1e-3
UNIFORM_N = 2**14


def uniform_p(ring_values: np.ndarray) -> float:
    """Chi-square p-value that the top byte of these Z_{2^64} elements is uniform over 256 values."""
    top = (np.asarray(ring_values, dtype=np.uint64) >> np.uint64(56)).astype(np.int64)
    return float(stats.chisquare(np.bincount(top, minlength=256)).pvalue)


def small_vectors(ids, length, seed=0):
    rng = np.random.default_rng(seed)
    return {s: rng.integers(0, 50, length).astype(np.uint64) for s in ids}


def total_of(vectors, ids):
    out = np.zeros(len(next(iter(vectors.values()))), dtype=np.uint64)
    for s in ids:
        out = out + vectors[s]
    return out


@pytest.mark.parametrize("n", [3, 50])
def test_masks_cancel_at_roster_bounds(n):
    s = Sites(n)
    vectors = small_vectors(s.ids, 16, seed=n)
    result, _ = s.run(make_ref(), vectors)
    assert result.contributors == frozenset(s.ids)
    np.testing.assert_array_equal(result.totals, total_of(vectors, s.ids))


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(min_value=3, max_value=50), seed=st.integers(0, 2**32 - 1))
def test_masks_cancel_for_any_roster(n, seed):
    s = Sites(n)
    rng = np.random.default_rng(seed)
    # any ring elements, wrap-around included
    vectors = {sid: rng.integers(0, 2**64, 8, dtype=np.uint64) for sid in s.ids}
    result, _ = s.run(make_ref(), vectors)
    np.testing.assert_array_equal(result.totals, total_of(vectors, s.ids))


def test_partial_sum_of_masked_vectors_is_uniform():
    """What a DHT node or member sees of all contributors but one is uniform over the ring; the same
    test rejects the unmasked partial sum, so it is not a test that cannot fail."""
    s = Sites(4)
    vectors = small_vectors(s.ids, UNIFORM_N, seed=3)
    result, board = s.run(make_ref(), vectors)
    masked = opened(make_ref(), s.roster, "masked", board.messages["masked"])
    partial = total_of({k: np.frombuffer(v[32:], dtype="<u8").astype(np.uint64) for k, v in masked.items()}, s.ids[1:])
    assert uniform_p(partial) > ALPHA
    assert uniform_p(total_of(vectors, s.ids[1:])) < ALPHA
    np.testing.assert_array_equal(result.totals, total_of(vectors, s.ids))


@pytest.mark.parametrize(("n", "dropping", "phase"), [
    (5, 1, "masked"),  # shared its secrets, then never contributed
    (7, 2, "masked"),
    (5, 1, "shares"),  # advertised keys, then went away
    (5, 1, "advertise"),  # never appeared
])
def test_sites_dropping_before_contributing(n, dropping, phase):
    s = Sites(n)
    vectors = small_vectors(s.ids, 12, seed=n + dropping)
    gone = s.ids[1:1 + dropping]
    result, _ = s.run(make_ref(), vectors, stop_before={g: phase for g in gone})
    present = [x for x in s.ids if x not in gone]
    assert result.contributors == frozenset(present)
    assert result.dropped == (frozenset(gone) if phase == "masked" else frozenset())
    np.testing.assert_array_equal(result.totals, total_of(vectors, present))


@pytest.mark.parametrize("phase", ["consistency", "reveal"])
def test_site_dropping_between_contributing_and_revealing_is_still_summed(phase):
    s = Sites(5)
    vectors = small_vectors(s.ids, 12, seed=11)
    result, board = s.run(make_ref(), vectors, stop_before={"site-02": phase})
    assert result.contributors == frozenset(s.ids)
    np.testing.assert_array_equal(result.totals, total_of(vectors, s.ids))
    assert "site-02" not in board.messages["reveal"]


class LateBoard(LocalBoard):
    """A board where one site's masked vector arrives after the readers looked (a slow or hostile
    node): ``collect`` leaves it out, but an eavesdropper holding every packet still has it."""

    def __init__(self, late: str) -> None:
        super().__init__()
        self.late = late

    async def collect(self, phase):
        got = await super().collect(phase)
        if phase == "masked":
            got.pop(self.late, None)
        return got


def test_site_wrongly_reported_dropped_is_not_unmasked():
    s = Sites(5)
    ref = make_ref()
    vectors = small_vectors(s.ids, UNIFORM_N, seed=5)
    late = "site-03"
    result, board = s.run(ref, vectors, LateBoard(late))
    others = [x for x in s.ids if x != late]
    assert result.contributors == frozenset(others) and result.dropped == {late}
    np.testing.assert_array_equal(result.totals, total_of(vectors, others))
    reveals = {k: orjson.loads(v) for k, v in opened(ref, s.roster, "reveal", board.messages["reveal"]).items()}
    assert all(late not in r["b"] and late in r["s"] for r in reveals.values())  # only its pairwise key
    # the attack: its late masked vector, minus every pairwise mask (its s key was rebuilt from the
    # reveals, which unmask did above); what is left is x + PRG(b) with b never revealed: uniform
    y = np.frombuffer(board.messages["masked"][late][32:-64], dtype="<u8").astype(np.uint64)
    # rebuild late's s key exactly as any member can, and strip the pairwise masks
    adv = opened(ref, s.roster, "advertise", board.messages["advertise"])
    s_seed = Shamir.combine(sorted(_revealed(reveals, frozenset(others), "s", late))[:threshold(5, 3)])
    pair = _pairwise_sum(ref, late, _s_key(ref, late, s_seed), {u: adv[u][32:] for u in others}, UNIFORM_N)
    estimate = y - pair
    assert uniform_p(estimate) > ALPHA
    assert uniform_p(vectors[late]) < ALPHA


def test_colluding_members_learn_only_the_honest_sum():
    """Two colluding members (c = 2) with every message, the totals and their own seeds and keys,
    against three honest sites (m = 4 >= c + 2): each honest site's vector, after removing every mask
    the colluders can compute, is still uniform; only the sum of all honest sites comes out."""
    s = Sites(5, min_sites=4)
    ref = make_ref()
    vectors = small_vectors(s.ids, UNIFORM_N, seed=9)
    parts = s.rounds(ref, vectors)
    board = LocalBoard()
    result = asyncio.run(run_round(parts, board))
    colluders, honest = parts[:2], [p.site_id for p in parts[2:]]
    adv = opened(ref, s.roster, "advertise", board.messages["advertise"])
    reveals = {k: orjson.loads(v) for k, v in opened(ref, s.roster, "reveal", board.messages["reveal"]).items()}
    for h in honest:
        y = np.frombuffer(board.messages["masked"][h][32:-64], dtype="<u8").astype(np.uint64)
        seed = Shamir.combine(sorted(_revealed(reveals, result.contributors, "b", h))[:threshold(5, 4)])
        estimate = y - prg(_self_key(ref, h, seed), UNIFORM_N)  # the self mask is revealed for contributors
        for c in colluders:  # and the colluders know their own pairwise masks with h
            estimate = estimate + _pairwise_sum(ref, c.site_id, c._s, {h: adv[h][32:]}, UNIFORM_N)
        assert uniform_p(estimate) > ALPHA, h
    honest_sum = result.totals - vectors[colluders[0].site_id] - vectors[colluders[1].site_id]
    np.testing.assert_array_equal(honest_sum, total_of(vectors, honest))


def test_rerun_within_a_round_is_refused_across_processes(tmp_path):
    s = Sites(3)
    ref = make_ref()
    journal_dir = tmp_path / "rounds"
    vectors = small_vectors(s.ids, 4)
    s.run(ref, vectors, journal=RoundJournal(journal_dir))
    # another process, same site directory: the journal file of the round exists, so it is refused
    code = ("import sys; sys.path.insert(0, 'tests'); from secagg.conftest import make_ref; "
            "from qis_fhir.secagg.protocol import RoundJournal; from qis_fhir.errors import RoundRepeatedError\n"
            f"try:\n    RoundJournal({str(journal_dir)!r}).begin(make_ref(), 'site-01')\nexcept RoundRepeatedError:\n    sys.exit(16)\n")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 16
    with pytest.raises(RoundRepeatedError):
        s.run(ref, {k: v + np.uint64(1) for k, v in vectors.items()}, journal=RoundJournal(journal_dir))
    # the value round of the same period is another round
    s.run(make_ref("value"), vectors, journal=RoundJournal(journal_dir))


def test_board_refuses_a_second_different_message():
    s = Sites(3)
    ref = make_ref()
    board = LocalBoard()
    vectors = small_vectors(s.ids, 4)
    first = s.rounds(ref, vectors)
    for phase, step in (("advertise", "advertise"), ("shares", "share"), ("masked", "contribute")):
        for p in first:
            asyncio.run(getattr(p, step)(board))
    again = SiteRound(ref, "site-00", s.keys["site-00"], s.roster, vectors["site-00"] + np.uint64(5))
    with pytest.raises(RoundRepeatedError):
        asyncio.run(again.advertise(board))
    with pytest.raises(RoundRepeatedError):
        asyncio.run(first[0].contribute(board))  # the same object cannot send a phase twice either


def test_forged_and_replayed_messages_are_ignored():
    s = Sites(4)
    ref = make_ref()
    vectors = small_vectors(s.ids, 6)
    _, board = s.run(ref, vectors)
    outsider = Sites(1)
    other_round = make_ref(period="2023")
    forged = {"site-00": seal(ref, "masked", "site-00", outsider.keys["site-00"], b"x" * 80),  # wrong key
              "site-01": seal(other_round, "masked", "site-01", s.keys["site-01"], b"x" * 80),  # another round
              "site-99": seal(ref, "masked", "site-99", s.keys["site-02"], b"x" * 80)}  # not a member
    assert opened(ref, s.roster, "masked", forged) == {}
    assert set(opened(ref, s.roster, "masked", board.messages["masked"])) == set(s.ids)


def test_value_round_reveals_nothing_unless_its_contributors_are_the_presence_rounds():
    s = Sites(5)
    vectors = small_vectors(s.ids, 6)
    parts = s.rounds(make_ref("value"), vectors, required_contributors=frozenset(s.ids[:4]))
    board = LocalBoard()
    with pytest.raises(SecAggAbortedError):
        asyncio.run(run_round(parts, board))
    assert board.messages["reveal"] == {} and all("presence round" in p.stopped for p in parts)


def test_too_few_contributors_abort_before_any_reveal():
    s = Sites(5)  # t = 4
    ref = make_ref()
    vectors = small_vectors(s.ids, 6)
    parts = s.rounds(ref, vectors)
    board = LocalBoard()
    stop = {"site-00": "masked", "site-01": "masked"}
    with pytest.raises(SecAggAbortedError, match="no contributor set was signed"):
        asyncio.run(run_round(parts, board, stop_before=stop))
    assert board.messages["reveal"] == {} and board.messages["consistency"] == {}
    assert all("only 3 sites contributed" in p.stopped for p in parts[2:])


def test_threshold_keeps_two_views_from_both_gathering_signatures():
    # t > (n + c) / 2 for every c < n / 3, and never below m
    for n in range(3, 60):
        t = threshold(n, 3)
        assert t >= 3 and t <= n
        for c in range(0, (n - 1) // 3 + 1):
            assert 2 * t - c > n, (n, c, t)



def _resign_reveal(board, ref, site, key, change):
    """Replace ``site``'s reveal with ``change(payload)``, signed by the site itself (a dishonest revealer)."""
    payload = orjson.loads(board.messages["reveal"][site][:-64])
    board.messages["reveal"][site] = seal(ref, "reveal", site, key, orjson.dumps(change(payload)))


def _flip(share_b64: str) -> str:
    raw = bytearray(base64.b64decode(share_b64))
    raw[0] ^= 1
    return base64.b64encode(bytes(raw)).decode()


def test_wrong_shares_from_a_revealer_do_not_change_or_block_the_totals():
    s = Sites(7)  # t = 5; six revealers
    ref = make_ref()
    vectors = small_vectors(s.ids, 6)
    result, board = s.run(ref, vectors, stop_before={"site-06": "masked"})  # one dropped: both kinds revealed

    def corrupt(payload):
        for kind in ("b", "s"):
            for v in payload[kind]:
                payload[kind][v][1] = _flip(payload[kind][v][1])
        payload["b"]["site-01"] = "garbage"  # malformed too
        return payload

    _resign_reveal(board, ref, "site-00", s.keys["site-00"], corrupt)
    again = asyncio.run(unmask(ref, s.roster, board, 6))
    np.testing.assert_array_equal(again.totals, result.totals)
    np.testing.assert_array_equal(again.totals, total_of(vectors, s.ids[:6]))
    _resign_reveal(board, ref, "site-01", s.keys["site-01"], corrupt)  # two bad of six: four good, t = 5
    with pytest.raises(SecAggAbortedError, match="wrong shares|shares of a secret"):
        asyncio.run(unmask(ref, s.roster, board, 6))


def test_a_round_whose_period_can_still_change_is_not_joined():
    s = Sites(3)
    ref = RoundRef("net-test", "1.0.0", "sbp", "2999", "presence", "3001-02-05")
    board = LocalBoard()
    with pytest.raises(SecAggAbortedError, match="opens on 3001-02-05"):
        asyncio.run(SiteRound(ref, "site-00", s.keys["site-00"], s.roster, np.zeros(3, np.uint64)).advertise(board))
    assert board.messages["advertise"] == {}
