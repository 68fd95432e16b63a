"""Frozen-feed detection: stale repeated quotes while the market moves, and nothing else.

A frozen feed repeats one quote while the other providers move away from it. The detector must
not be fooled by the feed's own late / out-of-order / bad ticks (they must not restart its
timer), and must leave alone a venue that really trades at one price while the market wanders
around that price.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest

from tickcast.config import ConsensusConfig, OutlierConfig, Settings
from tickcast.errors import TickStatus
from tickcast.market.consensus import ConsensusBook
from tickcast.market.pipeline import AssetPipeline
from tickcast.sources.replay import ReplayFile, iter_replay_batches, read_bar_file
from tickcast.ticks import NS_PER_S, TickBatch

FROZEN_AFTER_NS = int(ConsensusConfig().frozen_after_s * NS_PER_S)
STUCK_FROM_S = 120.0


def _book() -> ConsensusBook:
    return ConsensusBook(OutlierConfig(), ConsensusConfig())


def _ramp(start_s: float, over_s: float, move_bp: float) -> Callable[[np.ndarray], np.ndarray]:
    """Flat at 100, then a linear move of ``move_bp`` over ``over_s`` seconds, then flat."""
    return lambda t: 100.0 * (1.0 + move_bp * 1e-4 * np.clip((t - start_s) / over_s, 0.0, 1.0))


def _stuck_market(synth: SimpleNamespace, path: Callable[[np.ndarray], np.ndarray],
                  two_sided: bool = False, seconds: float = 600.0) -> tuple[TickBatch, np.ndarray]:
    """Providers a, b, c on ``path``; from STUCK_FROM_S on, c repeats exactly 100.0 (and, with
    ``two_sided``, one bid/ask; the others' bid/ask follow their prices)."""
    batch = synth.market(("a", "b", "c"), seconds=seconds, path=path)
    t = (batch.ts_event - synth.T0) / NS_PER_S
    stuck = (batch.provider_names() == "c") & (t >= STUCK_FROM_S)
    batch.price[stuck] = 100.0
    if two_sided:
        batch.bid[:] = batch.price * (1 - 1e-4)
        batch.ask[:] = batch.price * (1 + 1e-4)
    return batch, stuck


def _frozen_mask(batch: TickBatch) -> np.ndarray:
    return batch.status == TickStatus.FROZEN


def _expected(batch: TickBatch, stuck: np.ndarray) -> np.ndarray:
    """Stuck ticks more than frozen_after_s after the first stuck tick."""
    first = batch.ts_event[stuck][0]
    return stuck & (batch.ts_event - first > FROZEN_AFTER_NS)


def _late_copy(batch: TickBatch, row: int, **cols: float) -> TickBatch:
    """A copy of one tick (its old event time), with some fields changed."""
    late = batch.take(np.array([row]))
    for name, value in cols.items():
        getattr(late, name)[:] = value
    return late


# ---------------------------------------------------------------- a stale feed is caught
@pytest.mark.parametrize("two_sided", [False, True])
def test_stale_feed_is_frozen_once_the_market_moved_away(synth: SimpleNamespace, two_sided: bool) -> None:
    # Arrange: the market rises 30 bp within a minute after c got stuck.
    batch, stuck = _stuck_market(synth, _ramp(130, 60, 30.0), two_sided)
    book = _book()
    # Act
    book.update(batch)
    # Assert: exactly the stuck ticks older than frozen_after_s, nothing else.
    assert np.array_equal(_frozen_mask(batch), _expected(batch, stuck))
    assert book.frozen_counts == {"a": 0, "b": 0, "c": int(_expected(batch, stuck).sum())}


@pytest.mark.parametrize("same_batch", [True, False])
def test_late_tick_of_a_frozen_feed_does_not_restart_its_timer(synth: SimpleNamespace, same_batch: bool) -> None:
    # Arrange: c's tick of t=100 s (before it got stuck, another price) is delivered at
    # t~196 s, in the middle of the stale stretch (the case that used to push detection back
    # by a whole frozen_after_s).
    batch, stuck = _stuck_market(synth, _ramp(130, 60, 30.0))
    t = (batch.ts_event - synth.T0) / NS_PER_S
    c = batch.provider_names() == "c"
    old_row = int(np.flatnonzero(c & (t >= 100))[0])
    late = _late_copy(batch, old_row, price=99.97)
    cut = int(np.searchsorted(t, 196.0))
    parts = [batch.take(np.arange(cut)), late, batch.take(np.arange(cut, len(batch)))]
    if same_batch:
        parts = [TickBatch.concat(parts)]
    book = _book()
    # Act
    for part in parts:
        book.update(part)
    # Assert: the late tick is accepted (not frozen), every other tick as without it.
    status = np.concatenate([p.status for p in parts])
    assert status[cut] == TickStatus.OK
    rest = np.delete(status, cut)
    assert np.array_equal(rest == TickStatus.FROZEN, _expected(batch, stuck))


def test_bad_print_of_a_frozen_feed_does_not_restart_its_timer(synth: SimpleNamespace) -> None:
    # Arrange: at t~150 s the stuck provider sends one x5 print, then repeats its quote again.
    batch, stuck = _stuck_market(synth, _ramp(130, 60, 30.0))
    t = (batch.ts_event - synth.T0) / NS_PER_S
    bad = int(np.flatnonzero(stuck & (t >= 150))[0])
    batch.price[bad] = 500.0
    stuck[bad] = False
    # Act
    _book().update(batch)
    # Assert
    assert batch.status[bad] == TickStatus.OUTLIER
    assert np.array_equal(_frozen_mask(batch), _expected(batch, stuck))


def test_old_tick_inside_a_batch_is_no_sign_of_life(synth: SimpleNamespace) -> None:
    # Arrange: one batch whose last arrival is a tick of c with event time 150 s and another
    # price, after c's ticks up to 600 s: screened in event-time order it would sit inside the
    # stale stretch; the arrival order tells it is old news.
    batch, stuck = _stuck_market(synth, _ramp(130, 60, 30.0))
    t = (batch.ts_event - synth.T0) / NS_PER_S
    old_row = int(np.flatnonzero(stuck & (t >= 150))[0])
    old = _late_copy(batch, old_row, price=99.97)
    with_old = TickBatch.concat([batch, old])
    # Act
    _book().update(with_old)
    # Assert: the old tick itself is fine; the stale stretch is still caught on time.
    assert with_old.status[-1] == TickStatus.OK
    assert np.array_equal(_frozen_mask(with_old)[:-1], _expected(batch, stuck))


def test_evidence_stays_until_the_price_changes(synth: SimpleNamespace) -> None:
    # Arrange: the market goes 30 bp up and comes back to c's stuck price; c changes its
    # price at t=400 s and repeats the new one, while the market stays flat, to the end.
    def there_and_back(t: np.ndarray) -> np.ndarray:
        up = _ramp(130, 30, 30.0)(t) - 100.0
        return 100.0 + np.where(t < 220, up, np.maximum(up - 0.3 * (t - 220) / 30, 0.0))

    batch, stuck = _stuck_market(synth, there_and_back)
    t = (batch.ts_event - synth.T0) / NS_PER_S
    after = (batch.provider_names() == "c") & (t >= 400)
    batch.price[after] = 100.01
    stuck &= ~after
    # Act
    _book().update(batch)
    # Assert: frozen through the return of the market, not after the feed changed its price.
    assert np.array_equal(_frozen_mask(batch), _expected(batch, stuck))


# ---------------------------------------------------------------- real trading is not frozen
def test_venue_trading_at_one_price_while_the_market_wanders_around_it_is_not_frozen(
        synth: SimpleNamespace) -> None:
    # Arrange: the market oscillates +-2 bp around 100 for 10 minutes; c trades at exactly
    # 100.0 all along (as a venue with a big resting order at a round price does).
    batch, stuck = _stuck_market(synth, lambda t: 100.0 * (1 + 2e-4 * np.sin(2 * np.pi * t / 120)))
    # Act
    book = _book()
    book.update(batch)
    # Assert
    assert stuck.sum() > 200
    assert not _frozen_mask(batch).any()
    assert book.frozen_counts["c"] == 0


def test_a_repeated_whole_quote_needs_a_smaller_move_than_a_repeated_price(synth: SimpleNamespace) -> None:
    # Arrange: the market settles 2.5 bp above c's unchanged price: within what a venue
    # trading at one price shows, beyond what a live book leaves its touch at.
    price_only, stuck = _stuck_market(synth, _ramp(130, 30, 2.5))
    quotes, _ = _stuck_market(synth, _ramp(130, 30, 2.5), two_sided=True)
    # Act
    _book().update(price_only)
    _book().update(quotes)
    # Assert
    assert not _frozen_mask(price_only).any()
    assert np.array_equal(_frozen_mask(quotes), _expected(quotes, stuck))


def test_bid_ask_updates_leave_a_repeated_price_to_the_price_rule(synth: SimpleNamespace) -> None:
    # Arrange: as above (2.5 bp), c repeats its price but its bid/ask keep updating (a live
    # book): the smaller floor of a repeated whole quote does not apply.
    batch, _ = _stuck_market(synth, _ramp(130, 30, 2.5), two_sided=True)
    c = batch.provider_names() == "c"
    batch.ask[c] = batch.price[c] * (1 + 1e-4 * (1 + 0.5 * np.sin(np.arange(int(c.sum())))))
    # Act
    _book().update(batch)
    # Assert
    assert not _frozen_mask(batch).any()


def test_a_move_of_the_market_beyond_the_price_rule_freezes_a_repeated_price(synth: SimpleNamespace) -> None:
    # Arrange: the same repeated bare price, with the market 8 bp away (> 4 bp + 2 x dispersion).
    batch, stuck = _stuck_market(synth, _ramp(130, 30, 8.0))
    # Act
    _book().update(batch)
    # Assert
    assert np.array_equal(_frozen_mask(batch), _expected(batch, stuck))


def test_thresholds_come_from_config(synth: SimpleNamespace) -> None:
    # Arrange: the 8 bp case with the floor raised to 20 bp is left alone.
    batch, _ = _stuck_market(synth, _ramp(130, 30, 8.0))
    book = ConsensusBook(OutlierConfig(), ConsensusConfig(frozen_move_bp=20.0))
    # Act
    book.update(batch)
    # Assert
    assert not _frozen_mask(batch).any()


# ---------------------------------------------------------------- state
def test_frozen_detection_is_independent_of_batch_boundaries(synth: SimpleNamespace) -> None:
    batch, stuck = _stuck_market(synth, _ramp(130, 60, 30.0), two_sided=True)
    whole = batch.take(np.arange(len(batch)))
    _book().update(whole)
    book = _book()
    parts = synth.split(batch, 37)
    for p in parts:
        book.update(p)
    assert np.array_equal(np.concatenate([p.status for p in parts]), whole.status)
    assert np.array_equal(_frozen_mask(whole), _expected(batch, stuck))


def test_pickle_round_trip_in_the_middle_of_a_stale_stretch(synth: SimpleNamespace) -> None:
    # Arrange: cut while c's run is under way and has already diverged (t=200 s).
    batch, stuck = _stuck_market(synth, _ramp(130, 30, 30.0), two_sided=True)
    t = (batch.ts_event - synth.T0) / NS_PER_S
    cut = int(np.searchsorted(t, 200.0))
    head = batch.take(np.arange(cut))
    book = _book()
    book.update(head)
    restored = pickle.loads(pickle.dumps(book))
    tail_a, tail_b = (batch.take(np.arange(cut, len(batch))) for _ in range(2))
    # Act
    book.update(tail_a)
    restored.update(tail_b)
    # Assert
    assert np.array_equal(tail_a.status, tail_b.status)
    got = np.concatenate([head.status, tail_a.status]) == TickStatus.FROZEN
    assert np.array_equal(got, _expected(batch, stuck))
    assert book.frozen_counts == restored.frozen_counts


def test_checkpoint_of_the_previous_state_layout_still_restores(synth: SimpleNamespace) -> None:
    # Arrange: a book pickled before runs kept bid/ask and divergence (it had _last_price).
    batch, stuck = _stuck_market(synth, _ramp(130, 30, 30.0))
    t = (batch.ts_event - synth.T0) / NS_PER_S
    cut = int(np.searchsorted(t, 60.0))
    book = _book()
    book.update(batch.take(np.arange(cut)))
    state = dict(book.__dict__)
    state["_last_price"] = state.pop("_last_quote")[:, 0].copy()
    del state["_diverged"]
    old = ConsensusBook.__new__(ConsensusBook)
    # Act
    old.__setstate__(state)
    tail = batch.take(np.arange(cut, len(batch)))
    old.update(tail)
    # Assert: it continues as a book that never stopped.
    assert np.array_equal(tail.status == TickStatus.FROZEN, _expected(batch, stuck)[cut:])


# ---------------------------------------------------------------- real data
def test_real_three_venue_replay_has_almost_no_frozen_ticks(shared_data_file: Path) -> None:
    # Arrange: Kraken often trades at one price for minutes in this file (real trades, with
    # volume) while Binance.US and Coinbase wander a few bp around it.
    bars = read_bar_file(shared_data_file, ("BTC-USD",)).bars
    bars = bars[bars.venue.isin(("binanceus", "coinbase", "kraken"))]
    settings = Settings()
    pipe = AssetPipeline("BTC-USD", settings)
    # Act
    for batch in iter_replay_batches(ReplayFile(bars=bars), "BTC-USD", settings.ingest.batch_max_ticks):
        pipe.process(batch)
    pipe.flush()
    # Assert
    totals = pipe.totals
    share = totals.frozen / totals.ticks_in
    print(f"\nfrozen {totals.frozen} of {totals.ticks_in} ticks = {share:.4%}; "
          f"by provider {pipe.book.frozen_counts}")
    assert totals.ticks_in > 150_000
    assert share <= 0.0005
