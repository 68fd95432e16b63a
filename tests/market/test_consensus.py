"""Outlier and frozen-feed screening, reliability and Pyth aggregation."""

from __future__ import annotations

import math
import pickle
from types import SimpleNamespace

import numpy as np
import pytest

from tickcast.config import ConsensusConfig, OutlierConfig
from tickcast.errors import TickStatus
from tickcast.market.consensus import ConsensusBook, aggregate_votes, pyth_aggregate
from tickcast.market.pipeline import AssetPipeline
from tickcast.ticks import TickBatch


def _book(**consensus: float) -> ConsensusBook:
    return ConsensusBook(OutlierConfig(), ConsensusConfig(**consensus))


def _flagged(batch: TickBatch, status: TickStatus = TickStatus.OUTLIER) -> list[int]:
    return np.flatnonzero(batch.status == status).tolist()


# ---------------------------------------------------------------- Pyth aggregation
def test_pyth_single_provider_gives_back_its_price_and_confidence() -> None:
    price, conf = pyth_aggregate([64_123.45], [3.2])
    assert price == 64_123.45
    assert math.isclose(conf, 3.2, rel_tol=1e-9)


@pytest.mark.parametrize("n", [2, 3, 4, 7])
def test_pyth_matches_the_order_statistics_of_the_votes(n: int) -> None:
    # Arrange
    rng = np.random.default_rng(n)
    prices, confs = 100 + rng.random(n), rng.random(n) * 0.1
    votes = np.sort(np.concatenate([prices - confs, prices, prices + confs]))
    k = len(votes)
    # Act
    agg, conf = pyth_aggregate(prices, confs)
    # Assert: Pyth's price model (median; q25 = s[k//4], q75 = s[k - k//4 - 1]).
    r = float(np.median(votes))
    q25, q75 = votes[k // 4], votes[k - k // 4 - 1]
    assert math.isclose(agg, r, rel_tol=0, abs_tol=1e-12)
    assert math.isclose(conf, max(r - q25, q75 - r), rel_tol=1e-12)


def test_pyth_ignores_missing_votes_row_wise() -> None:
    prices = np.array([[100.0, 101.0, np.nan], [np.nan, np.nan, np.nan], [100.0, 200.0, 101.0]])
    agg, conf = pyth_aggregate(prices, np.zeros_like(prices))
    assert agg[0] == 100.5 and np.isnan(agg[1]) and agg[2] == 101.0
    assert conf[0] == 0.5 and np.isnan(conf[1])


def test_aggregate_is_monotone_so_high_bounds_open_and_close() -> None:
    rng = np.random.default_rng(9)
    o = 100 + rng.standard_normal((500, 4))
    c = 100 + rng.standard_normal((500, 4))
    h = np.maximum(o, c) + rng.random((500, 4))
    hs = rng.random((500, 4)) * 0.05
    o[rng.random((500, 4)) < 0.2] = np.nan  # some providers absent
    absent = np.isnan(o)
    c[absent] = h[absent] = np.nan
    agg = {k: aggregate_votes(np.concatenate([v - hs, v, v + hs], axis=1))[0] for k, v in dict(o=o, h=h, c=c).items()}
    ok = ~np.isnan(agg["o"])
    assert (agg["h"][ok] >= np.maximum(agg["o"][ok], agg["c"][ok])).all()


# ---------------------------------------------------------------- outliers
def test_x5_and_x0_2_prints_are_caught_and_named_by_provider(synth: SimpleNamespace) -> None:
    # Arrange: three providers around 100; b prints x5 once, c prints x0.2 once.
    batch = synth.market(("a", "b", "c"), seconds=600)
    names = batch.provider_names()
    i_b = int(np.flatnonzero(names == "b")[100])
    i_c = int(np.flatnonzero(names == "c")[150])
    batch.price[i_b] *= 5.0
    batch.price[i_c] *= 0.2
    pipe = AssetPipeline("BTC-USD", synth.settings)
    # Act
    res = pipe.process(batch)
    # Assert
    assert _flagged(batch) == sorted([i_b, i_c])
    assert res.counts.outliers == {"b": 1, "c": 1}
    assert pipe.book.outlier_counts == {"a": 0, "b": 1, "c": 1}


def test_jumps_caught_for_a_provider_alone(synth: SimpleNamespace) -> None:
    batch = synth.market(("solo",), seconds=600)
    batch.price[[100, 200]] *= np.array([5.0, 0.2])
    book = _book()

    book.update(batch)

    assert _flagged(batch) == [100, 200]


def _crash(start_s: float, drop: float, over_s: float) -> object:
    """Flat at 100, then down ``drop`` linearly over ``over_s`` seconds, then flat."""
    return lambda t: 100.0 * (1.0 - drop * np.clip((t - start_s) / over_s, 0.0, 1.0))


@pytest.mark.parametrize("providers", [("a", "b", "c", "d"), ("solo",)])
def test_crash_of_two_percent_in_a_minute_is_not_an_outlier(synth: SimpleNamespace, providers: tuple[str, ...]) -> None:
    batch = synth.market(providers, seconds=600, every_s=1.0, path=_crash(300, 0.02, 60))
    book = _book()

    book.update(batch)

    assert _flagged(batch) == []


def test_one_provider_crashing_two_percent_while_others_hold_is_not_an_outlier(synth: SimpleNamespace) -> None:
    # Arrange: only "a" drops 2 % within a minute (a venue-specific crash), b and c do not.
    batch = synth.market(("a", "b", "c"), seconds=600, every_s=1.0)
    names = batch.provider_names()
    t = (batch.ts_event - synth.T0) / 1e9
    a = names == "a"
    batch.price[a] *= 1.0 - 0.02 * np.clip((t[a] - 300) / 60, 0, 1)
    # Act
    book = _book()
    book.update(batch)
    # Assert
    assert _flagged(batch) == []


def test_single_step_of_two_percent_alone_is_not_an_outlier(synth: SimpleNamespace) -> None:
    batch = synth.market(("solo",), seconds=300, path=lambda t: np.where(t < 150, 100.0, 98.0))
    _book().update(batch)
    assert _flagged(batch) == []


def test_persistent_move_alone_reanchors_on_its_own_ticks(synth: SimpleNamespace) -> None:
    # Arrange: a lone provider re-prices +10 % for good (band is ~4 %).
    batch = synth.market(("solo",), seconds=600, path=lambda t: np.where(t < 300, 100.0, 110.0))
    # Act
    _book().update(batch)
    # Assert: only the first ticks of the new level wait for confirmation (half the level window).
    flagged = _flagged(batch)
    first_new = int(np.flatnonzero((batch.ts_event - synth.T0) / 1e9 >= 300)[0])
    assert flagged == list(range(first_new, first_new + 3))


def test_market_wide_repricing_reanchors_for_every_provider(synth: SimpleNamespace) -> None:
    # Arrange: every provider moves x5 together (a real move, e.g. a redenomination).
    batch = synth.market(("a", "b", "c", "d"), seconds=600, path=lambda t: np.where(t < 300, 100.0, 500.0))
    pipe = AssetPipeline("BTC-USD", synth.settings)
    # Act
    pipe.process(batch)
    bars = pipe.flush().consensus_bars
    # Assert: a few ticks per provider wait for confirmation, then the new level is followed.
    flagged = np.array(_flagged(batch))
    assert 0 < len(flagged) <= 4 * 4
    assert ((batch.ts_event[flagged] - synth.T0) / 1e9 < 300 + 4 * 2.0).all()
    assert bars.loc[bars.ts >= synth.T0 + 301 * 10**9, "close"].between(499, 501).all()


def test_single_deviant_among_several_stays_flagged_and_loses_reliability(synth: SimpleNamespace) -> None:
    # Arrange: d quotes 10 % above the other three, persistently.
    batch = synth.market(("a", "b", "c", "d"), seconds=1200)
    d = batch.provider_names() == "d"
    batch.price[d] *= 1.10
    book = _book()
    # Act
    book.update(batch)
    # Assert
    assert _flagged(batch) == np.flatnonzero(d).tolist()
    assert book.reliability["d"] < ConsensusConfig().min_reliability
    assert book.excluded() == ("d",)


def test_dispersion_widens_the_band(synth: SimpleNamespace) -> None:
    # Arrange: the same 6 % print, once in a calm market and once where venues disagree by ~1.5 %.
    def run(spread: float) -> list[int]:
        batch = synth.market(("a", "b", "c"), seconds=900, noise_bp=1.0)
        names = batch.provider_names()
        batch.price[names == "a"] *= 1 + spread
        batch.price[names == "c"] *= 1 - spread
        i = int(np.flatnonzero(names == "b")[400])
        batch.price[i] *= 1.06
        _book().update(batch)
        return [j for j in _flagged(batch) if j == i]

    # Act / Assert
    assert run(0.0) != []
    assert run(0.015) == []


# ---------------------------------------------------------------- frozen, stale
def test_frozen_provider_is_marked_while_others_move(synth: SimpleNamespace) -> None:
    # Arrange: a random walk; c repeats one price from t=120 s on.
    rng = np.random.default_rng(2)
    steps = np.cumsum(rng.standard_normal(700)) * 0.02
    batch = synth.market(("a", "b", "c"), seconds=600, path=lambda t: 100.0 + steps[t.astype(int)])
    t = (batch.ts_event - synth.T0) / 1e9
    stuck = (batch.provider_names() == "c") & (t >= 120)
    batch.price[stuck] = batch.price[stuck][0]
    # Act
    book = _book()
    book.update(batch)
    # Assert: frozen once the price has not changed for more than frozen_after_s (90 s).
    frozen = np.zeros(len(batch), dtype=bool)
    frozen[_flagged(batch, TickStatus.FROZEN)] = True
    first_stuck = batch.ts_event[stuck][0]
    assert (frozen == (stuck & (batch.ts_event - first_stuck > 90 * 10**9))).all()
    assert book.frozen_counts["c"] == int(frozen.sum())


def test_quiet_market_is_not_frozen(synth: SimpleNamespace) -> None:
    batch = synth.market(("a", "b", "c"), seconds=600, noise_bp=0.0)
    _book().update(batch)
    assert _flagged(batch, TickStatus.FROZEN) == []


def test_stale_provider_is_not_a_reference(synth: SimpleNamespace) -> None:
    # Arrange: c quotes 120 (far off) and then falls silent; 5 minutes later a and b quote 100.
    book = _book()
    book.update(synth.ticks(["c"] * 5, np.arange(5), [120.0] * 5))
    later = synth.ticks(["a", "b"] * 5, 400 + np.arange(10), [100.0] * 10)
    # Act
    book.update(later)
    # Assert: c (last quote 395 s before) is stale, so a and b only check each other.
    assert _flagged(later) == []


# ---------------------------------------------------------------- reliability
def test_reliability_falls_on_bad_quotes_then_recovers(synth: SimpleNamespace) -> None:
    # Arrange: b sends 100 x5 prints in a row, then good quotes again.
    batch = synth.market(("a", "b", "c"), seconds=1800)
    b_rows = np.flatnonzero(batch.provider_names() == "b")
    bad = b_rows[100:200]
    batch.price[bad] *= 5.0
    book = _book()
    # Act
    book.update(batch)
    # Assert: every bad print flagged; reliability follows the EWMA of good quotes exactly.
    assert _flagged(batch) == bad.tolist()
    alpha, rel, trace = ConsensusConfig().reliability_alpha, 1.0, []
    for row in b_rows:
        rel = (1 - alpha) * rel + alpha * float(batch.status[row] == TickStatus.OK)
        trace.append(rel)
    got = book.last_tick_reliability[b_rows]
    assert all(math.isclose(x, y, rel_tol=1e-12) for x, y in zip(got, trace))
    lowest = got[199]
    assert lowest < ConsensusConfig().min_reliability  # excluded while this low
    assert got[-1] > 0.99  # recovered


def test_rejected_quotes_lower_reliability_duplicates_do_not(synth: SimpleNamespace) -> None:
    batch = synth.ticks(["a"] * 4, [0, 1, 2, 3], [100.0, 100.0, 100.0, 100.0],
                        status=[TickStatus.NON_FINITE, TickStatus.DUPLICATE, TickStatus.LATE, 0])
    book = _book()
    book.update(batch)
    a = ConsensusConfig().reliability_alpha
    assert math.isclose(book.reliability["a"], (1 - a) * (1 - a) + a, rel_tol=1e-12)


# ---------------------------------------------------------------- state
def test_unsorted_batch_is_screened_in_event_time_order(synth: SimpleNamespace) -> None:
    batch = synth.market(("a", "b", "c"), seconds=300)
    batch.price[90] *= 5.0
    perm = np.random.default_rng(1).permutation(len(batch))
    shuffled = batch.take(perm)

    _book().update(batch)
    _book().update(shuffled)

    assert np.array_equal(shuffled.status, batch.status[perm])


def test_pickle_round_trip_continues_identically(synth: SimpleNamespace) -> None:
    batch = synth.market(("a", "b", "c"), seconds=1200, path=_crash(600, 0.05, 120))
    batch.price[::97] *= 5.0
    parts = synth.split(batch, 250)
    book = _book()
    for p in parts[:3]:
        book.update(p)
    restored = pickle.loads(pickle.dumps(book))
    tail_a = [p.take(np.arange(len(p))) for p in parts[3:]]
    tail_b = [p.take(np.arange(len(p))) for p in parts[3:]]

    for x, y in zip(tail_a, tail_b):
        book.update(x)
        restored.update(y)
        assert np.array_equal(x.status, y.status)
    assert book.reliability == restored.reliability
    assert book.dispersion_bp == restored.dispersion_bp


def test_screening_is_independent_of_batch_boundaries(synth: SimpleNamespace) -> None:
    batch = synth.market(("a", "b", "c"), seconds=900, path=_crash(400, 0.03, 60))
    batch.price[::53] *= 0.2
    whole = batch.take(np.arange(len(batch)))
    _book().update(whole)
    book = _book()
    parts = synth.split(batch, 77)
    for p in parts:
        book.update(p)
    assert np.array_equal(np.concatenate([p.status for p in parts]), whole.status)
