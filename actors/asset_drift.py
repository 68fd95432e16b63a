"""One asset's drift watch inside a market shard (no Ray of its own).

State it owns (:class:`DriftActorState`, checkpointed to ``<data_dir>/checkpoints/drift-<ASSET>.pkl``)
    A :class:`~tickcast.monitoring.loop_state.DriftTracker` around the champion's
    :class:`~tickcast.monitoring.drift.DriftMonitor`, built from the champion's registry entry:
    the reference feature sample (``reference.parquet``), a prediction reference (the champion
    scored, with the serving code, on that same sample: its median forecasts) and the
    validation pinball loss and MAE of its card. Plus the cursors of the two streams it reads,
    its event counter and whether the controller has been told about the current alert.

What it does, when its shard steps it (a new bar or prediction of the asset, or the sweep)
    Reads, in batches of ``controller.stream_batch`` entries, the features published at each
    bar close (``features_log:<ASSET>``) and the asset's logged predictions
    (``predictions:<ASSET>``, the champion's), and the closes of the bars their labels need
    (from the shard's memory, else the bar store); feeds them to the monitor incrementally.
    Publishes the drift score as a Ray gauge and the ``drift:<ASSET>`` hash, appends every level
    change, detector alarm and retrain flag to the events stream, and when the score reaches
    ``drift.retrain_score`` (or the level CRITICAL) tells the controller (``on_alert``, without
    waiting; retried until acknowledged).

How it recovers
    The shard loads the checkpoint and resumes both streams after the checkpointed ids. State
    and cursors are saved together after each step, so nothing is counted twice; events emitted
    between the last checkpoint and a crash are emitted again with the same ids (the event
    counter is part of the checkpoint) and readers drop the copies. A fresh one starts at the
    streams' current ends.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd
import ray
import redis

from actors.loop_support import (EventSink, LoopMetrics, checkpoint_path, decode_features,
                                 load_checkpoint, read_entries, read_forecasts, save_checkpoint,
                                 stream_tail_id)
from tickcast.config import Settings
from tickcast.monitoring import metrics_names as mn
from tickcast.monitoring.drift import DriftMonitor
from tickcast.monitoring.events import event_from
from tickcast.monitoring.loop_state import PREDICTION_COLUMNS, DriftTracker
from tickcast.ray_runtime import NAMESPACE
from tickcast.storage.online_store import LOG_PREFIX
from tickcast.streams import prediction_stream_key
from tickcast.ticks import NS_PER_S
from training.registry import ModelRegistry

log = logging.getLogger(__name__)

STATUS_PREFIX = "drift:"  # Redis hash drift:<ASSET>: level, score, retrain, champion, updated
CONTROLLER_NAME = "controller"

# Consensus bars of the asset in [start_ns, end_ns] (ts and close at least).
BarSource = Callable[[int, int], pd.DataFrame]


def _positive(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    v = float(value)
    return v if math.isfinite(v) and v > 0 else None


def build_tracker(settings: Settings, registry: ModelRegistry, asset: str, version: str,
                  loader: Any = None) -> DriftTracker:
    """A drift tracker for ``version`` of ``asset`` from its registry entry.

    ``loader`` (a :class:`serve_app.slots.ModelLoader`) shares model files across assets: a
    shard of many assets served by one model loads it once.

    Raises
    ------
    TickcastError
        Missing card, reference or model files (NotFound / RegistryError / InvalidInput).
    """
    from serve_app.slots import ModelLoader

    card = registry.card(asset, version)
    reference = registry.reference(asset, version)
    if loader is None:
        loader = ModelLoader(registry, native_min_rows=settings.model.native_min_rows)
    model = loader.load(asset, version)
    x = reference[list(model.feature_names)].to_numpy(np.float32)
    pred, lo, hi = model.score(x)
    preds = pd.DataFrame({PREDICTION_COLUMNS[0]: pred})
    metrics = card.get("metrics") or {}
    quantiles = tuple(float(q) for q in card.get("quantiles", settings.model.quantiles))
    monitor = DriftMonitor.from_frames(
        settings.drift, reference, list(model.feature_names), predictions=preds,
        validation_pinball=_positive(metrics.get("pinball")),
        validation_mae=_positive(metrics.get("mae")), quantiles=quantiles)
    horizon = int(card.get("horizon", settings.model.horizon))
    return DriftTracker(asset, version, monitor, horizon=horizon,
                        freq_ns=settings.bars.freq_s * NS_PER_S,
                        timeout_bars=settings.controller.label_timeout_bars)


@dataclass
class DriftActorState:
    """Everything a drift actor checkpoints."""

    asset: str
    features_id: str
    predictions_id: str
    tracker: DriftTracker | None = None
    seq: int = 0  # events emitted so far (ids are drift:<asset>:<seq>)
    notified: bool = False  # the controller acknowledged the current CRITICAL episode
    alert: dict[str, Any] | None = None  # evidence of the current CRITICAL episode
    rejected: dict[str, int] = field(default_factory=dict)  # malformed stream entries


class AssetDrift:
    """Drift of one asset's champion (see the module docstring).

    Parameters
    ----------
    asset
        The asset.
    settings
        The whole configuration (``drift``, ``controller``, ``serve.prediction_stream``...).
    client, registry, sink, metrics
        The shard's Redis client, model registry, event sink and Ray metrics.
    bars
        The asset's consensus bars in a range (the shard serves them from memory).
    loader
        The shard's model loader (shares model files across assets).
    """

    def __init__(self, asset: str, settings: Settings, client: redis.Redis,
                 registry: ModelRegistry, sink: EventSink, metrics: LoopMetrics,
                 bars: BarSource, loader: Any = None) -> None:
        self.asset = asset
        self.loader = loader
        self.settings = settings
        self.client = client
        self.registry = registry
        self.sink = sink
        self.metrics = metrics
        self.bars = bars
        self.features_key = f"{LOG_PREFIX}{asset}"
        self.predictions_key = prediction_stream_key(settings.serve.prediction_stream, asset)
        self.path = checkpoint_path(settings, f"drift-{asset}")
        self.last_error: str | None = None
        self.restored = False
        self._ack: Any = None  # ObjectRef of the controller's on_alert answer, not waited for
        state, err = load_checkpoint(self.path)
        if isinstance(state, DriftActorState) and state.asset == asset:
            self.state = state
            self.restored = True
        else:
            if err or state is not None:
                self.last_error = err or "checkpoint of another kind: ignored"
            self.state = DriftActorState(asset, stream_tail_id(client, self.features_key),
                                         stream_tail_id(client, self.predictions_key))
        self.steps = 0

    def rollback(self) -> None:
        """A step failed half-way: back to the last checkpoint (its inputs are read again)."""
        state, _ = load_checkpoint(self.path)
        if isinstance(state, DriftActorState) and state.asset == self.asset:
            self.state = state
        self._ack = None

    def checkpoint(self) -> None:
        """Persist state and cursors together."""
        err = save_checkpoint(self.path, self.state)
        if err:
            self.last_error = err

    def _emit(self, raw: list[dict[str, Any]], champion: str | None) -> None:
        events = []
        tracker = self.state.tracker
        bar_ts = tracker.last_feature_bar if tracker is not None else None
        for e in raw:
            self.state.seq += 1
            events.append(event_from("drift", self.asset, e, seq=self.state.seq, champion=champion,
                                     bar_ts=bar_ts))
        self.sink.emit(events)

    def _sync_champion(self, events: list[dict[str, Any]]) -> None:
        champion = self.registry.aliases(self.asset).get("champion")
        tracker = self.state.tracker
        current = tracker.champion if tracker is not None else None
        if champion == current:
            return
        self.state.tracker = None
        self.state.notified = False
        self.state.alert = None
        self._ack = None
        if champion is not None:
            self.state.tracker = build_tracker(self.settings, self.registry, self.asset, champion,
                                               self.loader)
        events.append({"type": "drift_reset", "from": current, "to": champion,
                       "reason": "champion changed"})

    def step(self) -> bool:
        """One pass over the inputs; True when a stream had more entries than one batch."""
        c = self.settings.controller
        raw: list[dict[str, Any]] = []
        self._sync_champion(raw)
        tracker = self.state.tracker
        feats = read_entries(self.client, self.features_key, self.state.features_id, c.stream_batch)
        rows = []
        for _eid, fields in feats:
            row = decode_features(fields)
            if row is None:
                rej = self.state.rejected
                rej["features_malformed"] = rej.get("features_malformed", 0) + 1
            else:
                rows.append(row)
        if feats:
            self.state.features_id = feats[-1][0]
        forecasts, preds = read_forecasts(self.client, self.predictions_key, self.asset,
                                          self.state.predictions_id, c.stream_batch,
                                          self.state.rejected)
        if preds:
            self.state.predictions_id = preds[-1][0]
        if tracker is not None:
            raw.extend(tracker.on_features(rows))
            raw.extend(tracker.on_forecasts(forecasts))
            needed = tracker.closes_needed()
            if needed is not None:
                bars = self.bars(needed[0], needed[1])
                if len(bars):
                    raw.extend(tracker.on_closes(bars["ts"].to_numpy(), bars["close"].to_numpy()))
            self._alert(tracker, raw)
            self.metrics.set(mn.DRIFT_SCORE, tracker.score, self.asset)
        changed = bool(raw or feats or preds)
        if tracker is not None and changed:
            # Published like safety:<ASSET>, for the serving app, the demo and operators.
            self.client.hset(f"{STATUS_PREFIX}{self.asset}", mapping={
                "level": tracker.level, "score": float(tracker.score),
                "retrain": int(bool(tracker.retrain)), "champion": tracker.champion or "",
                "updated": time.time_ns()})
        if raw:
            self._emit(raw, tracker.champion if tracker is not None else None)
        if changed:
            self.checkpoint()
        self.steps += 1
        return len(feats) >= c.stream_batch or len(preds) >= c.stream_batch

    def _alerting(self, tracker: DriftTracker) -> bool:
        """The SLA's rule: retrain above ``drift.retrain_score`` (CRITICAL always alerts)."""
        return tracker.level == "CRITICAL" or tracker.score >= self.settings.drift.retrain_score

    def _alert(self, tracker: DriftTracker, raw: list[dict[str, Any]]) -> None:
        """Tell the controller about an alert episode, once, without blocking the shard."""
        if not self._alerting(tracker):
            self.state.notified = False
            self.state.alert = None
            self._ack = None
            return
        if self.state.alert is None:
            self.state.alert = {"asset": self.asset, "champion": tracker.champion,
                                "score": tracker.score, "retrain": tracker.retrain,
                                "level": tracker.level,
                                "bar_ts": tracker.last_feature_bar, "raised_ns": time.time_ns(),
                                **{k: v for k, v in tracker.status().items()
                                   if k in ("feature_score", "prediction_score",
                                            "performance_score", "drifted_features")}}
            raw.append({"type": "drift_alert", **self.state.alert})
        if self.state.notified:
            return
        if self._ack is not None:
            ready, _ = ray.wait([self._ack], timeout=0)
            if not ready:
                return  # the controller is still answering
            try:
                self.state.notified = bool(ray.get(self._ack))
            except Exception as exc:  # noqa: BLE001 - controller died: ask again below
                log.info("%s: on_alert failed: %s", self.asset, exc)
            self._ack = None
            if self.state.notified:
                return
        try:
            handle = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
        except ValueError:
            return  # no controller (yet): retried on the next step
        self._ack = handle.on_alert.remote(self.asset, dict(self.state.alert))

    # -- queries ----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Level, score, retrain flag, counters, cursors, errors (JSON-ready)."""
        tr = self.state.tracker
        out: dict[str, Any] = tr.status() if tr is not None else {
            "asset": self.asset, "champion": None, "level": "NORMAL", "score": 0.0,
            "retrain": False}
        out.update({"notified": self.state.notified, "alert": self.state.alert,
                    "features_id": self.state.features_id,
                    "predictions_id": self.state.predictions_id,
                    "stream_rejected": dict(self.state.rejected), "events": self.state.seq,
                    "steps": self.steps, "restored": self.restored,
                    "last_error": self.last_error})
        return out

    def report(self) -> dict[str, Any] | None:
        """The monitor's latest full report (per-feature KS, PSI, W1...), None before one."""
        tr = self.state.tracker
        rep = tr.monitor.report if tr is not None else None
        return None if rep is None else rep.to_dict()

    def reset(self, reason: str = "requested") -> dict[str, Any]:
        """Rebuild the monitor for the registry's current champion (a fresh window)."""
        old = self.state.tracker.champion if self.state.tracker is not None else None
        self.state.tracker = None
        raw: list[dict[str, Any]] = []
        self._sync_champion(raw)
        for e in raw:
            e["reason"] = reason
            e["from"] = old
        self._emit(raw, self.state.tracker.champion if self.state.tracker else None)
        self.checkpoint()
        return self.status()

    def follow_champion(self, version: str | None) -> dict[str, Any]:
        """Switch to ``version`` now if not already on it (the controller's notification)."""
        tr = self.state.tracker
        if (tr.champion if tr is not None else None) != version:
            raw: list[dict[str, Any]] = []
            self._sync_champion(raw)
            self._emit(raw, self.state.tracker.champion if self.state.tracker else None)
            self.checkpoint()
        return self.status()


__all__ = ["AssetDrift", "DriftActorState", "build_tracker"]
