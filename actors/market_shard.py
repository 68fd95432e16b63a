"""Market shard actors: one process owns many assets, each asset's whole state.

A node follows hundreds to thousands of assets, and each is small work (a bar a minute, a few
ticks a second), so assets are partitioned over a few shards (default one per CPU of the
cluster; :mod:`tickcast.shards` maps assets to shards by rendezvous hashing) instead of
costing a process per asset and role. Design notes: ``docs/shards.md``.

State it owns, per asset of its partition (every piece a pure object, checkpointed per asset)
    :class:`~actors.asset_ingest.AssetIngest` (validation, dedup, consensus, bars, gaps,
    features; ``checkpoints/<ASSET>.pkl``), and with the closed loop on
    :class:`~actors.asset_drift.AssetDrift` (``drift-<ASSET>.pkl``) and
    :class:`~actors.asset_safety.AssetSafety` (``safety-<ASSET>.pkl``). Shared by its assets:
    the Redis client, the write-ahead logs and breakers, the event sink, the Ray metrics.

What it does, in one consumer thread
    A blocking ``XREAD`` over all its assets' ``ticks:<ASSET>`` streams (and, with the closed
    loop, their ``predictions:<ASSET>`` streams, as wake-ups), so an idle shard sleeps in Redis.
    Each asset's entries are processed as a batch by its :class:`AssetIngest`; an asset that
    emitted bars or received predictions then has its drift and safety stepped. A sweep every
    ``shards.monitor_sweep_s`` steps the rest (a champion changed in the registry). A failure
    rolls back that asset alone to its checkpoint.

Messages it answers
    Per asset (first argument the asset): ``status``, ``wait_until``, ``flush``,
    ``wait_settled``, ``gaps``, ``tick_statuses``, ``recent_bars``, ``drift_status``,
    ``drift_report``, ``drift_reset``, ``safety_status``, ``safety_reset``,
    ``follow_champion``. For the shard: ``shard_status``, ``assets``, ``pid``, ``node_id``,
    ``fingerprint``, ``stop``. :class:`AssetRef` gives callers a per-asset handle.

How it recovers
    Ray restarts it after any death (``max_restarts=-1``), on any node (shards are spread over
    the nodes; the data dir is shared storage on a cluster). ``__init__`` loads every asset's
    checkpoints and resumes each stream after its own entry id, so an asset's guarantees do not
    depend on which shard holds it: moving an asset is stopping its old owner (which
    checkpoints) and letting the new one load the same files.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import ray
import redis

from actors.asset_drift import AssetDrift
from actors.asset_ingest import AssetIngest, ShardWriters
from actors.asset_safety import AssetSafety
from actors.asset_state import AssetState, StepOutput
from actors.feeder import SENT_FIELD, parse_entry_id
from actors.loop_support import EventSink, LoopMetrics, kill_named, settings_fingerprint
from tickcast.config import Settings
from tickcast.errors import InvalidInput
from tickcast.monitoring import metrics_names as mn
from tickcast.ray_runtime import NAMESPACE
from tickcast.redis_server import connect
from tickcast.shards import SHARD_PREFIX, partition, shard_count
from tickcast.streams import SHARD_MAP_KEY, prediction_stream_key
from training.registry import ModelRegistry, registry_root

log = logging.getLogger(__name__)

# Longest blocking read: what an idle shard costs is one XREAD per this long.
BLOCK_MS = 1000
BAR_DELAYS_KEPT = 20_000


class IngestMetrics:
    """Ray metrics of ingestion (names: :mod:`tickcast.monitoring.metrics_names`), one set per
    shard, tagged by asset.

    Counters restart from zero with a shard incarnation (Prometheus handles counter resets);
    the durable counters are the checkpointed ones in ``status``.
    """

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Gauge

        def spec(name: str) -> dict[str, Any]:
            m = mn.METRICS[name]
            return {"name": m.name, "description": m.description, "tag_keys": m.tag_keys}

        self.ticks = Counter(**spec(mn.TICKS_TOTAL))
        self.rejected = Counter(**spec(mn.TICKS_REJECTED_TOTAL))
        self.outliers = Counter(**spec(mn.OUTLIERS_TOTAL))
        self.duplicates = Counter(**spec(mn.DUPLICATES_TOTAL))
        self.confidence = Gauge(**spec(mn.CONSENSUS_CONFIDENCE_BP))
        self.agreement = Gauge(**spec(mn.PROVIDER_AGREEMENT))
        self.gap_minutes = Gauge(**spec(mn.GAP_MINUTES))
        self.reliability = Gauge(**spec(mn.PROVIDER_RELIABILITY))
        self.excluded = Gauge(**spec(mn.PROVIDER_EXCLUDED))

    def record(self, asset: str, out: StepOutput, state: AssetState) -> None:
        """Export one step's counters; monitoring must never stop ingestion."""
        try:
            self._record(asset, out, state)
        except Exception as exc:  # noqa: BLE001
            log.warning("%s: metrics not recorded: %s", asset, exc)

    def _record(self, asset: str, out: StepOutput, state: AssetState) -> None:
        t = {mn.ASSET: asset}
        c = out.counts
        by_status = {"accepted": c.ticks_accepted, "rejected": sum(c.rejected.values()),
                     "duplicate": c.duplicates, "outlier": sum(c.outliers.values()),
                     "late": c.late, "frozen": c.frozen}
        for status, n in by_status.items():
            if n:
                self.ticks.inc(n, {**t, mn.STATUS: status})
        for reason, n in c.rejected.items():
            if n:
                self.rejected.inc(n, {**t, mn.REASON: reason})
        for provider, n in c.outliers.items():
            if n:
                self.outliers.inc(n, {**t, mn.PROVIDER: provider})
        if c.duplicates:
            self.duplicates.inc(c.duplicates, t)
        if np.isfinite(out.confidence):
            self.confidence.set(out.confidence, t)
        if np.isfinite(out.agreement):
            self.agreement.set(out.agreement, t)
        if state.gap_minutes is not None:
            self.gap_minutes.set(state.gap_minutes, t)

    def record_providers(self, asset: str, reliability: dict[str, float],
                         excluded: tuple[str, ...]) -> None:
        """Export each provider's reliability and whether the consensus leaves it out."""
        try:
            for provider, value in reliability.items():
                tags = {mn.ASSET: asset, mn.PROVIDER: provider}
                self.reliability.set(float(value), tags)
                self.excluded.set(1.0 if provider in excluded else 0.0, tags)
        except Exception as exc:  # noqa: BLE001
            log.warning("%s: provider metrics not recorded: %s", asset, exc)


@dataclass
class AssetDesk:
    """Everything one shard holds for one asset."""

    ingest: AssetIngest
    drift: AssetDrift | None = None
    safety: AssetSafety | None = None
    predictions_seen: str = "0-0"  # wake-up cursor on predictions:<ASSET> (not checkpointed)


def providers_of(state: AssetState) -> tuple[dict[str, float], tuple[str, ...]]:
    """(reliability by provider, providers excluded) of an asset's consensus book."""
    book = state.pipeline.book
    return book.reliability, book.excluded()


@ray.remote(max_restarts=-1, max_task_retries=-1)
class MarketShard:
    """The assets of one partition: ingestion, drift and safety (see the module docstring).

    Parameters
    ----------
    name
        The shard's Ray name (``shard:<i>``); names its write-ahead logs and breakers.
    assets
        The assets it owns.
    settings
        The whole configuration (``data_dir`` must be shared by all nodes on a cluster).
    redis_url
        The Redis of the streams, the online features and the events.
    closed_loop
        Also run each asset's drift and safety.
    """

    def __init__(self, name: str, assets: tuple[str, ...], settings: Settings, redis_url: str,
                 closed_loop: bool) -> None:
        self.name = name
        self.settings = settings
        self.closed_loop = closed_loop
        self._fingerprint = shard_fingerprint(settings, redis_url, assets, closed_loop)
        self.client = connect(redis_url, settings.redis.socket_timeout_s)
        self.writers = ShardWriters(settings, self.client, name)
        self.metrics = IngestMetrics()
        self.registry = ModelRegistry(registry_root(settings))
        from serve_app.slots import ModelLoader  # noqa: PLC0415 - the serving plane's loader

        self.loader = ModelLoader(self.registry, native_min_rows=settings.model.native_min_rows)
        tag = name.replace(":", "-")
        self.sink = EventSink(self.client, settings, tag)
        self.loop_metrics = LoopMetrics((mn.DRIFT_SCORE, mn.REGIME, mn.POSITION_MULTIPLIER))
        self._lock = threading.RLock()
        self._progress = threading.Condition(self._lock)
        self._stop = threading.Event()
        self.started_ns = time.time_ns()
        self.read_errors = 0
        self.loop_errors = 0
        self.last_error: str | None = None
        self.desks: dict[str, AssetDesk] = {}
        t0 = time.perf_counter()
        for asset in assets:
            self.desks[asset] = self._new_desk(asset)
        self.load_s = time.perf_counter() - t0
        self._pending_features: set[str] = {a for a, d in self.desks.items()
                                            if d.ingest.state.features_pending}
        self._uncheckpointed: set[str] = set()
        # Seconds from the arrival in Redis of the entry that closed a bar (the watermark passed
        # the bar's end then) to the bar's emission; the newest per shard.
        self.bar_delays: deque[float] = deque(maxlen=BAR_DELAYS_KEPT)
        self._next_sweep = time.monotonic()
        # The closed loop runs on a thread of its own, under its own lock: ingestion never
        # waits for a drift or safety step (a tracker build, a bar-store read).
        self._loop_lock = threading.RLock()
        self._woken: set[str] = set()
        self._wake = threading.Condition(threading.Lock())
        self._thread = threading.Thread(target=self._consume, name=f"consume:{name}", daemon=True)
        self._thread.start()
        self._loop_thread: threading.Thread | None = None
        if closed_loop:
            self._loop_thread = threading.Thread(target=self._run_loop, name=f"loop:{name}",
                                                 daemon=True)
            self._loop_thread.start()

    def _new_desk(self, asset: str) -> AssetDesk:
        ingest = AssetIngest(asset, self.settings, self.client, self.writers)
        desk = AssetDesk(ingest)
        if self.closed_loop:
            def after(after_ts: int, ing: AssetIngest = ingest) -> pd.DataFrame:
                with self._lock:  # the ingest side owns the recent bars: read them briefly
                    return ing.bars_after(after_ts)

            def between(start_ns: int, end_ns: int) -> pd.DataFrame:
                bars = after(start_ns - 1)
                return bars.loc[bars["ts"].to_numpy() <= end_ns] if len(bars) else bars

            desk.drift = AssetDrift(asset, self.settings, self.client, self.registry, self.sink,
                                    self.loop_metrics, between, self.loader)
            desk.safety = AssetSafety(asset, self.settings, self.client, self.registry, self.sink,
                                      self.loop_metrics, after)
            desk.predictions_seen = min(desk.drift.state.predictions_id,
                                        desk.safety.state.predictions_id,
                                        key=parse_entry_id)
        return desk

    # -- the consumer loop -------------------------------------------------------------------------
    def _streams(self) -> dict[str, str]:
        streams = {d.ingest.stream: d.ingest.state.last_id for d in self.desks.values()}
        if self.closed_loop:
            prefix = self.settings.serve.prediction_stream
            streams.update({prediction_stream_key(prefix, a): d.predictions_seen
                            for a, d in self.desks.items()})
        return streams

    def _consume(self) -> None:
        cfg = self.settings.ingest
        backoff = cfg.read_retry_initial_s
        by_stream = {d.ingest.stream: a for a, d in self.desks.items()}
        pred_prefix = f"{self.settings.serve.prediction_stream}:"
        while not self._stop.is_set():
            self._drain_writers()
            # With feature work queued, poll without blocking so the streams keep priority.
            block = None if self._pending_features else min(BLOCK_MS, cfg.consumer_block_ms * 5)
            try:
                reply: Any = self.client.xread(self._streams(),  # type: ignore[arg-type]
                                               count=cfg.consumer_count, block=block)
            except (redis.RedisError, OSError) as exc:
                self.read_errors += 1
                self.last_error = f"XREAD: {type(exc).__name__}: {exc}"
                self._catch_up_features()  # useful work meanwhile
                self._stop.wait(backoff)
                backoff = min(backoff * 2, cfg.read_retry_max_s)
                continue
            backoff = cfg.read_retry_initial_s
            ticks: dict[str, list[tuple[str, dict[bytes, bytes]]]] = {}
            woke: set[str] = set()
            for raw_key, items in reply or ():
                key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
                if not items:
                    continue
                entries: list[tuple[str, dict[bytes, bytes]]] = [
                    (eid.decode() if isinstance(eid, bytes) else str(eid), fields)
                    for eid, fields in items]
                asset = by_stream.get(key)
                if asset is not None:
                    ticks[asset] = entries
                elif key.startswith(pred_prefix):
                    asset = key[len(pred_prefix):]
                    if asset in self.desks:
                        self.desks[asset].predictions_seen = entries[-1][0]
                        woke.add(asset)
            if ticks:
                woke |= self._ingest(ticks)
            elif not woke:
                self._catch_up_features()
            self._checkpoint_due()
            if self.closed_loop and woke:
                with self._wake:
                    self._woken |= woke
                    self._wake.notify()

    def _ingest(self, ticks: dict[str, list[tuple[str, dict[bytes, bytes]]]]) -> set[str]:
        """Process each asset's entries; returns the assets that emitted consensus bars."""
        emitted: set[str] = set()
        recorded: list[tuple[str, list[StepOutput], AssetState]] = []
        for asset, entries in ticks.items():
            # The lock is taken per asset, so queries (status, waits) interleave with a reply
            # that holds hundreds of assets.
            with self._lock:
                ingest = self.desks[asset].ingest
                try:
                    outs = ingest.handle(entries, self._stop)
                except Exception as exc:  # noqa: BLE001 - a defect, not bad input: roll back
                    ingest.recover_from(exc)
                    self.loop_errors += 1
                    continue
                if ingest.state.features_pending:
                    self._pending_features.add(asset)
                if ingest._since_checkpoint:
                    self._uncheckpointed.add(asset)
                if any(len(o.consensus) for o in outs):
                    emitted.add(asset)
                    sent = entries[-1][1].get(SENT_FIELD.encode())
                    if sent is not None:
                        self.bar_delays.append(max(0.0, (time.time_ns() - int(sent)) / 1e9))
                recorded.append((asset, outs, ingest.state))
                self._progress.notify_all()
        for asset, outs, state in recorded:
            for out in outs:
                self.metrics.record(asset, out, state)
            if asset in emitted:
                self.metrics.record_providers(asset, *providers_of(state))
        return emitted

    def _catch_up_features(self) -> None:
        """Idle time: feed deferred bars to the online features, a chunk per asset."""
        if not self._pending_features:
            return
        chunk = self.settings.ingest.features_catchup_chunk
        with self._lock:
            for asset in list(self._pending_features):
                ingest = self.desks[asset].ingest
                try:
                    ingest.catch_up_features(chunk)
                except Exception as exc:  # noqa: BLE001
                    ingest.recover_from(exc)
                if not ingest.state.features_pending:
                    self._pending_features.discard(asset)
            self._progress.notify_all()

    def _checkpoint_due(self) -> None:
        """Checkpoint (and trim) assets whose interval passed, even without new entries."""
        if not self._uncheckpointed:
            return
        with self._lock:
            for asset in list(self._uncheckpointed):
                ingest = self.desks[asset].ingest
                ingest.maybe_checkpoint()
                if not ingest._since_checkpoint:
                    self._uncheckpointed.discard(asset)

    def _run_loop(self) -> None:
        """The closed-loop thread: sleep until an asset has news or the sweep is due."""
        while not self._stop.is_set():
            with self._wake:
                wait = max(0.0, self._next_sweep - time.monotonic())
                if not self._woken:
                    self._wake.wait(timeout=min(wait, BLOCK_MS / 1000))
                woke, self._woken = self._woken, set()
            if self._stop.is_set():
                break
            try:
                self._step_monitors(woke)
            except Exception as exc:  # noqa: BLE001 - a defect: keep the loop alive, say why
                self.last_error = f"closed loop: {type(exc).__name__}: {exc}"
                log.exception("%s: closed-loop pass failed", self.name)
                self._stop.wait(1.0)

    def _step_monitors(self, woke: set[str]) -> None:
        """Step drift and safety of the assets with news, and of all on the sweep."""
        now = time.monotonic()
        if now >= self._next_sweep:
            woke = set(self.desks)
            self._next_sweep = now + self.settings.shards.monitor_sweep_s
        for asset in woke:
            desk = self.desks[asset]
            for monitor in (desk.drift, desk.safety):
                if monitor is None or self._stop.is_set():
                    continue
                with self._loop_lock:
                    try:
                        more = True
                        while more and not self._stop.is_set():
                            more = monitor.step()
                    except Exception as exc:  # noqa: BLE001 - Redis down, unreadable files
                        monitor.last_error = f"{type(exc).__name__}: {exc}"
                        log.warning("%s %s: %s", type(monitor).__name__, asset, monitor.last_error)
                        monitor.rollback()
        self.sink.drain()

    def _drain_writers(self) -> None:
        if self.writers.pending and self.writers.drain():
            with self._progress:
                self._progress.notify_all()

    # -- per-asset messages -------------------------------------------------------------------------
    def _desk(self, asset: str) -> AssetDesk:
        try:
            return self.desks[asset]
        except KeyError:
            raise KeyError(f"{asset} is not owned by {self.name}") from None

    def status(self, asset: str) -> dict[str, Any]:
        """Counters, progress, writer/breaker health, pid and node of one asset (JSON-ready)."""
        with self._lock:
            st = self._desk(asset).ingest.status()
            reliability, excluded = providers_of(self._desk(asset).ingest.state)
        st.update({
            "shard": self.name, "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "read_errors": self.read_errors,
            "provider_reliability": reliability, "providers_excluded": list(excluded),
            "store_writer": self.writers.store.stats(), "redis_writer": self.writers.redis.stats(),
        })
        if st.get("last_error") is None and self.last_error:
            st["last_error"] = self.last_error
        return st

    def wait_until(self, asset: str, entry_id: str, timeout_s: float) -> dict[str, Any]:
        """Block until ``asset``'s entry ``entry_id`` is consumed (or ``timeout_s`` passes).

        Returns :meth:`status` plus ``reached`` (bool).
        """
        ingest = self._desk(asset).ingest
        with self._progress:
            reached = self._progress.wait_for(lambda: ingest.reached(entry_id),
                                              timeout=max(0.0, timeout_s))
        return {**self.status(asset), "reached": bool(reached)}

    def flush(self, asset: str) -> dict[str, Any]:
        """Close every open bar of ``asset``, judge its remaining gaps, write, checkpoint.

        Idempotent: a second flush has nothing left to close. Returns :meth:`status`.
        """
        with self._lock:
            ingest = self._desk(asset).ingest
            out = ingest.flush()
            self._uncheckpointed.discard(asset)
            if ingest.state.features_pending:
                self._pending_features.add(asset)  # the closed bars still feed the features
        self.metrics.record(asset, out, ingest.state)
        self._drain_writers()
        return self.status(asset)

    def wait_settled(self, asset: str, timeout_s: float) -> dict[str, Any]:
        """Block until ``asset`` owes nothing: features caught up, write-ahead logs empty.

        Returns :meth:`status` plus ``reached`` (bool).
        """
        ingest = self._desk(asset).ingest
        with self._progress:
            reached = self._progress.wait_for(
                lambda: ingest.settled() and self.writers.pending == 0, timeout=max(0.0, timeout_s))
        return {**self.status(asset), "reached": bool(reached)}

    def gaps(self, asset: str) -> pd.DataFrame:
        """The stored gap audit of ``asset``."""
        return self.writers.stores.gaps.read(self._desk(asset).ingest.asset)

    def tick_statuses(self, asset: str) -> dict[str, np.ndarray]:
        """Audit mode: provider, seq and status of every tick of ``asset``."""
        with self._lock:
            return self._desk(asset).ingest.tick_statuses()

    def recent_bars(self, asset: str, after_ts: int = -1) -> pd.DataFrame:
        """Consensus bars of ``asset`` written with ``ts > after_ts``, by ts."""
        with self._lock:
            return self._desk(asset).ingest.recent_bars(after_ts)

    def _monitor(self, asset: str, role: str) -> Any:
        desk = self._desk(asset)
        monitor = desk.drift if role == "drift" else desk.safety
        if monitor is None:
            raise RuntimeError(f"{self.name} runs without the closed loop (no {role} for {asset})")
        return monitor

    def drift_status(self, asset: str) -> dict[str, Any]:
        """Drift level, score and counters of ``asset``."""
        with self._loop_lock:
            return {**self._monitor(asset, "drift").status(), "pid": os.getpid(),
                    "event_writer": self.sink.stats()}

    def drift_report(self, asset: str) -> dict[str, Any] | None:
        """The drift monitor's latest full report of ``asset``."""
        with self._loop_lock:
            return self._monitor(asset, "drift").report()

    def drift_reset(self, asset: str, reason: str = "requested") -> dict[str, Any]:
        """A fresh drift window for ``asset``'s current champion."""
        with self._loop_lock:
            return self._monitor(asset, "drift").reset(reason)

    def safety_status(self, asset: str) -> dict[str, Any]:
        """Regime, multiplier, halt and P&L of ``asset``."""
        with self._loop_lock:
            return {**self._monitor(asset, "safety").status(), "pid": os.getpid(),
                    "event_writer": self.sink.stats()}

    def safety_reset(self, asset: str, reason: str = "requested") -> dict[str, Any]:
        """Fresh paper accounts for ``asset`` (lifts a halt)."""
        with self._loop_lock:
            return self._monitor(asset, "safety").reset(reason)

    def follow_champion(self, asset: str, version: str | None) -> dict[str, Any]:
        """The controller's notice of a promotion or rollback of ``asset``."""
        with self._loop_lock:
            desk = self._desk(asset)
            out: dict[str, Any] = {}
            if desk.drift is not None:
                out["drift"] = desk.drift.follow_champion(version)
            if desk.safety is not None:
                out["safety"] = desk.safety.follow_champion(version)
            return out

    # -- shard messages ---------------------------------------------------------------------------
    def shard_status(self) -> dict[str, Any]:
        """The shard's assets, process, load time and health (JSON-ready)."""
        with self._lock:
            failing = {a: d.ingest.failure for a, d in self.desks.items() if d.ingest.failure}
            states = [d.ingest.state for d in self.desks.values()]
            return {"shard": self.name, "assets": list(self.desks), "pid": os.getpid(),
                    "node_id": ray.get_runtime_context().get_node_id(),
                    "closed_loop": self.closed_loop, "load_s": round(self.load_s, 3),
                    "ticks_in": int(sum(st.counts.ticks_in for st in states)),
                    "bars": int(sum(st.counts.bars for st in states)),
                    "assets_with_bars": int(sum(st.last_bar_ts is not None for st in states)),
                    "started_ns": self.started_ns, "read_errors": self.read_errors,
                    "loop_errors": self.loop_errors, "failing": failing,
                    "features_pending": len(self._pending_features),
                    "bar_delay_s": _quantiles(self.bar_delays),
                    "last_error": self.last_error,
                    "store_writer": self.writers.store.stats(),
                    "redis_writer": self.writers.redis.stats(),
                    "event_writer": self.sink.stats()}

    def assets(self) -> list[str]:
        """The assets this shard owns."""
        return list(self.desks)

    def pid(self) -> int:
        """OS process id of this incarnation (fault tests SIGKILL it)."""
        return os.getpid()

    def node_id(self) -> str:
        """Ray node this incarnation runs on."""
        return ray.get_runtime_context().get_node_id()

    def fingerprint(self) -> str:
        """Configuration identity (see :func:`shard_fingerprint`)."""
        return self._fingerprint

    def stop(self) -> bool:
        """Stop consuming and checkpoint every asset (before a planned kill or a move)."""
        self._stop.set()
        with self._wake:
            self._wake.notify()
        self._thread.join(timeout=10)
        if self._loop_thread is not None:
            self._loop_thread.join(timeout=10)
        ok = True
        with self._lock:
            for desk in self.desks.values():
                ok = desk.ingest.checkpoint() and ok
        with self._loop_lock:
            for desk in self.desks.values():
                for monitor in (desk.drift, desk.safety):
                    if monitor is not None:
                        monitor.checkpoint()
        return ok


def _quantiles(values: deque[float]) -> dict[str, float | int]:
    """Count, p50, p99 and max of the recent values (JSON-ready)."""
    if not values:
        return {"n": 0}
    arr = np.fromiter(values, float)
    return {"n": int(arr.size), "p50": round(float(np.quantile(arr, 0.5)), 4),
            "p99": round(float(np.quantile(arr, 0.99)), 4), "max": round(float(arr.max()), 4)}


# ---------------------------------------------------------------------------------- placement
def shard_fingerprint(settings: Settings, redis_url: str, assets: tuple[str, ...],
                      closed_loop: bool) -> str:
    """Identity of a shard: configuration, Redis, its assets and whether it runs the loop."""
    return settings_fingerprint(settings, f"{redis_url}|{','.join(assets)}|{int(closed_loop)}")


def cluster_cpus() -> float:
    """CPUs of the Ray cluster this process is attached to."""
    return float(ray.cluster_resources().get("CPU", 1.0))


def placement(index: int) -> Any:
    """Where shard ``index`` goes: spread over the alive nodes with CPUs, round robin.

    Pinned *softly* (``NodeAffinitySchedulingStrategy(soft=True)``): if that node dies, Ray
    restarts the shard on any other node, from its assets' checkpoints. On one node, ``SPREAD``.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = sorted(n["NodeID"] for n in ray.nodes()
                   if n.get("Alive") and float(n.get("Resources", {}).get("CPU", 0)) > 0)
    if len(nodes) < 2:
        return "SPREAD"
    return NodeAffinitySchedulingStrategy(node_id=nodes[index % len(nodes)], soft=True)


class _Method:
    def __init__(self, handle: Any, name: str, asset: str | None) -> None:
        self._handle, self._name, self._asset = handle, name, asset

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        method = getattr(self._handle, self._name)
        if self._asset is None:
            return method.remote(*args, **kwargs)
        return method.remote(self._asset, *args, **kwargs)


class AssetRef:
    """A per-asset view of the shard that owns the asset: ``ref.status.remote()`` calls
    ``shard.status.remote(asset)``; with ``role="drift"`` or ``"safety"``, ``ref.status``
    calls ``shard.drift_status`` (and so on for ``report`` and ``reset``).

    Shard-level messages (``pid``, ``node_id``, ``fingerprint``, ``stop``) go to the shard as
    they are: SIGKILLing ``ref.pid`` kills the shard with all its assets.
    """

    SHARD_LEVEL = frozenset({"pid", "node_id", "fingerprint", "stop", "shard_status", "assets"})

    def __init__(self, shard: Any, asset: str, name: str, role: str | None = None) -> None:
        self.shard = shard
        self.asset = asset
        self.shard_name = name
        self.role = role

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self.SHARD_LEVEL:
            return _Method(self.shard, name, None)
        if self.role is not None and name != "follow_champion":
            return _Method(self.shard, f"{self.role}_{name}", self.asset)
        return _Method(self.shard, name, self.asset)


@dataclass(frozen=True)
class ShardSet:
    """The running shards and which asset each owns."""

    handles: dict[str, Any]  # shard name -> actor handle
    owners: dict[str, str]  # asset -> shard name

    def ref(self, asset: str, role: str | None = None) -> AssetRef:
        """Per-asset handle of ``asset`` (``role``: None, ``"drift"`` or ``"safety"``)."""
        name = self.owners[asset]
        return AssetRef(self.handles[name], asset, name, role)

    def refs(self, assets: tuple[str, ...] | list[str] | None = None) -> dict[str, AssetRef]:
        """``asset -> AssetRef`` for ``assets`` (default: all)."""
        return {a: self.ref(a) for a in (assets if assets is not None else self.owners)}


def get_or_create_shards(settings: Settings, redis_url: str, assets: tuple[str, ...] | None = None,
                         *, closed_loop: bool = False, timeout_s: float | None = None) -> ShardSet:
    """The live shards for ``assets`` (default ``settings.assets``), creating them if needed.

    Shards are detached: they outlive the driver that created them (an ingest command, a Ray
    job) and keep consuming; a private local Ray instance takes them down when it ends. A shard
    of that name with another configuration, asset set or loop setting is stopped (it
    checkpoints every asset) and replaced. Shards are created concurrently, then waited for.
    The mapping is published to the Redis hash ``tickcast:shards`` (asset -> shard).
    """
    assets = tuple(dict.fromkeys(assets if assets is not None else settings.assets))
    unknown = [a for a in assets if a not in settings.assets]
    if unknown:
        raise InvalidInput(f"assets not in the configuration: {', '.join(unknown)} "
                           f"(configured: {', '.join(settings.assets)})", field="assets")
    n = shard_count(settings.shards.count, cluster_cpus())
    # A shard that would own nothing is not started (a process costs; an empty one buys nothing).
    parts = {name: owned for name, owned in partition(assets, n).items() if owned}
    timeout = timeout_s if timeout_s is not None else settings.shards.start_timeout_s
    deadline = time.monotonic() + timeout
    # Shards of an earlier, larger partition (shard:n and up) give their assets back first.
    for info in ray.util.list_named_actors(all_namespaces=True):
        name = info.get("name", "")
        if info.get("namespace") == NAMESPACE and name.startswith(SHARD_PREFIX) and name not in parts:
            kill_named(name)
    pending: dict[str, Any] = {}
    handles: dict[str, Any] = {}
    for index, (name, owned) in enumerate(parts.items()):
        want = shard_fingerprint(settings, redis_url, owned, closed_loop)
        handle = _existing(name, want, deadline)
        if handle is None:
            handle = MarketShard.options(  # type: ignore[attr-defined]
                name=name, namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
                max_concurrency=settings.shards.max_concurrency,
                scheduling_strategy=placement(index),
            ).remote(name, owned, settings, redis_url, closed_loop)
        handles[name] = handle
        pending[name] = handle.fingerprint.remote()
    for name, ref in pending.items():
        left = max(1.0, deadline - time.monotonic())
        try:
            ray.get(ref, timeout=left)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"market shard {name} did not start within {timeout:.0f}s") from None
    owners = {a: name for name, owned in parts.items() for a in owned}
    _publish_map(settings, redis_url, owners)
    return ShardSet(handles, owners)


def _existing(name: str, fingerprint: str, deadline: float) -> Any:
    """The live shard ``name`` if it runs with ``fingerprint``; else stop it and return None."""
    while True:
        try:
            handle = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return None
        current: str | None
        try:
            current = str(ray.get(handle.fingerprint.remote(), timeout=max(1.0, deadline - time.monotonic())))
        except Exception:  # noqa: BLE001 - dying: replace it
            current = None
        if current == fingerprint:
            return handle
        kill_named(name)
        # The name is released asynchronously: wait until it is free.
        while time.monotonic() < deadline:
            try:
                ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:
                return None
            time.sleep(0.1)
        raise TimeoutError(f"market shard {name} could not be replaced in time")


def _publish_map(settings: Settings, redis_url: str, owners: dict[str, str]) -> None:
    """Write ``tickcast:shards`` (asset -> shard), replacing the previous mapping."""
    client = connect(redis_url, settings.redis.socket_timeout_s)
    try:
        pipe = client.pipeline(transaction=True)
        pipe.delete(SHARD_MAP_KEY)
        if owners:
            pipe.hset(SHARD_MAP_KEY, mapping=dict(owners))  # type: ignore[arg-type]
        pipe.execute()
    except redis.RedisError as exc:  # the map is a view; the shards run without it
        log.warning("shard map not published: %s", exc)
    finally:
        client.close()


def find_shards(settings: Settings, redis_url: str | None = None) -> ShardSet | None:
    """The running shards (from Ray's named actors), or None when none runs."""
    handles: dict[str, Any] = {}
    for info in ray.util.list_named_actors(all_namespaces=True):
        name = info.get("name", "")
        if info.get("namespace") == NAMESPACE and name.startswith(SHARD_PREFIX):
            try:
                handles[name] = ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:
                continue
    if not handles:
        return None
    owned = ray.get([h.assets.remote() for h in handles.values()], timeout=30)
    owners = {a: name for name, assets in zip(handles, owned) for a in assets}
    return ShardSet(handles, owners)


def shard_for(asset: str, client: redis.Redis | None = None) -> AssetRef | None:
    """The per-asset handle of ``asset``'s live shard (None when no shard owns it).

    With a Redis client the published map (``tickcast:shards``) answers in one lookup; without
    one (or when it names no live shard), the shards are asked.
    """
    if client is not None:
        try:
            raw = client.hget(SHARD_MAP_KEY, asset)
        except redis.RedisError:
            raw = None
        if raw is not None:
            name = raw.decode() if isinstance(raw, bytes) else str(raw)
            try:
                return AssetRef(ray.get_actor(name, namespace=NAMESPACE), asset, name)
            except ValueError:
                pass
    for info in ray.util.list_named_actors(all_namespaces=True):
        name = info.get("name", "")
        if info.get("namespace") != NAMESPACE or not name.startswith(SHARD_PREFIX):
            continue
        try:
            handle = ray.get_actor(name, namespace=NAMESPACE)
            if asset in ray.get(handle.assets.remote(), timeout=10):
                return AssetRef(handle, asset, name)
        except Exception:  # noqa: BLE001 - restarting or gone
            continue
    return None


def kill_shards() -> int:
    """Stop (checkpointing every asset) and remove every market shard; how many there were."""
    n = 0
    for info in ray.util.list_named_actors(all_namespaces=True):
        name = info.get("name", "")
        if info.get("namespace") == NAMESPACE and name.startswith(SHARD_PREFIX):
            n += int(kill_named(name))
    return n
