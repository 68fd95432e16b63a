"""One asset's safety state inside a market shard (no Ray of its own).

State it owns (:class:`SafetyActorState`, checkpointed to ``<data_dir>/checkpoints/safety-<ASSET>.pkl``)
    A :class:`~tickcast.monitoring.loop_state.SafetyTracker`: the
    :class:`~tickcast.monitoring.safety.SafetyState` (volatility windows, regime with
    hysteresis, paper P&L of the champion's signal, halt) and the champion's forecasts waiting
    for their bar; plus the cursor of the prediction stream and its event counter.

What it does, when its shard steps it (a new bar or prediction of the asset, or the sweep)
    Reads this asset's champion forecasts from ``predictions:<ASSET>``, the user's own book
    updates from ``book:<ASSET>`` (positions or P&L; once one is applied the drawdown halt
    follows that book instead of the paper account), and the consensus bars
    closed since the last step (from the shard's memory, else the bar store); processes each
    bar once, in order, with the champion's forecast for the next bar (or flat when none came
    before the following bar closed). Publishes the outcome to the Redis hash
    ``safety:<ASSET>`` (``regime``, ``multiplier``, ``halted``, ``updated``; plus ``ratio``,
    ``drawdown``, ``bar_ts``, ``champion`` for operators), which the serving app returns with
    every prediction; logs every regime change, halt, resume, wide-interval switch and P&L
    reset with its figures to the events stream; exports the regime and the multiplier as Ray
    gauges. When the registry's champion changes it starts fresh paper accounts.

How it recovers
    The shard loads the checkpoint and resumes after the last processed bar and the
    checkpointed stream id (state and cursor are saved together). A fresh one fills its
    volatility windows from the stored bars (no P&L) and starts at the stream's end.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pandas as pd
import redis

from actors.loop_support import (EventSink, LoopMetrics, checkpoint_path, load_checkpoint,
                                 read_entries, read_forecasts, save_checkpoint, stream_tail_id)
from tickcast.config import Settings
from tickcast.market.calendar import trading_calendar
from tickcast.monitoring import metrics_names as mn
from tickcast.monitoring.events import event_from
from tickcast.monitoring.book import book_stream_key, decode_book_entry
from tickcast.monitoring.loop_state import SafetyTracker
from tickcast.monitoring.safety import SafetyStatus
from tickcast.storage.safety_store import publish_safety
from tickcast.streams import prediction_stream_key
from tickcast.ticks import NS_PER_S
from training.registry import ModelRegistry

log = logging.getLogger(__name__)

HASH_PREFIX = "safety:"  # the Redis hash the serving app reads
WARM_RECENT_DAYS = 3  # a fresh one looks this far back (wall clock) for its warm-up bars

# The asset's consensus bars with ts > the given one (latest emission of each), by ts.
BarsAfter = Callable[[int], pd.DataFrame]


@dataclass
class SafetyActorState:
    """Everything a safety actor checkpoints."""

    asset: str
    predictions_id: str
    tracker: SafetyTracker
    seq: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    book_id: str = "0-0"  # cursor on book:<ASSET> (the user's own positions or P&L)


def safety_fields(status: SafetyStatus, champion: str | None, now_ns: int) -> dict[str, str]:
    """The ``safety:<ASSET>`` hash: the serving contract plus the figures behind it."""
    out = status.to_redis_fields(now_ns)
    out.update({"ratio": "" if status.ratio is None else repr(float(status.ratio)),
                "drawdown": repr(float(status.drawdown)),
                "bar_ts": "" if status.ts is None else str(int(status.ts)),
                "champion": champion or ""})
    return out


class AssetSafety:
    """Regime, paper P&L, halt and position multiplier of one asset (see the module docstring).

    Parameters
    ----------
    asset
        The asset.
    settings
        The whole configuration (``safety``, ``model.fee_bp``, ``controller``...).
    client, registry, sink, metrics
        The shard's Redis client, model registry, event sink and Ray metrics.
    bars_after
        The asset's consensus bars after a ts (the shard serves them from memory).
    """

    def __init__(self, asset: str, settings: Settings, client: redis.Redis,
                 registry: ModelRegistry, sink: EventSink, metrics: LoopMetrics,
                 bars_after: BarsAfter) -> None:
        self.asset = asset
        self.settings = settings
        self.client = client
        self.registry = registry
        self.sink = sink
        self.metrics = metrics
        self.bars_after = bars_after
        self.predictions_key = prediction_stream_key(settings.serve.prediction_stream, asset)
        self.book_key = book_stream_key(asset)
        self.path = checkpoint_path(settings, f"safety-{asset}")
        self.last_error: str | None = None
        self.restored = False
        self._published: tuple[str, float, bool, int | None] | None = None
        state, err = load_checkpoint(self.path)
        if isinstance(state, SafetyActorState) and state.asset == asset:
            self.state = state
            self.restored = True
        else:
            if err or state is not None:
                self.last_error = err or "checkpoint of another kind: ignored"
            champion = self.registry.aliases(asset).get("champion")
            tracker = SafetyTracker(settings.safety, settings.model.fee_bp, champion)
            self.state = SafetyActorState(asset, stream_tail_id(client, self.predictions_key),
                                          tracker)
        # The calendar follows the config, whatever the checkpoint was taken with.
        self.state.tracker.calendar = trading_calendar(settings, asset)
        if not self.restored:
            self._warm_start()

    # -- start-up -------------------------------------------------------------------------------
    def _warm_start(self) -> None:
        """Fill the volatility windows from the newest stored bars (fresh state only)."""
        need = self.settings.safety.vol_long + 1
        recent = self.bars_after(time.time_ns() - WARM_RECENT_DAYS * 86_400 * NS_PER_S)
        bars = recent if len(recent) >= need else self.bars_after(-1)
        bars = bars.iloc[-need:]
        if not len(bars):
            return
        status = self.state.tracker.warm(bars["ts"].to_numpy(), bars["close"].to_numpy())
        self._emit([{"type": "safety_warm_start", "bars": int(len(bars)),
                     "regime": status.regime, "ratio": status.ratio,
                     "multiplier": status.multiplier, "last_bar_ts": int(bars["ts"].iloc[-1])}])
        self._publish(status)

    # -- the step -------------------------------------------------------------------------------
    def rollback(self) -> None:
        """A step failed half-way: back to the last checkpoint (its inputs are read again)."""
        state, _ = load_checkpoint(self.path)
        if isinstance(state, SafetyActorState) and state.asset == self.asset:
            self.state = state
            self._published = None

    def checkpoint(self) -> None:
        """Persist state and cursor together."""
        err = save_checkpoint(self.path, self.state)
        if err:
            self.last_error = err

    def _emit(self, raw: list[dict[str, Any]]) -> None:
        events = []
        for e in raw:
            self.state.seq += 1
            events.append(event_from("safety", self.asset, e, seq=self.state.seq,
                                     champion=self.state.tracker.champion))
        self.sink.emit(events)

    def _publish(self, status: SafetyStatus) -> None:
        key = (status.regime, float(status.multiplier), bool(status.halted), status.ts)
        if key == self._published:
            return
        # Hash and change-feed entry together: replicas re-read only what the feed names.
        publish_safety(self.client, self.asset,
                       safety_fields(status, self.state.tracker.champion, time.time_ns()))
        self._published = key
        self.metrics.set(mn.REGIME, mn.REGIME_CODES[status.regime], self.asset)
        self.metrics.set(mn.POSITION_MULTIPLIER, status.multiplier, self.asset)

    def step(self) -> bool:
        """One pass; True when the prediction stream had more than one batch waiting."""
        c = self.settings.controller
        tracker = self.state.tracker
        raw: list[dict[str, Any]] = []
        champion = self.registry.aliases(self.asset).get("champion")
        if champion != tracker.champion:
            status = tracker.new_champion(champion, ts=tracker.last_done_ts)
            raw.extend(status.events)
        forecasts, preds = read_forecasts(self.client, self.predictions_key, self.asset,
                                          self.state.predictions_id, c.stream_batch,
                                          self.state.rejected)
        if preds:
            self.state.predictions_id = preds[-1][0]
        tracker.on_forecasts(forecasts)
        book = read_entries(self.client, self.book_key, self.state.book_id, c.stream_batch)
        if book:
            # Applied in time order before the first bar opening at or after each update.
            limit = self.settings.safety.book_max_abs_position
            tracker.on_book([decode_book_entry(self.asset, fields, limit) for _eid, fields in book])
            self.state.book_id = book[-1][0]
        new = self.bars_after(tracker.last_bar_ts)
        if len(new):
            tracker.on_bars(new["ts"].to_numpy(), new["close"].to_numpy())
        statuses = tracker.step()
        for st in statuses:
            raw.extend(st.events)
        if raw:
            self._emit(raw)
        self._publish(tracker.status)
        if raw or preds or statuses or book:
            self.checkpoint()
        return len(preds) >= c.stream_batch or len(book) >= c.stream_batch

    # -- queries and commands ---------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Regime, multiplier, halt, P&L, counters, errors (JSON-ready)."""
        out = self.state.tracker.to_dict()
        out.update({"asset": self.asset, "predictions_id": self.state.predictions_id,
                    "stream_rejected": dict(self.state.rejected), "events": self.state.seq,
                    "restored": self.restored, "last_error": self.last_error})
        return out

    def reset(self, reason: str = "requested") -> dict[str, Any]:
        """Start fresh paper accounts now (lifts a halt); the regime is kept."""
        tracker = self.state.tracker
        status = tracker.state.reset_pnl(reason, ts=tracker.last_done_ts)
        self._emit(list(status.events))
        self._publish(status)
        self.checkpoint()
        return self.status()

    def follow_champion(self, version: str | None) -> dict[str, Any]:
        """Start fresh paper accounts for ``version`` now if not already following it."""
        tracker = self.state.tracker
        if tracker.champion != version:
            status = tracker.new_champion(version, ts=tracker.last_done_ts)
            self._emit(list(status.events))
            self._publish(status)
            self.checkpoint()
        return self.status()


__all__ = ["AssetSafety", "SafetyActorState", "safety_fields"]
