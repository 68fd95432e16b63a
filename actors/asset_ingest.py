"""One asset's ingestion inside a market shard: state, durable writes, checkpoint (no Ray).

State it owns
    :class:`~actors.asset_state.AssetState` (pipeline, online features, counters, the id of
    the last stream entry consumed, gap bookkeeping), checkpointed alone to
    ``<data_dir>/checkpoints/<ASSET>.pkl``; the consensus bars it emitted lately (live views,
    the closed loop's bar source).

What it does
    :meth:`AssetIngest.handle` advances the state over a group of ``ticks:<ASSET>`` entries and
    makes the step's writes durable through the shard's :class:`ShardWriters`: consensus and
    provider bars to the bar store (idempotent upserts), late ticks, gap audit rows, the newest
    feature row to the online store. Every write goes through a circuit breaker and falls back
    to the shard's write-ahead log while the breaker is open. Then it checkpoints (at most every
    ``shards.checkpoint_every_s``) and trims the stream below the checkpointed entry: ticks leave
    Redis only once the bars covering them are stored.

How it recovers
    A new instance (the shard restarted, or the asset moved to another shard) loads the
    checkpoint and resumes after its entry id: entries after it are processed again, which
    rewrites the same bars (the pipeline is deterministic and upserts are idempotent), so no
    tick is lost and no bar doubled. A step that raises rolls the asset back to its checkpoint
    (:meth:`AssetIngest.recover_from`); the other assets of the shard are untouched.
"""

from __future__ import annotations

import logging
import pickle
import time
import traceback
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import redis

from actors.asset_state import AssetState, StepOutput, TickStatusLog
from actors.feeder import parse_entry_id, stream_key
from actors.loop_support import load_checkpoint, save_checkpoint
from tickcast.config import Settings
from tickcast.features.definitions import schema_hash
from tickcast.market.calendar import trading_calendar
from tickcast.sources.stream import decode_entry
from tickcast.storage.bar_store import CONSENSUS, BarStore, GapAuditStore, LateTickStore
from tickcast.storage.breaker import CircuitBreaker
from tickcast.storage.online_store import OnlineFeatureStore
from tickcast.storage.wal import GuardedWriter, WriteAheadLog
from tickcast.ticks import TickBatch

log = logging.getLogger(__name__)

RECENT_BARS = 2048  # consensus bars kept in memory (live views, the closed loop)


class StoreWrites:
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


class RedisWrites:
    """Online-feature publication as an idempotent ``write(payload)`` (hash + capped log)."""

    def __init__(self, client: redis.Redis) -> None:
        self.store = OnlineFeatureStore(client)

    def __call__(self, payload: bytes) -> None:
        # A write-ahead log written before the close was published holds 5-tuples.
        asset, bar_ts, schema, names, values, *rest = pickle.loads(payload)
        self.store.write(asset, bar_ts, schema, names, values, close=rest[0] if rest else None)


class ShardWriters:
    """The durable write paths one shard shares among its assets.

    One write-ahead log per target and shard (not per asset: a thousand assets would hold two
    thousand open files); each payload names its asset, and replay keeps the order of writes.
    """

    def __init__(self, settings: Settings, client: redis.Redis, name: str) -> None:
        data_dir = Path(settings.data_dir).resolve()
        wal_dir = data_dir / "wal"
        tag = name.replace(":", "-")
        self.stores = StoreWrites(data_dir)
        self.store = GuardedWriter(CircuitBreaker(settings.breaker, f"store:{name}"),
                                   WriteAheadLog(wal_dir / f"{tag}.store.wal"), self.stores)
        self.redis = GuardedWriter(CircuitBreaker(settings.breaker, f"redis:{name}"),
                                   WriteAheadLog(wal_dir / f"{tag}.redis.wal"), RedisWrites(client))
        self.trim_breaker = CircuitBreaker(settings.breaker, f"redis-trim:{name}")

    @property
    def pending(self) -> int:
        """Writes waiting in the write-ahead logs."""
        return self.store.pending + self.redis.pending

    def drain(self) -> int:
        """Replay queued writes (in order, through the breakers) once their target answers."""
        drained = 0
        for writer in (self.store, self.redis):
            if writer.pending:
                drained += writer.drain()
        return drained


class AssetIngest:
    """One asset's ingestion state and its durable effects (see the module docstring).

    Parameters
    ----------
    asset
        The asset id.
    settings
        The whole configuration.
    client
        The shard's Redis client (stream reads are the shard's; this trims).
    writers
        The shard's durable write paths.
    """

    def __init__(self, asset: str, settings: Settings, client: redis.Redis,
                 writers: ShardWriters) -> None:
        self.asset = asset
        self.settings = settings
        self.client = client
        self.writers = writers
        self.stream = stream_key(settings, asset)
        self.schema = schema_hash(settings.features)
        data_dir = Path(settings.data_dir).resolve()
        self.checkpoint_path = data_dir / "checkpoints" / f"{asset}.pkl"
        self.last_error: str | None = None
        self.state, self.restored = self._load()
        self._apply_audit_mode()
        self._names = tuple(self.state.features.names)
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_BARS)
        self._unwritten: list[StepOutput] = []
        self._since_checkpoint = 0
        self._checkpointed_at = time.monotonic()
        self.failures = 0
        self.failure: str | None = None  # the last processing failure, until a step succeeds

    # -- recovery ---------------------------------------------------------------------------------
    def _load(self) -> tuple[AssetState, bool]:
        state, err = load_checkpoint(self.checkpoint_path)
        if state is None and err is None:
            return AssetState(self.asset, self.settings), False
        if err is None and not (isinstance(state, AssetState) and state.asset == self.asset):
            err = f"checkpoint {self.checkpoint_path} holds {type(state).__name__} of another asset"
        if err is not None:
            # Checkpoints are replaced atomically, so this is a foreign or incompatible file.
            # Crash-looping would help nobody: start over from what the stream still holds
            # (bars already stored stay; upserts make any overlap harmless) and say so.
            self.last_error = err
            log.error("%s: %s", self.asset, err)
            return AssetState(self.asset, self.settings), False
        return state, True

    def _apply_audit_mode(self) -> None:
        """Audit mode and the trading calendar follow the current configuration, whatever the
        checkpoint was taken with."""
        self.state.calendar = trading_calendar(self.settings, self.asset)
        if self.settings.ingest.keep_tick_status and self.state.status_log is None:
            self.state.status_log = TickStatusLog()
        elif not self.settings.ingest.keep_tick_status:
            self.state.status_log = None

    def checkpoint(self) -> bool:
        """Atomically persist the state; True when it reached the disk."""
        err = save_checkpoint(self.checkpoint_path, self.state)
        if err:
            # Without a checkpoint the stream is simply not trimmed: a restart replays more.
            self.last_error = err
            log.warning("%s: %s", self.asset, err)
            return False
        self._since_checkpoint = 0
        self._checkpointed_at = time.monotonic()
        return True

    def recover_from(self, exc: Exception) -> None:
        """A step raised: roll back to the last checkpoint; the entries after it are read again.

        A failure that repeats stalls this asset visibly (``status()`` reports it and the ingest
        driver stops with it) instead of skipping ticks silently.
        """
        self.failures += 1
        self.failure = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        log.error("%s: processing failed (%d), rolling back to the checkpoint:\n%s",
                  self.asset, self.failures, traceback.format_exc())
        self._unwritten = []
        self.state, _ = self._load()
        self._apply_audit_mode()

    # -- the step -------------------------------------------------------------------------------
    def handle(self, entries: list[tuple[str, dict[bytes, bytes]]],
               stop: Any = None) -> list[StepOutput]:
        """Process a group of entries one by one, then persist, publish and checkpoint once.

        Entries are processed singly (batch boundaries are the producer's, so a replay after a
        crash repeats exactly the same steps); their writes are grouped to pay one round of
        store writes and at most one checkpoint and trim per group.
        """
        outs: list[StepOutput] = []
        for entry_id, fields in entries:
            if stop is not None and stop.is_set():
                break
            out = self.state.step(decode_entry(fields, asset=self.asset),  # type: ignore[arg-type]
                                  self._alternates)
            self._unwritten.append(out)
            outs.append(out)
            self.state.last_id = entry_id
            self._since_checkpoint += 1
        self._write_unwritten()
        self._publish(self.state.feed_features(self.settings.ingest.features_bars_per_batch))
        self.maybe_checkpoint()
        self.failure = None
        return outs

    def maybe_checkpoint(self, force: bool = False) -> bool:
        """Checkpoint and trim when enough entries and time have passed (or ``force``)."""
        if self._since_checkpoint == 0:
            return False
        # A quiet live asset checkpoints every few tens of seconds; one catching up on a
        # backlog does so every half backlog, so its stream is trimmed before producers that
        # wait on the backlog stall.
        due = (self._since_checkpoint >= self.settings.ingest.checkpoint_every_batches
               and (time.monotonic() - self._checkpointed_at >= self.settings.shards.checkpoint_every_s
                    or self._since_checkpoint >= max(1, self.settings.ingest.max_backlog_entries // 2)))
        if not (due or force):
            return False
        if self.checkpoint():
            self._trim(self.state.last_id)
            return True
        return False

    def catch_up_features(self, max_bars: int) -> bool:
        """Idle time: feed deferred bars to the online features; True if any was fed."""
        if not self.state.features_pending:
            return False
        self._publish(self.state.feed_features(max_bars))
        if not self.state.features_pending:
            self.maybe_checkpoint(force=True)
        return True

    def flush(self) -> StepOutput:
        """Close every open bar, judge the remaining gaps, write, checkpoint (end of a replay)."""
        out = self.state.flush(self._alternates)
        self._unwritten.append(out)
        self._write_unwritten()
        self._since_checkpoint = max(1, self._since_checkpoint)
        self.maybe_checkpoint(force=True)
        return out

    def _write_unwritten(self) -> None:
        """Make the buffered steps' writes durable (store or WAL), in a fixed order."""
        outs, self._unwritten = self._unwritten, []
        if not outs:
            return
        store = self.writers.store
        consensus = [o.consensus for o in outs if len(o.consensus)]
        if consensus:
            # Later emissions of a bar come later in the frame; the store keeps the last one.
            frame = pd.concat(consensus, ignore_index=True)
            store.write(pickle.dumps(("consensus", self.asset, frame)))
            self.recent.extend(frame.iloc[-RECENT_BARS:].to_dict("records"))
        provider = [o.provider for o in outs if len(o.provider)]
        if provider:
            store.write(pickle.dumps(("provider", self.asset, pd.concat(provider, ignore_index=True))))
        late = [o.late for o in outs if len(o.late)]
        if late:
            store.write(pickle.dumps(("late", self.asset, TickBatch.concat(late))))
        audit = [o.audit for o in outs if len(o.audit)]
        if audit:
            store.write(pickle.dumps(("audit", self.asset, pd.concat(audit, ignore_index=True))))

    def _publish(self, features: tuple[int, np.ndarray] | None) -> None:
        """Publish the newest feature row (Redis, behind the breaker and the WAL)."""
        if features is None:
            return
        bar_ts, row = features
        # The bar's close goes with its row: it is the reference price of the predictions
        # made from it, and every serving replica would otherwise read it from the bar store.
        close = self.state.features.last_close
        self.writers.redis.write(pickle.dumps(
            (self.asset, bar_ts, self.schema, list(self._names), np.asarray(row, np.float64), close)))

    def _alternates(self, start_ns: int, end_ns: int) -> dict[str, pd.DataFrame]:
        """Other providers' stored bars for a gap (buffered writes go to the store first)."""
        self._write_unwritten()
        store = self.writers.stores.bars
        return {p: store.read(self.asset, p, start_ns, end_ns + 1) for p in store.providers(self.asset)}

    def _trim(self, entry_id: str) -> None:
        """Drop the stream entries up to the checkpointed one, included (best effort).

        The stream then holds only entries not yet consumed, so whoever reads it from the
        start (a new owner without a checkpoint) reads exactly the ticks still owed.
        """
        ms, seq = parse_entry_id(entry_id)
        try:
            self.writers.trim_breaker.call(self.client.xtrim, self.stream, minid=f"{ms}-{seq + 1}",
                                           approximate=False)
        except Exception as exc:  # noqa: BLE001 - Redis down or breaker open: the next one trims
            self.last_error = f"XTRIM: {type(exc).__name__}: {exc}"

    # -- views ------------------------------------------------------------------------------------
    def bars_after(self, after_ts: int) -> pd.DataFrame:
        """Consensus bars with ``ts > after_ts`` (latest emission of each), by ts.

        Served from memory when the recent emissions reach back far enough, else from the store
        (a fresh reader, or one that fell behind by more than :data:`RECENT_BARS` bars).
        """
        covered = bool(self.recent) and int(self.recent[0]["ts"]) <= after_ts + 1
        if covered:
            rows = [r for r in self.recent if int(r["ts"]) > after_ts]
            frame = pd.DataFrame.from_records(rows)
            if not len(frame):
                return frame
            return (frame.drop_duplicates("ts", keep="last").sort_values("ts", kind="stable")
                    .reset_index(drop=True))
        self._write_unwritten()
        return self.writers.stores.bars.read(self.asset, start_ns=after_ts + 1 if after_ts >= 0 else None)

    def recent_bars(self, after_ts: int = -1) -> pd.DataFrame:
        """Consensus bars written (new, amended or imputed) with ``ts > after_ts``, by ts."""
        rows = [r for r in self.recent if int(r["ts"]) > after_ts]
        frame = pd.DataFrame.from_records(rows)
        return frame.sort_values("ts", kind="stable").reset_index(drop=True) if len(frame) else frame

    def reached(self, entry_id: str) -> bool:
        """True once the entry ``entry_id`` has been consumed."""
        return parse_entry_id(self.state.last_id) >= parse_entry_id(entry_id)

    def settled(self) -> bool:
        """Nothing owed by this asset: features caught up (the shard checks its logs)."""
        return self.state.features_pending == 0

    def status(self) -> dict[str, Any]:
        """Counters, progress and errors of this asset (JSON-ready)."""
        st = self.state.status()
        st.update({"stream": self.stream, "restored": self.restored, "failures": self.failures,
                   "failure": self.failure, "last_error": self.last_error})
        return st

    def tick_statuses(self) -> dict[str, np.ndarray]:
        """Audit mode (``ingest.keep_tick_status``): provider, seq and status of every tick."""
        if self.state.status_log is None:
            raise RuntimeError("tick statuses are kept only with ingest.keep_tick_status=true")
        return self.state.status_log.arrays()
