"""The per-asset actor: one named, restartable Ray actor per asset.

State it owns (all recoverable, see :class:`actors.asset_state.AssetState`)
    the market pipeline (validation, dedup, consensus, bars), the online features, the
    cumulative counters, the id of the last stream entry consumed and the gap bookkeeping.

Messages it answers
    ``status()``, ``wait_until(entry_id, timeout_s)``, ``flush()``, ``wait_settled(timeout_s)``,
    ``gaps()``, ``pid()``,
    ``node_id()``, ``tick_statuses()`` (audit mode), ``recent_bars(after_ts)``, ``fingerprint()``,
    ``stop()``.

What it does, in a background thread
    ``XREAD`` its stream ``ticks:<ASSET>`` (one entry = one tick batch), decode each entry,
    advance the state, then make the step's writes durable: consensus and provider bars to the
    bar store (idempotent upserts), late ticks to the late store, gap audit rows, the newest
    feature row to the online store (Redis). Every external write goes through a circuit breaker
    and falls back to a write-ahead log while the breaker is open (``GuardedWriter``); the logs
    are replayed in order when it closes. Then it checkpoints (atomic file
    ``<data_dir>/checkpoints/<ASSET>.pkl``) and trims the stream below the checkpointed entry
    (``XTRIM MINID``): ticks leave Redis only once the bars covering them are stored.

How it recovers
    Ray restarts it after any death (``max_restarts=-1``), on any node (actors are spread
    over the nodes, see :func:`placement_strategy`; the data dir is shared storage on a
    cluster). ``__init__`` loads the checkpoint and resumes
    ``XREAD`` after its entry id: entries after it are processed again, which rewrites the
    same bars (the pipeline is deterministic and upserts are idempotent), so no tick is lost and
    no bar doubled. Redis read errors are retried with exponential backoff, never fatal.
    Calls in flight when it died are retried by Ray (``max_task_retries=-1``; every message is
    idempotent).
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import threading
import time
import traceback
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
import redis

from actors.asset_state import AssetState, StepOutput, TickStatusLog
from actors.feeder import parse_entry_id, stream_key
from tickcast.config import Settings
from tickcast.features.definitions import schema_hash
from tickcast.monitoring import metrics_names as mn
from tickcast.ray_runtime import NAMESPACE
from tickcast.redis_server import connect
from tickcast.sources.stream import decode_entry
from tickcast.storage.bar_store import CONSENSUS, BarStore, GapAuditStore, LateTickStore
from tickcast.storage.breaker import CircuitBreaker
from tickcast.storage.online_store import OnlineFeatureStore
from tickcast.storage.wal import GuardedWriter, WriteAheadLog
from tickcast.ticks import TickBatch

log = logging.getLogger(__name__)

ACTOR_PREFIX = "asset:"
RECENT_BARS = 2048  # consensus bars kept in memory for `recent_bars` (live views, the demo)


def actor_name(asset: str) -> str:
    """Ray name of an asset's actor (``asset:BTC-USD``), in namespace ``tickcast``."""
    return f"{ACTOR_PREFIX}{asset}"


def settings_fingerprint(settings: Settings, redis_url: str) -> str:
    """Identity of an actor's configuration: a live actor with another one is replaced."""
    blob = settings.model_dump_json() + "|" + redis_url
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class _Metrics:
    """Ray metrics of one asset (names: :mod:`tickcast.monitoring.metrics_names`).

    Exported by every Ray node to Prometheus and shown on the Ray dashboard. Counters restart
    from zero with an actor incarnation (Prometheus handles counter resets); the durable
    counters are the checkpointed ones in :meth:`AssetActor.status`.
    """

    def __init__(self, asset: str) -> None:
        from ray.util.metrics import Counter, Gauge

        def spec(name: str) -> dict[str, Any]:
            m = mn.METRICS[name]
            return {"name": m.name, "description": m.description, "tag_keys": m.tag_keys}

        self.tags = {mn.ASSET: asset}
        self.ticks = Counter(**spec(mn.TICKS_TOTAL))
        self.rejected = Counter(**spec(mn.TICKS_REJECTED_TOTAL))
        self.outliers = Counter(**spec(mn.OUTLIERS_TOTAL))
        self.duplicates = Counter(**spec(mn.DUPLICATES_TOTAL))
        self.confidence = Gauge(**spec(mn.CONSENSUS_CONFIDENCE_BP))
        self.agreement = Gauge(**spec(mn.PROVIDER_AGREEMENT))
        self.gap_minutes = Gauge(**spec(mn.GAP_MINUTES))

    def record(self, out: StepOutput, state: AssetState) -> None:
        """Export one step's counters; monitoring must never stop ingestion."""
        try:
            self._record(out, state)
        except Exception as exc:
            log.warning("%s: metrics not recorded: %s", self.tags[mn.ASSET], exc)

    def _record(self, out: StepOutput, state: AssetState) -> None:
        t = self.tags
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


class _StoreWrites:
    """The bar/gap/late stores as one idempotent ``write(payload)`` for a GuardedWriter."""

    def __init__(self, data_dir: Path) -> None:
        self.bars = BarStore(data_dir / "bars")
        self.gaps = GapAuditStore(data_dir / "gaps")
        self.late = LateTickStore(data_dir / "late")

    def __call__(self, payload: bytes) -> None:
        kind, asset, data = pickle.loads(payload)
        if kind == "consensus":
            self.bars.upsert(asset, CONSENSUS, data)
        elif kind == "provider":
            self.bars.upsert_providers(asset, data)
        elif kind == "late":
            self.late.append(data)
        elif kind == "audit":
            self.gaps.upsert(asset, data)
        else:
            raise ValueError(f"unknown store write {kind!r}")


class _RedisWrites:
    """Online-feature publication as an idempotent ``write(payload)`` (HSET + capped log)."""

    def __init__(self, client: redis.Redis) -> None:
        self.store = OnlineFeatureStore(client)

    def __call__(self, payload: bytes) -> None:
        # A write-ahead log written before the close was published holds 5-tuples.
        asset, bar_ts, schema, names, values, *rest = pickle.loads(payload)
        self.store.write(asset, bar_ts, schema, names, values, close=rest[0] if rest else None)


@ray.remote(max_restarts=-1, max_task_retries=-1)
class AssetActor:
    """One asset's ingestion: consumes ``ticks:<ASSET>``, stores bars, publishes features.

    Parameters
    ----------
    asset
        The asset id.
    settings
        The whole configuration (``data_dir`` must be shared by all nodes on a cluster).
    redis_url
        The Redis holding the ingress stream and the online features.
    """

    def __init__(self, asset: str, settings: Settings, redis_url: str) -> None:
        self.asset = asset
        self.settings = settings
        self.redis_url = redis_url
        self._fingerprint = settings_fingerprint(settings, redis_url)
        self.data_dir = Path(settings.data_dir).resolve()
        self.stream = stream_key(settings, asset)
        self.client = connect(redis_url, settings.redis.socket_timeout_s)

        wal_dir = self.data_dir / "wal"
        self._stores = _StoreWrites(self.data_dir)
        self.store_writer = GuardedWriter(
            CircuitBreaker(settings.breaker, f"store:{asset}"),
            WriteAheadLog(wal_dir / f"{asset}.store.wal"), self._stores)
        self.redis_writer = GuardedWriter(
            CircuitBreaker(settings.breaker, f"redis:{asset}"),
            WriteAheadLog(wal_dir / f"{asset}.redis.wal"), _RedisWrites(self.client))
        self.trim_breaker = CircuitBreaker(settings.breaker, f"redis-trim:{asset}")
        self.schema = schema_hash(settings.features)

        self.checkpoint_path = self.data_dir / "checkpoints" / f"{asset}.pkl"
        self._last_error: str | None = None
        self.state, self.restored = self._load_checkpoint()
        self._apply_audit_mode()
        self._names = tuple(self.state.features.names)
        self._lock = threading.RLock()
        self._progress = threading.Condition(self._lock)
        self._recent: deque[dict[str, Any]] = deque(maxlen=RECENT_BARS)
        self._since_checkpoint = 0
        self._unwritten: list[StepOutput] = []
        self._read_errors = 0
        self._failures = 0
        self._failure: str | None = None  # the last processing failure, until a step succeeds
        self._metrics = _Metrics(asset)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._consume, name=f"consume:{asset}", daemon=True)
        self._thread.start()

    # -- recovery ---------------------------------------------------------------------------------
    def _load_checkpoint(self) -> tuple[AssetState, bool]:
        try:
            blob = self.checkpoint_path.read_bytes()
        except FileNotFoundError:
            return AssetState(self.asset, self.settings), False
        try:
            state = pickle.loads(blob)
            if not isinstance(state, AssetState) or state.asset != self.asset:
                raise TypeError(f"holds {type(state).__name__} of another asset")
        except Exception as exc:
            # Checkpoints are replaced atomically, so this is a foreign or incompatible file.
            # Crash-looping would help nobody: start over from what the stream still holds
            # (bars already stored stay; upserts make any overlap harmless) and say so.
            self._last_error = f"unusable checkpoint {self.checkpoint_path}: {exc}"
            log.error("%s: %s", self.asset, self._last_error)
            return AssetState(self.asset, self.settings), False
        return state, True

    def _apply_audit_mode(self) -> None:
        """Audit mode follows the current configuration, whatever the checkpoint was taken with."""
        if self.settings.ingest.keep_tick_status and self.state.status_log is None:
            self.state.status_log = TickStatusLog()
        elif not self.settings.ingest.keep_tick_status:
            self.state.status_log = None

    def _checkpoint(self) -> bool:
        """Atomically persist the state; True when it reached the disk."""
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint_path.with_name(f".{self.checkpoint_path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                pickle.dump(self.state, f, protocol=pickle.HIGHEST_PROTOCOL)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.checkpoint_path)
        except OSError as exc:
            # Without a checkpoint the stream is simply not trimmed: a restart replays more.
            self._last_error = f"checkpoint failed: {exc}"
            log.warning("%s: %s", self.asset, self._last_error)
            tmp.unlink(missing_ok=True)
            return False
        self._since_checkpoint = 0
        return True

    # -- the consumer loop -------------------------------------------------------------------------
    def _consume(self) -> None:
        cfg = self.settings.ingest
        backoff = cfg.read_retry_initial_s
        while not self._stop.is_set():
            self._drain_writers()
            # With feature work queued, poll without blocking so the stream keeps priority.
            block = None if self.state.features_pending else cfg.consumer_block_ms
            try:
                reply = self.client.xread({self.stream: self.state.last_id},
                                          count=cfg.consumer_count, block=block)
            except (redis.RedisError, OSError) as exc:
                self._read_errors += 1
                self._last_error = f"XREAD: {type(exc).__name__}: {exc}"
                self._catch_up_features(cfg.features_catchup_chunk)  # useful work meanwhile
                self._stop.wait(backoff)
                backoff = min(backoff * 2, cfg.read_retry_max_s)
                continue
            backoff = cfg.read_retry_initial_s
            entries = [(eid.decode() if isinstance(eid, bytes) else eid, fields)
                       for _stream, items in (reply or ()) for eid, fields in items]
            try:
                if entries:
                    self._handle(entries)
                else:
                    self._catch_up_features(cfg.features_catchup_chunk)
            except Exception as exc:  # a defect, not bad input (decoding never raises)
                self._recover_from(exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, cfg.read_retry_max_s)
                continue
            self._failure = None

    def _recover_from(self, exc: Exception) -> None:
        """A step raised: roll back to the last checkpoint and retry, loudly.

        The state may be half-updated, so it is reloaded from the checkpoint and the entries
        after it are read again. A failure that repeats stalls this asset visibly (``status()``
        reports it and the ingest driver stops with it) instead of skipping ticks silently.
        """
        with self._lock:
            self._failures += 1
            self._failure = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            log.error("%s: processing failed (%d), rolling back to the checkpoint:\n%s",
                      self.asset, self._failures, traceback.format_exc())
            self._unwritten = []
            self.state, _ = self._load_checkpoint()
            self._apply_audit_mode()
            self._progress.notify_all()

    def _handle(self, entries: list[tuple[str, dict[bytes, bytes]]]) -> None:
        """Process a group of entries one by one, then persist, publish and checkpoint once.

        Entries are processed singly (batch boundaries are the producer's, so a replay after a
        crash repeats exactly the same steps); their writes are grouped to pay one round of
        store writes, one checkpoint and one trim per XREAD reply instead of per entry.
        """
        outs: list[StepOutput] = []
        with self._lock:
            for entry_id, fields in entries:
                if self._stop.is_set():
                    break
                out = self.state.step(decode_entry(fields, asset=self.asset), self._alternates)
                self._unwritten.append(out)
                outs.append(out)
                self.state.last_id = entry_id
                self._since_checkpoint += 1
            self._write_unwritten()
            self._publish(self.state.feed_features(self.settings.ingest.features_bars_per_batch))
            if self._since_checkpoint >= self.settings.ingest.checkpoint_every_batches:
                if self._checkpoint():
                    self._trim(self.state.last_id)
            self._progress.notify_all()
        for out in outs:
            self._metrics.record(out, self.state)

    def _catch_up_features(self, max_bars: int) -> None:
        """Idle time: feed deferred bars to the online features and publish the newest row."""
        if not self.state.features_pending:
            return
        with self._lock:
            self._publish(self.state.feed_features(max_bars))
            if not self.state.features_pending:
                self._checkpoint()
            self._progress.notify_all()

    def _write_unwritten(self) -> None:
        """Make the buffered steps' writes durable (store or WAL), in a fixed order."""
        outs, self._unwritten = self._unwritten, []
        if not outs:
            return
        consensus = [o.consensus for o in outs if len(o.consensus)]
        if consensus:
            # Later emissions of a bar come later in the frame; the store keeps the last one.
            frame = pd.concat(consensus, ignore_index=True)
            self.store_writer.write(pickle.dumps(("consensus", self.asset, frame)))
            self._recent.extend(frame.iloc[-RECENT_BARS:].to_dict("records"))
        provider = [o.provider for o in outs if len(o.provider)]
        if provider:
            frame = pd.concat(provider, ignore_index=True)
            self.store_writer.write(pickle.dumps(("provider", self.asset, frame)))
        late = [o.late for o in outs if len(o.late)]
        if late:
            self.store_writer.write(pickle.dumps(("late", self.asset, TickBatch.concat(late))))
        audit = [o.audit for o in outs if len(o.audit)]
        if audit:
            frame = pd.concat(audit, ignore_index=True)
            self.store_writer.write(pickle.dumps(("audit", self.asset, frame)))

    def _publish(self, features: tuple[int, np.ndarray] | None) -> None:
        """Publish the newest feature row (Redis, behind the breaker and the WAL)."""
        if features is None:
            return
        bar_ts, row = features
        # The bar's close goes with its row: it is the reference price of the predictions
        # made from it, and every serving replica would otherwise read it from the bar store.
        close = self.state.features.last_close
        self.redis_writer.write(pickle.dumps(
            (self.asset, bar_ts, self.schema, list(self._names), np.asarray(row, np.float64), close)))

    def _alternates(self, start_ns: int, end_ns: int) -> dict[str, pd.DataFrame]:
        """Other providers' stored bars for a gap (buffered writes go to the store first)."""
        self._write_unwritten()
        store = self._stores.bars
        return {p: store.read(self.asset, p, start_ns, end_ns + 1) for p in store.providers(self.asset)}

    def _trim(self, entry_id: str) -> None:
        """Drop the stream entries up to the checkpointed one, included (best effort).

        The stream then holds only entries not yet consumed, so whoever reads it from the
        start (a new actor without a checkpoint) reads exactly the ticks still owed.
        """
        ms, seq = parse_entry_id(entry_id)
        try:
            self.trim_breaker.call(self.client.xtrim, self.stream, minid=f"{ms}-{seq + 1}",
                                   approximate=False)
        except Exception as exc:  # Redis down or breaker open: the next checkpoint trims
            self._last_error = f"XTRIM: {type(exc).__name__}: {exc}"

    def _drain_writers(self) -> None:
        """Replay queued writes (in order, through the breakers) once their target answers."""
        drained = 0
        for writer in (self.store_writer, self.redis_writer):
            if writer.pending:
                drained += writer.drain()
        if drained:
            with self._progress:
                self._progress.notify_all()

    # -- messages -----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Counters, progress, writer/breaker health, pid and node (JSON-ready)."""
        with self._lock:
            st = self.state.status()
        st.update({
            "stream": self.stream,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "restored": self.restored,
            "read_errors": self._read_errors,
            "failures": self._failures,
            "failure": self._failure,
            "last_error": self._last_error,
            "store_writer": self.store_writer.stats(),
            "redis_writer": self.redis_writer.stats(),
        })
        return st

    def wait_until(self, entry_id: str, timeout_s: float) -> dict[str, Any]:
        """Block until the entry ``entry_id`` is consumed (or ``timeout_s`` passes).

        Returns :meth:`status` plus ``reached`` (bool).
        """
        target = parse_entry_id(entry_id)
        with self._progress:
            reached = self._progress.wait_for(
                lambda: parse_entry_id(self.state.last_id) >= target, timeout=max(0.0, timeout_s))
        return {**self.status(), "reached": bool(reached)}

    def flush(self) -> dict[str, Any]:
        """Close every open bar, judge the remaining gaps, write, checkpoint (end of a replay).

        Idempotent: a second flush has nothing left to close. Returns :meth:`status`.
        """
        with self._lock:
            out = self.state.flush(self._alternates)
            self._unwritten.append(out)
            self._write_unwritten()
            self._checkpoint()
        self._metrics.record(out, self.state)
        self._drain_writers()
        return self.status()

    def wait_settled(self, timeout_s: float) -> dict[str, Any]:
        """Block until nothing is owed: features caught up, write-ahead logs empty.

        While the actor is behind its stream it stores bars first and defers the feature
        updates (:meth:`AssetState.feed_features`); while the store or Redis is unavailable its
        writes wait in write-ahead logs. This waits for both to drain. Returns :meth:`status`
        plus ``reached`` (bool).
        """
        def settled() -> bool:
            return (self.state.features_pending == 0 and self.store_writer.pending == 0
                    and self.redis_writer.pending == 0)

        with self._progress:
            reached = self._progress.wait_for(settled, timeout=max(0.0, timeout_s))
        return {**self.status(), "reached": bool(reached)}

    def gaps(self) -> pd.DataFrame:
        """The stored gap audit of this asset."""
        return self._stores.gaps.read(self.asset)

    def pid(self) -> int:
        """OS process id of this incarnation (fault tests SIGKILL it)."""
        return os.getpid()

    def node_id(self) -> str:
        """Ray node this incarnation runs on."""
        return ray.get_runtime_context().get_node_id()

    def fingerprint(self) -> str:
        """Configuration identity (see :func:`settings_fingerprint`)."""
        return self._fingerprint

    def tick_statuses(self) -> dict[str, np.ndarray]:
        """Audit mode (``ingest.keep_tick_status``): provider, seq and status of every tick.

        Raises
        ------
        RuntimeError
            Audit mode is off.
        """
        with self._lock:
            if self.state.status_log is None:
                raise RuntimeError("tick statuses are kept only with ingest.keep_tick_status=true")
            return self.state.status_log.arrays()

    def recent_bars(self, after_ts: int = -1) -> pd.DataFrame:
        """Consensus bars written (new, amended or imputed) with ``ts > after_ts``, by ts."""
        with self._lock:
            rows = [r for r in self._recent if int(r["ts"]) > after_ts]
        frame = pd.DataFrame.from_records(rows)
        return frame.sort_values("ts", kind="stable").reset_index(drop=True) if len(frame) else frame

    def stop(self) -> bool:
        """Stop consuming (before a planned kill); state is checkpointed."""
        self._stop.set()
        self._thread.join(timeout=10)
        with self._lock:
            return self._checkpoint()


def get_or_create_asset_actor(asset: str, settings: Settings, redis_url: str, *,
                              timeout_s: float = 60.0) -> Any:
    """The live actor of ``asset`` with this configuration, creating it if needed.

    Actors are detached: they outlive the driver that created them (an ingest command, a Ray
    job) and keep consuming their stream; a private local Ray instance takes them down when it
    ends. An actor of that name running with another configuration (another data dir or Redis,
    e.g. a previous test) is stopped and replaced. Placement: see :func:`placement_strategy`.
    """
    name = actor_name(asset)
    fingerprint = settings_fingerprint(settings, redis_url)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            try:  # the common case: it exists (its placement is left as it is)
                handle = ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:
                handle = AssetActor.options(
                    name=name, namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
                    max_concurrency=settings.ingest.actor_max_concurrency,
                    scheduling_strategy=placement_strategy(exclude=asset),
                ).remote(asset, settings, redis_url)
            if ray.get(handle.fingerprint.remote(), timeout=timeout_s) == fingerprint:
                return handle
            kill_asset_actor(asset)
        except ValueError:
            pass  # the name is still held by an actor being killed: retry below
        if time.monotonic() > deadline:
            raise TimeoutError(f"could not create actor {name} within {timeout_s:.0f}s")
        time.sleep(0.2)


def placement_strategy(exclude: str | None = None) -> Any:
    """Where a new asset actor goes: the alive node hosting the fewest asset actors.

    Ray's ``SPREAD`` strategy is best effort: an actor holds no CPU once placed, so SPREAD
    readily stacks every asset actor on one node. On a cluster of several schedulable nodes we
    therefore pick the node with the fewest asset actors ourselves and pin the actor there
    *softly* (``NodeAffinitySchedulingStrategy(soft=True)``): if that node dies, the restarted
    actor goes to any other node. On a single node (or when the count fails) it is ``SPREAD``.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n["NodeID"] for n in ray.nodes()
             if n.get("Alive") and float(n.get("Resources", {}).get("CPU", 0)) > 0]
    if len(nodes) < 2:
        return "SPREAD"
    load = dict.fromkeys(nodes, 0)
    for info in ray.util.list_named_actors(all_namespaces=True):
        name = info.get("name", "")
        if info.get("namespace") != NAMESPACE or not name.startswith(ACTOR_PREFIX) or \
                name == actor_name(exclude or ""):
            continue
        try:
            node = ray.get(ray.get_actor(name, namespace=NAMESPACE).node_id.remote(), timeout=5)
        except Exception:  # restarting or gone: it does not count
            continue
        if node in load:
            load[node] += 1
    target = min(nodes, key=lambda n: (load[n], nodes.index(n)))
    return NodeAffinitySchedulingStrategy(node_id=target, soft=True)


def kill_asset_actor(asset: str) -> bool:
    """Stop and remove the actor of ``asset`` for good (no restart). False if there was none."""
    try:
        handle = ray.get_actor(actor_name(asset), namespace=NAMESPACE)
    except ValueError:
        return False
    try:
        ray.get(handle.stop.remote(), timeout=30)
    except Exception:  # already dying or unreachable: the kill below is what matters
        pass
    ray.kill(handle, no_restart=True)
    return True

