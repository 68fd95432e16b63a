"""A replica's in-memory copy of the online features and safety state, kept fresh from Redis.

Requests never wait for Redis: they read an immutable :class:`FeatureSnapshot` that a
background thread replaces every ``serve.feature_refresh_s``. The replica follows the change
feed ``changes:online`` (:data:`tickcast.streams.CHANGES_STREAM`), on which every feature write
(:class:`tickcast.storage.online_store.OnlineFeatureStore`) and every safety write
(:func:`tickcast.storage.safety_store.publish_safety`) appends ``{asset, kind}`` atomically with
the write itself. One refresh is

1. one ``XRANGE changes:online <cursor> + COUNT n`` from the replica's cursor (the last entry it
   applied; the reply starts with that entry itself, which proves nothing between was trimmed);
2. one pipelined round trip re-reading only the assets the new entries name (``HGETALL`` of
   ``features:<ASSET>`` and/or ``safety:<ASSET>``).

With nothing changed a refresh is one command whatever the number of assets. Assets are
discovered from the feed (an entry for an asset never seen is read in full); assets tracked by
:meth:`FeatureCache.track` are read once on the next refresh.

A full resync (cursor first, then ``SCAN features:*`` and every tracked asset's two hashes,
pipelined in chunks) runs at start, when the cursor's entry is gone from the feed (trimmed past
it: the replica fell more than ``CHANGES_MAXLEN`` entries behind; or the stream was reset),
on the first refresh after a failed one (a Redis outage), and every ``serve.feature_resync_s``
as a safety net for writers that bypass the feed. When Redis is unreachable the last snapshot
stays in use; requests keep being served until the features it holds are older than
``serve.feature_max_age_s`` (then 503, with that reason).

The reference price of a prediction (``pred_price = price * exp(pred)``) is the close of the
bar the features describe: the ``close`` field of the features hash when the publisher writes
one, else the consensus bar at ``bar_ts`` in the bar store (looked up once per new row, and
retried on later refreshes for ``PRICE_RETRY_NS`` while the bar has not reached the store).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Iterable, Mapping

import numpy as np
import redis

from serve_app.periodic import PeriodicThread
from tickcast.errors import ServiceUnavailable
from tickcast.storage.online_store import HASH_PREFIX, FeatureRow, OnlineFeatureStore
from tickcast.streams import CHANGES_STREAM, SAFETY_PREFIX, ChangeKind

log = logging.getLogger(__name__)

REGIMES = ("NORMAL", "ELEVATED", "CRISIS")
PRICE_FIELDS = ("close", "price")
PRICE_RETRY_NS = 15 * 1_000_000_000
FEED_BATCH = 10_000  # change entries per XRANGE (a refresh loops while replies come back full)
READ_CHUNK = 500  # HGETALL commands per pipelined round trip
START_ID = b"0-0"  # cursor before the first entry (the feed did not exist at the resync)
_KINDS = {k.value.encode(): k for k in ChangeKind}


class ResyncReason(str, Enum):
    """Why a refresh re-read every tracked asset instead of following the change feed."""

    START = "start"
    FEED_GAP = "feed_gap"  # the cursor's entry is gone: trimmed past it, or the stream was reset
    OUTAGE = "outage"  # first refresh after one that failed (Redis unreachable, timeout...)
    PERIODIC = "periodic"  # serve.feature_resync_s: catches writers that bypass the feed
    REQUESTED = "requested"  # refresh(force_resync=True)


@dataclass(frozen=True, eq=False)
class FeatureEntry:
    """One asset's latest feature row as served.

    Attributes
    ----------
    bar_ts
        Open time of the bar whose close produced the row (UNIX ns).
    schema
        Feature schema hash.
    names
        Feature names, in ``values`` order.
    values
        float64 values (NaN = missing), read-only.
    updated
        When the publisher wrote the row (UNIX ns).
    price
        Close of that bar (None when unknown).
    """

    bar_ts: int
    schema: str
    names: tuple[str, ...]
    values: np.ndarray
    updated: int
    price: float | None

    def age_s(self, now_ns: int, freq_ns: int) -> float:
        """Seconds since the bar closed (``bar_ts + freq``); never negative."""
        return max(0.0, (now_ns - (self.bar_ts + freq_ns)) / 1e9)


@dataclass(frozen=True)
class SafetyEntry:
    """Safety state of an asset (``safety:<ASSET>``); absent means NORMAL and 1.0."""

    regime: str = "NORMAL"
    multiplier: float = 1.0
    halted: bool = False


NORMAL = SafetyEntry()


def parse_safety(raw: Mapping[bytes, bytes]) -> SafetyEntry:
    """Decode a ``safety:<ASSET>`` hash; malformed fields fall back to the safe defaults.

    A halted asset is served with multiplier 0 whatever the hash says (no position while
    halted).

    >>> parse_safety({b"regime": b"CRISIS", b"multiplier": b"0.2", b"halted": b"0"})
    SafetyEntry(regime='CRISIS', multiplier=0.2, halted=False)
    >>> parse_safety({b"regime": b"bogus", b"multiplier": b"nan", b"halted": b"1"})
    SafetyEntry(regime='NORMAL', multiplier=0.0, halted=True)
    """
    if not raw:
        return NORMAL
    regime = raw.get(b"regime", b"NORMAL").decode("ascii", "replace").upper()
    if regime not in REGIMES:
        regime = "NORMAL"
    try:
        multiplier = float(raw.get(b"multiplier", b"1"))
    except ValueError:
        multiplier = 1.0
    if not math.isfinite(multiplier) or multiplier < 0:
        multiplier = 1.0
    halted = raw.get(b"halted", b"0").strip() in (b"1", b"true", b"True")
    return SafetyEntry(regime=regime, multiplier=0.0 if halted else multiplier, halted=halted)


@dataclass(frozen=True, eq=False)
class FeatureSnapshot:
    """Immutable view of every tracked asset's features and safety state."""

    features: Mapping[str, FeatureEntry] = field(default_factory=dict)
    safety: Mapping[str, SafetyEntry] = field(default_factory=dict)
    version: int = 0
    refreshed_ns: int = 0
    error: str = ""


def _entry(row: FeatureRow, price: float | None) -> FeatureEntry:
    values = np.array(row.values, dtype=np.float64)
    values.setflags(write=False)
    return FeatureEntry(bar_ts=int(row.bar_ts), schema=row.schema, names=tuple(row.names),
                        values=values, updated=int(row.updated), price=price)


def _extra_price(row: FeatureRow) -> float | None:
    for name in PRICE_FIELDS:
        raw = row.extra.get(name)
        if raw is not None:
            try:
                value = float(raw)
            except ValueError:
                continue
            if math.isfinite(value) and value > 0:
                return value
    return None


class FeatureCache:
    """Background-refreshed snapshot of online features and safety state (see the module notes).

    Parameters
    ----------
    client_factory
        Returns a Redis client (bytes responses); re-called after a connection failure.
    refresh_s
        Period of a refresh (``serve.feature_refresh_s``).
    resync_s
        Period of the full resync safety net (``serve.feature_resync_s``).
    bar_close
        ``(asset, bar_ts) -> close or None``: the price when the features hash has none.
    assets
        Assets tracked from the start (more are discovered).
    changes_stream
        The change feed followed (tests give their own).
    feed_batch
        Change entries read per ``XRANGE``.
    """

    def __init__(self, client_factory: Callable[[], redis.Redis], refresh_s: float = 0.5,
                 resync_s: float = 60.0,
                 bar_close: Callable[[str, int], float | None] | None = None,
                 assets: Iterable[str] = (), changes_stream: str = CHANGES_STREAM,
                 feed_batch: int = FEED_BATCH) -> None:
        if refresh_s <= 0 or resync_s <= 0:
            raise ValueError(f"refresh_s and resync_s must be > 0, got {refresh_s}, {resync_s}")
        if feed_batch < 1 or not changes_stream:
            raise ValueError("feed_batch must be >= 1 and changes_stream a non-empty key")
        self._factory = client_factory
        self.refresh_s = refresh_s
        self.resync_s = resync_s
        self.changes_stream = changes_stream
        self.feed_batch = int(feed_batch)
        self._bar_close = bar_close
        self._client: redis.Redis | None = None
        self._lock = threading.Lock()
        self._tracked: dict[str, None] = dict.fromkeys(assets)
        self._unread: dict[str, None] = {}  # tracked since the last read: read in full once
        self._cursor: bytes | None = None  # None: the next refresh is a full resync
        self._resync_reason = ResyncReason.START
        self._next_resync = 0.0
        self._price_pending: dict[str, None] = {}  # rows still without a reference price
        self._snapshot = FeatureSnapshot()
        self._worker = PeriodicThread("feature-cache", refresh_s, self.refresh)
        self._stats: dict[str, int] = {
            "refreshes": 0, "failures": 0, "changes_read": 0, "feature_rows_read": 0,
            "safety_read": 0, "unreadable_rows": 0, "malformed_changes": 0,
            **{f"resyncs_{r.value}": 0 for r in ResyncReason}}

    @property
    def snapshot(self) -> FeatureSnapshot:
        """The current snapshot (read once per request)."""
        return self._snapshot

    def track(self, assets: Iterable[str]) -> None:
        """Also follow ``assets`` (e.g. every routed asset); new ones are read on the next refresh."""
        new = [a for a in assets if a not in self._tracked]
        if new:
            with self._lock:
                for a in new:
                    if a not in self._tracked:
                        self._tracked[a] = None
                        self._unread[a] = None

    def stats(self) -> dict[str, int | str]:
        """Counters of the refresh loop (resyncs by reason, entries and rows read) and the cursor."""
        out: dict[str, int | str] = dict(self._stats)
        out["tracked"] = len(self._tracked)
        out["cursor"] = "" if self._cursor is None else self._cursor.decode()
        return out

    def _connect(self) -> redis.Redis:
        if self._client is None:
            self._client = self._factory()
        return self._client

    # ------------------------------------------------------------------ refresh
    def refresh(self, force_resync: bool = False) -> FeatureSnapshot:
        """One refresh now (the background thread calls this); returns the new snapshot.

        ``force_resync`` re-reads every tracked asset even when the feed says nothing changed.
        """
        try:
            client = self._connect()
            reason: ResyncReason | None
            if self._cursor is None:
                reason = self._resync_reason
            elif force_resync:
                reason = ResyncReason.REQUESTED
            elif time.monotonic() >= self._next_resync:
                reason = ResyncReason.PERIODIC
            else:
                reason = None
            snap = self._follow(client) if reason is None else None
            if snap is None:
                snap = self._resync(client, reason or ResyncReason.FEED_GAP)
            self._stats["refreshes"] += 1
        except Exception as exc:  # noqa: BLE001 - keep serving the last snapshot; report why
            self._client = None
            self._stats["failures"] += 1
            if self._cursor is not None:
                # Whatever happened meanwhile (a restart from an older file, a flush), the
                # first refresh after the failure re-reads everything.
                self._cursor = None
                self._resync_reason = ResyncReason.OUTAGE
            old = self._snapshot
            snap = FeatureSnapshot(features=old.features, safety=old.safety, version=old.version,
                                   refreshed_ns=old.refreshed_ns,
                                   error=f"{type(exc).__name__}: {exc}")
        self._snapshot = snap
        return snap

    def _follow(self, client: redis.Redis) -> FeatureSnapshot | None:
        """Apply the feed's entries after the cursor; None when the cursor's entry is gone."""
        cursor = self._cursor
        assert cursor is not None
        feats: dict[str, None] = {}
        safety: dict[str, None] = {}
        with self._lock:
            unread = list(self._unread)
            self._unread.clear()
        for a in unread:
            feats[a] = safety[a] = None
        discovered: list[str] = []
        while True:
            if cursor == START_ID:
                entries = client.xrange(self.changes_stream, "-", "+", count=self.feed_batch)
                fresh = entries
            else:
                # Inclusive of the cursor: seeing its entry again proves that nothing after it
                # was trimmed (MAXLEN trims the oldest entries first).
                entries = client.xrange(self.changes_stream, cursor, "+", count=self.feed_batch + 1)
                if not entries or entries[0][0] != cursor:
                    with self._lock:  # read again by the resync anyway; keep them unread
                        self._unread.update(dict.fromkeys(unread))
                    return None
                fresh = entries[1:]
            for _, fields in fresh:
                asset, kind = self._parse_change(fields)
                if asset is None:
                    continue
                if asset not in self._tracked:
                    discovered.append(asset)
                    feats[asset] = safety[asset] = None  # a new asset: read it in full
                elif kind is ChangeKind.FEATURES:
                    feats[asset] = None
                elif kind is ChangeKind.SAFETY:
                    safety[asset] = None
            self._stats["changes_read"] += len(fresh)
            if fresh:
                cursor = fresh[-1][0]
            if len(fresh) < self.feed_batch:
                break
        if discovered:
            with self._lock:
                for a in discovered:
                    self._tracked[a] = None
        current = self._snapshot
        if not feats and not safety and not self._price_pending:
            self._cursor = cursor  # nothing changed: no read, no copy
            return self._snapshot_of(current, current.features, current.safety, False)
        rows, hashes = self._read(client, list(feats), list(safety))
        features = dict(current.features)
        safety_now = dict(current.safety)
        changed = self._apply_rows(features, rows)
        for a, raw in hashes.items():
            entry = parse_safety(raw) if raw else None
            if entry is None:
                changed |= safety_now.pop(a, None) is not None
            elif safety_now.get(a) != entry:
                safety_now[a] = entry
                changed = True
        changed |= self._retry_prices(features)
        self._cursor = cursor
        return self._snapshot_of(current, features, safety_now, changed)

    def _resync(self, client: redis.Redis, reason: ResyncReason) -> FeatureSnapshot:
        """Re-read every tracked asset (and discover new ones); the cursor is taken first, so a
        change written meanwhile is applied again by the next refresh, never missed."""
        last = client.xrevrange(self.changes_stream, "+", "-", count=1)
        cursor = last[0][0] if last else START_ID
        found = []
        for key in client.scan_iter(match=f"{HASH_PREFIX}*", count=1000):
            name = key.decode("utf-8", "replace")[len(HASH_PREFIX):]
            if name and name not in self._tracked:
                found.append(name)
        with self._lock:
            for a in found:
                self._tracked[a] = None
            self._unread.clear()
            assets = list(self._tracked)
        rows, hashes = self._read(client, assets, assets)
        current = self._snapshot
        features = dict(current.features)
        changed = self._apply_rows(features, rows)
        safety = {a: parse_safety(raw) for a, raw in hashes.items() if raw}
        changed |= safety != dict(current.safety)
        changed |= self._retry_prices(features)
        self._cursor = cursor
        self._next_resync = time.monotonic() + self.resync_s
        self._stats[f"resyncs_{reason.value}"] += 1
        return self._snapshot_of(current, features, safety, changed)

    # ------------------------------------------------------------------ helpers
    def _parse_change(self, fields: Mapping[bytes, bytes]) -> tuple[str | None, ChangeKind | None]:
        raw_asset = fields.get(b"asset")
        kind = _KINDS.get(fields.get(b"kind", b""))
        try:
            asset = raw_asset.decode("utf-8") if raw_asset is not None else ""
        except UnicodeDecodeError:
            asset = ""
        if not asset or any(ch.isspace() for ch in asset) or kind is None:
            self._stats["malformed_changes"] += 1  # written by something else: skipped
            return None, None
        return asset, kind

    def _read(self, client: redis.Redis, feats: list[str], safety: list[str],
              ) -> tuple[dict[str, dict[bytes, bytes]], dict[str, dict[bytes, bytes]]]:
        """Raw ``features:`` hashes of ``feats`` and ``safety:`` hashes of ``safety``, pipelined
        in chunks."""
        cmds = [(True, a) for a in feats] + [(False, a) for a in safety]
        rows: dict[str, dict[bytes, bytes]] = {}
        hashes: dict[str, dict[bytes, bytes]] = {}
        for k in range(0, len(cmds), READ_CHUNK):
            chunk = cmds[k:k + READ_CHUNK]
            pipe = client.pipeline(transaction=False)
            for is_feature, a in chunk:
                pipe.hgetall((HASH_PREFIX if is_feature else SAFETY_PREFIX) + a)
            for (is_feature, a), raw in zip(chunk, pipe.execute()):
                (rows if is_feature else hashes)[a] = raw
        self._stats["feature_rows_read"] += len(feats)
        self._stats["safety_read"] += len(safety)
        return rows, hashes

    def _apply_rows(self, features: dict[str, FeatureEntry],
                    raws: Mapping[str, dict[bytes, bytes]]) -> bool:
        """Put the rows that differ from the held entries into ``features``; True if any did.

        A row already held (same ``updated`` and ``bar_ts``: a resync, or several entries for
        one write) is not decoded again. A hash that disappeared keeps its last entry: the
        staleness check retires it.
        """
        changed = False
        for a, raw in raws.items():
            if not raw:
                continue
            old = features.get(a)
            if (old is not None and raw.get(b"updated") == str(old.updated).encode()
                    and raw.get(b"bar_ts") == str(old.bar_ts).encode()):
                continue
            try:
                row = OnlineFeatureStore.decode(a, raw)
            except ServiceUnavailable as exc:
                # One bad hash must not stop the others from refreshing: keep its last row.
                self._stats["unreadable_rows"] += 1
                log.warning("%s", exc)
                continue
            if row is None:
                continue
            price = _extra_price(row)
            if price is None and old is not None and old.bar_ts == row.bar_ts:
                price = old.price
            if price is None and self._bar_close is not None:
                price = self._bar_close(a, int(row.bar_ts))
            if price is None:
                self._price_pending[a] = None
            else:
                self._price_pending.pop(a, None)
            features[a] = _entry(row, price)
            changed = True
        return changed

    def _retry_prices(self, features: dict[str, FeatureEntry]) -> bool:
        """Look up again the bar-store price of rows written without one.

        The bar may reach the bar store just after its features: retry for a while
        (``PRICE_RETRY_NS`` after the row was written), not forever (explicit-feature-only assets).
        """
        if not self._price_pending or self._bar_close is None:
            self._price_pending.clear()
            return False
        changed = False
        wall = time.time_ns()
        for a in list(self._price_pending):
            entry = features.get(a)
            if entry is None or entry.price is not None or wall - entry.updated >= PRICE_RETRY_NS:
                del self._price_pending[a]
                continue
            price = self._bar_close(a, entry.bar_ts)
            if price is not None:
                features[a] = dataclasses.replace(entry, price=price)
                del self._price_pending[a]
                changed = True
        return changed

    @staticmethod
    def _snapshot_of(current: FeatureSnapshot, features: Mapping[str, FeatureEntry],
                     safety: Mapping[str, SafetyEntry], changed: bool) -> FeatureSnapshot:
        if not changed:  # published mappings are never mutated: share them
            features, safety = current.features, current.safety
        return FeatureSnapshot(features=features, safety=safety,
                               version=current.version + (1 if changed else 0),
                               refreshed_ns=time.time_ns(), error="")

    # ------------------------------------------------------------------ thread
    @property
    def running(self) -> bool:
        """The background refresh thread is alive."""
        return self._worker.running

    def start(self) -> None:
        """Refresh once, then keep refreshing in a background thread."""
        self.refresh()
        self._worker.start()

    def stop(self) -> None:
        """Stop the background thread."""
        self._worker.stop()
