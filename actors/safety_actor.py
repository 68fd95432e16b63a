"""The per-asset safety actor ``safety:<ASSET>`` (namespace ``tickcast``, restartable).

State it owns (:class:`SafetyActorState`, checkpointed)
    A :class:`~tickcast.monitoring.loop_state.SafetyTracker`: the
    :class:`~tickcast.monitoring.safety.SafetyState` (volatility windows, regime with
    hysteresis, paper P&L of the champion's signal, halt) and the champion's forecasts waiting
    for their bar; plus the cursor of the prediction stream and its event counter.

What it does, in a background thread every ``controller.monitor_poll_s``
    Reads this asset's champion forecasts from the ``predictions`` stream and the newly closed
    consensus bars from the bar store; processes each bar once, in order, with the champion's
    forecast for the next bar (or flat when none came before the following bar closed).
    Publishes the outcome to the Redis hash ``safety:<ASSET>`` (``regime``, ``multiplier``,
    ``halted``, ``updated``; plus ``ratio``, ``drawdown``, ``bar_ts``, ``champion`` for
    operators), which the serving app returns with every prediction; logs every regime change,
    halt, resume, wide-interval switch and P&L reset with its figures to the events stream;
    exports the regime and the multiplier as Ray gauges. When the registry's champion changes
    it starts fresh paper accounts (the old model's drawdown says nothing about the new one).

Messages it answers
    ``status()``, ``reset(reason)`` (fresh P&L now), ``follow_champion(version)`` (the
    controller's notice of a promotion or rollback; done on its own within a poll otherwise),
    ``fingerprint()``, ``pid()``, ``stop()``.

How it recovers
    Ray restarts it; ``__init__`` loads the checkpoint and resumes after the last processed bar
    and the checkpointed stream id (state and cursor are saved together). A fresh actor fills
    its volatility windows from the stored bars (no P&L) and starts at the stream's end.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import ray

from actors.loop_support import (CheckpointedLoopActor, EventSink,
                                 LoopMetrics, checkpoint_path, get_or_create,
                                 kill_named, load_checkpoint, read_entries, save_checkpoint,
                                 settings_fingerprint, stream_tail_id)
from tickcast.config import Settings
from tickcast.monitoring import metrics_names as mn
from tickcast.monitoring.events import event_from
from tickcast.monitoring.loop_state import SafetyTracker
from tickcast.monitoring.safety import SafetyStatus
from tickcast.monitoring.shadow_eval import parse_prediction
from tickcast.redis_server import connect
from tickcast.storage.bar_store import BarStore
from tickcast.ticks import NS_PER_S
from training.registry import ModelRegistry, registry_root

log = logging.getLogger(__name__)

ACTOR_PREFIX = "safety:"
HASH_PREFIX = "safety:"  # the Redis hash the serving app reads (same spelling as the actor)
WARM_RECENT_DAYS = 3  # a fresh actor looks this far back (wall clock) for its warm-up bars


def actor_name(asset: str) -> str:
    """Ray name of an asset's safety actor (``safety:BTC-USD``)."""
    return f"{ACTOR_PREFIX}{asset}"


@dataclass
class SafetyActorState:
    """Everything a safety actor checkpoints."""

    asset: str
    predictions_id: str
    tracker: SafetyTracker
    seq: int = 0
    rejected: dict[str, int] = field(default_factory=dict)


def safety_fields(status: SafetyStatus, champion: str | None, now_ns: int) -> dict[str, str]:
    """The ``safety:<ASSET>`` hash: the serving contract plus the figures behind it."""
    out = status.to_redis_fields(now_ns)
    out.update({"ratio": "" if status.ratio is None else repr(float(status.ratio)),
                "drawdown": repr(float(status.drawdown)),
                "bar_ts": "" if status.ts is None else str(int(status.ts)),
                "champion": champion or ""})
    return out


@ray.remote(max_restarts=-1, max_task_retries=-1)
class SafetyActor(CheckpointedLoopActor):
    """Regime, paper P&L, halt and position multiplier of one asset (see the module docstring).

    Parameters
    ----------
    asset
        The asset.
    settings
        The whole configuration (``safety``, ``model.fee_bp``, ``controller``...).
    redis_url
        The Redis holding the prediction stream, the safety hash and the events.
    """

    def __init__(self, asset: str, settings: Settings, redis_url: str) -> None:
        self.asset = asset
        self.settings = settings
        self._fingerprint = settings_fingerprint(settings, redis_url)
        self.client = connect(redis_url, settings.redis.socket_timeout_s)
        self.registry = ModelRegistry(registry_root(settings))
        self.bars = BarStore(Path(settings.data_dir).resolve() / "bars", fsync=False)
        self.sink = EventSink(self.client, settings, f"safety-{asset}")
        self.metrics = LoopMetrics((mn.REGIME, mn.POSITION_MULTIPLIER))
        self.path = checkpoint_path(settings, f"safety-{asset}")
        self.last_error: str | None = None
        self.restored = False
        self._published: tuple[str, float, bool, int | None] | None = None
        self._lock = threading.RLock()
        state, err = load_checkpoint(self.path)
        if isinstance(state, SafetyActorState) and state.asset == asset:
            self.state = state
            self.restored = True
        else:
            if err or state is not None:
                self.last_error = err or "checkpoint of another kind: ignored"
            champion = self.registry.aliases(asset).get("champion")
            tracker = SafetyTracker(settings.safety, settings.model.fee_bp, champion)
            self.state = SafetyActorState(
                asset, stream_tail_id(self.client, settings.serve.prediction_stream), tracker)
            self._warm_start()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"safety:{asset}", daemon=True)
        self._thread.start()

    # -- start-up -------------------------------------------------------------------------------
    def _stored_bars(self, start_ns: int | None) -> pd.DataFrame:
        return self.bars.read(self.asset, start_ns=start_ns)

    def _warm_start(self) -> None:
        """Fill the volatility windows from the newest stored bars (fresh actor only)."""
        need = self.settings.safety.vol_long + 1
        recent = self._stored_bars(time.time_ns() - WARM_RECENT_DAYS * 86_400 * NS_PER_S)
        bars = recent if len(recent) >= need else self._stored_bars(None)
        bars = bars.iloc[-need:]
        if not len(bars):
            return
        status = self.state.tracker.warm(bars["ts"].to_numpy(), bars["close"].to_numpy())
        self._emit([{"type": "safety_warm_start", "bars": int(len(bars)),
                     "regime": status.regime, "ratio": status.ratio,
                     "multiplier": status.multiplier, "last_bar_ts": int(bars["ts"].iloc[-1])}])
        self._publish(status)

    # -- the loop ---------------------------------------------------------------------------------

    def _rollback(self) -> None:
        """A step failed half-way: back to the last checkpoint (its inputs are read again)."""
        with self._lock:
            state, _ = load_checkpoint(self.path)
            if isinstance(state, SafetyActorState) and state.asset == self.asset:
                self.state = state
                self._published = None

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
        self.client.hset(f"{HASH_PREFIX}{self.asset}",
                         mapping=safety_fields(status, self.state.tracker.champion, time.time_ns()))
        self._published = key
        self.metrics.set(mn.REGIME, mn.REGIME_CODES[status.regime], self.asset)
        self.metrics.set(mn.POSITION_MULTIPLIER, status.multiplier, self.asset)

    def _step(self) -> bool:
        """One pass; True when the prediction stream had more than one batch waiting."""
        c = self.settings.controller
        tracker = self.state.tracker
        with self._lock:
            self.sink.drain()
            raw: list[dict[str, Any]] = []
            champion = self.registry.aliases(self.asset).get("champion")
            if champion != tracker.champion:
                status = tracker.new_champion(champion, ts=tracker.last_done_ts)
                raw.extend(status.events)
            preds = read_entries(self.client, self.settings.serve.prediction_stream,
                                 self.state.predictions_id, c.stream_batch)
            forecasts = []
            for _eid, fields in preds:
                f, why = parse_prediction(fields)
                if f is None:
                    key = f"prediction_{why}"
                    self.state.rejected[key] = self.state.rejected.get(key, 0) + 1
                elif f.asset == self.asset:
                    forecasts.append(f)
            if preds:
                self.state.predictions_id = preds[-1][0]
            tracker.on_forecasts(forecasts)
            new = self._stored_bars(tracker.last_bar_ts + 1 if tracker.last_bar_ts >= 0 else None)
            if len(new):
                tracker.on_bars(new["ts"].to_numpy(), new["close"].to_numpy())
            statuses = tracker.step()
            for st in statuses:
                raw.extend(st.events)
            if raw:
                self._emit(raw)
            self._publish(tracker.status)
            if raw or preds or statuses:
                err = save_checkpoint(self.path, self.state)
                if err:
                    self.last_error = err
            return len(preds) >= c.stream_batch

    # -- messages ---------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Regime, multiplier, halt, P&L, counters, errors (JSON-ready)."""
        with self._lock:
            out = self.state.tracker.to_dict()
            out.update({"asset": self.asset, "predictions_id": self.state.predictions_id,
                        "stream_rejected": dict(self.state.rejected), "events": self.state.seq,
                        "restored": self.restored, "last_error": self.last_error,
                        "pid": os.getpid(), "event_writer": self.sink.stats()})
            return out

    def reset(self, reason: str = "requested") -> dict[str, Any]:
        """Start fresh paper accounts now (lifts a halt); the regime is kept."""
        with self._lock:
            tracker = self.state.tracker
            status = tracker.state.reset_pnl(reason, ts=tracker.last_done_ts)
            self._emit(list(status.events))
            self._publish(status)
            save_checkpoint(self.path, self.state)
        return self.status()

    def follow_champion(self, version: str | None) -> dict[str, Any]:
        """Start fresh paper accounts for ``version`` now if not already following it."""
        with self._lock:
            tracker = self.state.tracker
            if tracker.champion != version:
                status = tracker.new_champion(version, ts=tracker.last_done_ts)
                self._emit(list(status.events))
                self._publish(status)
                save_checkpoint(self.path, self.state)
        return self.status()


def get_or_create_safety_actor(asset: str, settings: Settings, redis_url: str,
                               timeout_s: float = 60.0) -> Any:
    """The safety actor of ``asset`` with this configuration (created if needed, detached)."""
    return get_or_create(SafetyActor, actor_name(asset), settings, redis_url,
                         (asset, settings, redis_url), timeout_s=timeout_s)


def kill_safety_actor(asset: str) -> bool:
    """Stop and remove the safety actor of ``asset``."""
    return kill_named(actor_name(asset))
