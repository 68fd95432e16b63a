"""Re-anchoring of a provider's own level: plausible moves are followed, a x10 minute is not.

A provider judged by fewer than ``majority_min`` fresh levels confirms its own move after a few
consistent ticks only when the move is plausible (volatility-scaled size) or has persisted; a
second provider's level can confirm it at once. Known truth: synthetic minutes of four ticks
(open, high, low, close at 0/20/40/59 s, as the replay of bar files makes them) or denser feeds.
"""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import numpy as np
import pytest

from tickcast.config import ConsensusConfig, OutlierConfig, Settings
from tickcast.errors import TickStatus
from tickcast.market.consensus import ConsensusBook
from tickcast.market.pipeline import AssetPipeline
from tickcast.ticks import NS_PER_MIN, TickBatch

OFFSETS_S = np.array([0.0, 20.0, 40.0, 59.0])


def _minutes(ohlc: np.ndarray, provider: str = "solo", start_min: int = 0) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Four ticks per minute (open, high, low, close) for rows of ``ohlc``."""
    m = len(ohlc)
    secs = (60.0 * (start_min + np.arange(m)))[:, None] + OFFSETS_S[None, :]
    return [provider] * (4 * m), secs.ravel(), np.asarray(ohlc, dtype=np.float64).ravel()


def _calm_ohlc(minutes: int, seed: int, level: float = 100.0, bp: float = 3.0) -> np.ndarray:
    """A quiet random walk around ``level``, one (o, h, l, c) row per minute."""
    rng = np.random.default_rng(seed)
    close = level * np.exp(np.cumsum(bp * 1e-4 * rng.standard_normal(minutes)))
    open_ = np.concatenate([[level], close[:-1]])
    hi = np.maximum(open_, close) * (1 + 1e-4 * rng.random(minutes))
    lo = np.minimum(open_, close) * (1 - 1e-4 * rng.random(minutes))
    return np.column_stack([open_, hi, lo, close])


def _x10_minute_market(synth: SimpleNamespace, bad_minute: int = 30, minutes: int = 60,
                       providers: tuple[str, ...] = ("solo",), bad: str = "solo") -> tuple[TickBatch, np.ndarray]:
    """Each provider quotes a calm market; ``bad`` prints minute ``bad_minute`` at x10."""
    names, secs, prices = [], [], []
    for k, prov in enumerate(providers):
        ohlc = _calm_ohlc(minutes, seed=k)
        if prov == bad:
            ohlc[bad_minute] = ohlc[bad_minute] * 10.0
        n, s, p = _minutes(ohlc, prov)
        names += n
        secs.append(s + 0.5 * k)
        prices.append(p)
    t = np.concatenate(secs)
    order = np.argsort(t, kind="stable")
    batch = synth.ticks(list(np.asarray(names)[order]), t[order], np.concatenate(prices)[order],
                        size=np.ones(len(t)))
    minute = ((batch.ts_event - synth.T0) // NS_PER_MIN).astype(int)
    bad_rows = (batch.provider_names() == bad) & (minute == bad_minute)
    return batch, bad_rows


def _statuses(batch: TickBatch, **outliers: float) -> np.ndarray:
    book = ConsensusBook(OutlierConfig(**outliers), ConsensusConfig())
    book.update(batch)
    return batch.status


@pytest.mark.parametrize("providers", [("solo",), ("a", "b")])
def test_a_x10_minute_is_rejected_and_the_next_minute_is_accepted(
        synth: SimpleNamespace, providers: tuple[str, ...]) -> None:
    # Arrange: one venue prints a whole minute at x10 (four consistent ticks), then real prices.
    batch, bad = _x10_minute_market(synth, providers=providers, bad=providers[0])
    # Act
    status = _statuses(batch)
    # Assert: every x10 tick is an outlier and every real tick, the next minute's included, is
    # accepted.
    assert (status[bad] == TickStatus.OUTLIER).all()
    assert (status[~bad] == TickStatus.OK).all()


def test_before_the_rule_the_x10_minute_was_taken_for_a_move(synth: SimpleNamespace) -> None:
    # The same market with re-anchoring allowed for any move size (the former rule): the last
    # x10 tick is accepted and the first real ticks after it are rejected. This is the defect.
    batch, bad = _x10_minute_market(synth)
    status = _statuses(batch, reanchor_max_bp=1e9)
    bad_rows = np.flatnonzero(bad)
    assert status[bad_rows[-1]] == TickStatus.OK
    after = bad_rows[-1] + 1 + np.arange(2)
    assert (status[after] == TickStatus.OUTLIER).all()


def test_the_pipeline_builds_no_x10_bar_and_keeps_the_next_minute(synth: SimpleNamespace) -> None:
    batch, _ = _x10_minute_market(synth, bad_minute=30)
    pipe = AssetPipeline("BTC-USD", Settings())
    out = [pipe.process(batch).consensus_bars, pipe.flush().consensus_bars]
    bars = np.concatenate([f["close"].to_numpy() for f in out])
    ts = np.concatenate([f["ts"].to_numpy() for f in out])
    minute = (ts - synth.T0) // NS_PER_MIN
    assert bars.max() < 101.0 and bars.min() > 99.0
    assert 30 not in minute.tolist() and 31 in minute.tolist()


@pytest.mark.parametrize("drop", [0.02, 0.035])
def test_a_lone_venues_genuine_crash_minute_is_followed(synth: SimpleNamespace, drop: float) -> None:
    # Arrange: minute 30 falls by `drop` from open to close (low below it), then the market
    # stays down: four ticks a minute, as replayed bars.
    ohlc = _calm_ohlc(60, seed=3)
    level = ohlc[29, 3]
    ohlc[30] = [level, level, level * (1 - drop - 0.002), level * (1 - drop)]
    ohlc[31:] = _calm_ohlc(29, seed=4, level=level * (1 - drop))
    batch = synth.ticks(*_minutes(ohlc), size=np.ones(4 * 60))
    # Act
    pipe = AssetPipeline("BTC-USD", Settings())
    res = pipe.process(batch)
    bars = [res.consensus_bars, pipe.flush().consensus_bars]
    # Assert: nothing rejected; the crash minute's bar and the bars after it follow the venue.
    assert (batch.status == TickStatus.OK).all()
    close = np.concatenate([b["close"].to_numpy() for b in bars])
    assert len(close) == 60
    assert close[30] == pytest.approx(level * (1 - drop))
    assert np.allclose(close[31:], ohlc[31:, 3])


def test_an_implausible_move_that_persists_is_followed_after_the_persistence(synth: SimpleNamespace) -> None:
    # Arrange: a lone venue re-prices x5 for good at t = 300 s (a redenomination, say), ticks
    # every 2 s. x5 is far beyond the plausible move, so it must persist first.
    batch = synth.market(("solo",), seconds=1200, path=lambda t: np.where(t < 300, 100.0, 500.0))
    persist = OutlierConfig().reanchor_persist_s
    t = (batch.ts_event - synth.T0) / 1e9
    # Act
    status = _statuses(batch)
    # Assert: flagged from the move until it has persisted reanchor_persist_s (counted from the
    # first tick judged after the venue's own level moved: its level is the median of the last
    # five prices, so the fourth tick of the new level), accepted after.
    flagged = status == TickStatus.OUTLIER
    moved = t[np.flatnonzero(t >= 300)[3]]
    assert flagged[(t >= 300) & (t < moved + persist)].all()
    assert not flagged[t < 300].any() and not flagged[t >= moved + persist].any()


def test_a_second_venue_confirms_an_implausible_move_at_once(synth: SimpleNamespace) -> None:
    # Two venues re-price x5 together: each confirms the other after a few ticks.
    batch = synth.market(("a", "b"), seconds=600, path=lambda t: np.where(t < 300, 100.0, 500.0))
    t = (batch.ts_event - synth.T0) / 1e9
    status = _statuses(batch)
    flagged = np.flatnonzero(status == TickStatus.OUTLIER)
    assert 0 < len(flagged) <= 6
    assert (t[flagged] < 300 + 8).all()


def _volatile_then_step(synth: SimpleNamespace, vol_bp_per_tick: float, step: float) -> TickBatch:
    """A lone venue, ticks every 2 s, random walk of ``vol_bp_per_tick``; x(1 + step) at 600 s."""
    rng = np.random.default_rng(11)
    steps = np.cumsum(vol_bp_per_tick * 1e-4 * rng.standard_normal(1000))
    return synth.market(("solo",), seconds=1200, noise_bp=0.0,
                        path=lambda t: 100.0 * np.exp(steps[(t // 2).astype(int)])
                        * np.where(t < 600, 1.0, 1.0 + step))


def test_plausibility_scales_with_volatility(synth: SimpleNamespace) -> None:
    # A +15 % step (1,398 bp, above reanchor_max_bp = 1,000) by a lone venue: in a market moving
    # ~60 bp per 2-s tick (~330 bp a minute, cap 10 x that) it is plausible and re-anchors after
    # three ticks; in a calm market (2 bp per tick) it must persist first.
    def flagged_after_step(vol: float) -> int:
        batch = _volatile_then_step(synth, vol, 0.15)
        status = _statuses(batch)
        t = (batch.ts_event - synth.T0) / 1e9
        return int((status[t >= 600] == TickStatus.OUTLIER).sum())

    assert flagged_after_step(60.0) == 3
    assert flagged_after_step(2.0) > 100


def test_screening_with_the_rule_is_independent_of_batch_boundaries(synth: SimpleNamespace) -> None:
    batch, _ = _x10_minute_market(synth, providers=("a", "b"), bad="a")
    extra = synth.market(("solo",), seconds=1200, path=lambda t: np.where(t < 300, 100.0, 500.0))
    for b in (batch, extra):
        whole = b.take(np.arange(len(b)))
        _statuses(whole)
        book = ConsensusBook(OutlierConfig(), ConsensusConfig())
        parts = synth.split(b, 7)
        for part in parts:
            book.update(part)
        assert np.array_equal(np.concatenate([p.status for p in parts]), whole.status)


def test_pickle_round_trip_mid_stretch_continues_identically(synth: SimpleNamespace) -> None:
    batch = synth.market(("solo",), seconds=1200, path=lambda t: np.where(t < 300, 100.0, 500.0))
    parts = synth.split(batch, 100)
    book = ConsensusBook(OutlierConfig(), ConsensusConfig())
    for p in parts[:3]:  # ends inside the implausible stretch (t ~ 300..600 s)
        book.update(p)
    restored = pickle.loads(pickle.dumps(book))
    for p in parts[3:]:
        a, b = p.take(np.arange(len(p))), p.take(np.arange(len(p)))
        book.update(a)
        restored.update(b)
        assert np.array_equal(a.status, b.status)


def test_a_book_pickled_before_the_rule_loads_and_runs(synth: SimpleNamespace) -> None:
    book = ConsensusBook(OutlierConfig(), ConsensusConfig())
    book.update(synth.market(("a", "b"), seconds=60))
    state = dict(book.__dict__)
    for name in ("_anchor", "_anchor_ts", "_var", "_away"):
        state.pop(name)
    old = ConsensusBook.__new__(ConsensusBook)
    old.__setstate__(state)
    later = synth.market(("a", "b"), seconds=300)
    later.ts_event += 60 * 10**9
    old.update(later)
    assert (later.status == TickStatus.OK).all()


def test_a_plausibility_cap_below_the_band_is_refused() -> None:
    with pytest.raises(ValueError, match="reanchor_max_bp"):
        OutlierConfig(band_bp=400.0, reanchor_max_bp=300.0)
