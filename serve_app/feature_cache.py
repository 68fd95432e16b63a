"""A replica's in-memory copy of the online features and safety state, kept fresh from Redis.

Requests never wait for Redis: they read an immutable :class:`FeatureSnapshot` that a
background thread replaces every ``serve.feature_refresh_s``. One refresh is

1. one server-side script per 250 assets returning each tracked asset's ``features:<ASSET>``
   ``updated`` field and its ``safety:<ASSET>`` hash (both tiny) in a single reply;
2. a full read (:meth:`tickcast.storage.online_store.OnlineFeatureStore.read_many`) of only
   the assets whose ``updated`` changed — a feature row changes once per bar, so a thousand
   assets cost a thousand small replies per refresh, not a thousand feature rows.

New assets are found by ``SCAN features:*`` every ``serve.feature_discovery_s``. When Redis is
unreachable the last snapshot stays in use; requests keep being served until the features it
holds are older than ``serve.feature_max_age_s`` (then 503, with that reason).

The reference price of a prediction (``pred_price = price * exp(pred)``) is the close of the
bar the features describe: the ``close`` field of the features hash when the publisher writes
one, else the consensus bar at ``bar_ts`` in the bar store (read once per new bar).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import redis

from serve_app.periodic import PeriodicThread
from tickcast.storage.online_store import HASH_PREFIX, FeatureRow, OnlineFeatureStore

log = logging.getLogger(__name__)

SAFETY_PREFIX = "safety:"
REGIMES = ("NORMAL", "ELEVATED", "CRISIS")
PRICE_FIELDS = ("close", "price")
PRICE_RETRY_NS = 15 * 1_000_000_000
POLL_CHUNK = 250
# KEYS: features:<A1>, safety:<A1>, features:<A2>, ... -> [updated|nil, [field, value, ...], ...]
_POLL_LUA = """
local out = {}
for i = 1, #KEYS, 2 do
  out[i] = redis.call('HGET', KEYS[i], 'updated')
  out[i + 1] = redis.call('HGETALL', KEYS[i + 1])
end
return out
"""


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
    """Background-refreshed snapshot of online features and safety state.

    Parameters
    ----------
    client_factory
        Returns a Redis client (bytes responses); re-called after a connection failure.
    refresh_s
        Period of a refresh (``serve.feature_refresh_s``).
    discovery_s
        Period of the ``SCAN`` for new assets (``serve.feature_discovery_s``).
    bar_close
        ``(asset, bar_ts) -> close or None``: the price when the features hash has none.
    assets
        Assets tracked from the start (more are discovered).
    """

    def __init__(self, client_factory: Callable[[], redis.Redis], refresh_s: float = 0.5,
                 discovery_s: float = 5.0,
                 bar_close: Callable[[str, int], float | None] | None = None,
                 assets: Iterable[str] = ()) -> None:
        self._factory = client_factory
        self.refresh_s = refresh_s
        self.discovery_s = discovery_s
        self._bar_close = bar_close
        self._client: redis.Redis | None = None
        self._store: OnlineFeatureStore | None = None
        self._poll: Any = None
        self._tracked: dict[str, None] = dict.fromkeys(assets)
        self._snapshot = FeatureSnapshot()
        self._worker = PeriodicThread("feature-cache", refresh_s, self.refresh)
        self._next_discovery = 0.0
        self._lock = threading.Lock()

    @property
    def snapshot(self) -> FeatureSnapshot:
        """The current snapshot (read once per request)."""
        return self._snapshot

    def track(self, assets: Iterable[str]) -> None:
        """Also follow ``assets`` (e.g. every routed asset)."""
        new = [a for a in assets if a not in self._tracked]
        if new:
            with self._lock:
                for a in new:
                    self._tracked[a] = None

    def _connect(self) -> tuple[redis.Redis, OnlineFeatureStore]:
        if self._client is None or self._store is None:
            self._client = self._factory()
            self._store = OnlineFeatureStore(self._client)
            self._poll = None
        return self._client, self._store

    def _discover(self, client: redis.Redis) -> None:
        found = []
        for key in client.scan_iter(match=f"{HASH_PREFIX}*", count=1000):
            name = key.decode("utf-8", "replace")[len(HASH_PREFIX):]
            if name and name not in self._tracked:
                found.append(name)
        self.track(found)

    def refresh(self) -> FeatureSnapshot:
        """One refresh now (the background thread calls this); returns the new snapshot."""
        try:
            client, store = self._connect()
            now = time.monotonic()
            if now >= self._next_discovery:
                self._next_discovery = now + self.discovery_s
                self._discover(client)
            with self._lock:
                assets = list(self._tracked)
            current = self._snapshot
            wall = time.time_ns()
            replies: list[object] = []
            # One server-side script per POLL_CHUNK assets answers every `updated` field and
            # safety hash in a single reply (a pipeline of 2,000 commands cost ~5x more to
            # build and parse); each round trip releases the interpreter lock while it waits.
            if self._poll is None:
                self._poll = client.register_script(_POLL_LUA)
            for k in range(0, len(assets), POLL_CHUNK):
                keys = []
                for a in assets[k:k + POLL_CHUNK]:
                    keys.append(HASH_PREFIX + a)
                    keys.append(SAFETY_PREFIX + a)
                replies.extend(self._poll(keys=keys))
            changed: list[str] = []
            safety: dict[str, SafetyEntry] = {}
            for i, a in enumerate(assets):
                updated = replies[2 * i]
                entry = current.features.get(a)
                if updated is not None and (
                        entry is None or int(updated) != entry.updated
                        # The bar may reach the bar store just after its features: retry the
                        # price for a while, not forever (explicit-feature-only assets).
                        or (entry.price is None and wall - entry.updated < PRICE_RETRY_NS)):
                    changed.append(a)
                raw_safety = replies[2 * i + 1]
                if raw_safety:
                    flat = list(raw_safety)  # HGETALL inside a script: [field, value, ...]
                    safety[a] = parse_safety(dict(zip(flat[::2], flat[1::2])))
            features = dict(current.features)
            fresh: dict[str, FeatureRow | None] = {}
            for k in range(0, len(changed), POLL_CHUNK):
                fresh.update(store.read_many(changed[k:k + POLL_CHUNK]))
            if changed:
                for a, row in fresh.items():
                    if row is None:
                        features.pop(a, None)
                        continue
                    old = features.get(a)
                    price = _extra_price(row)
                    if price is None and old is not None and old.bar_ts == row.bar_ts:
                        price = old.price
                    if price is None and self._bar_close is not None:
                        price = self._bar_close(a, int(row.bar_ts))
                    features[a] = _entry(row, price)
            snap = FeatureSnapshot(features=features, safety=safety,
                                   version=current.version + (1 if changed or safety != dict(current.safety) else 0),
                                   refreshed_ns=time.time_ns(), error="")
        except Exception as exc:  # noqa: BLE001 - keep serving the last snapshot; report why
            self._client = None
            self._store = None
            old = self._snapshot
            snap = FeatureSnapshot(features=old.features, safety=old.safety, version=old.version,
                                   refreshed_ns=old.refreshed_ns,
                                   error=f"{type(exc).__name__}: {exc}")
        self._snapshot = snap
        return snap

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
