"""What the closed-loop actors (drift, safety, controller) share.

* checkpoints: one pickle per actor under ``<data_dir>/checkpoints/``, replaced atomically;
* stream reading: non-blocking ``XREAD`` from a cursor, decoding of ``features_log:<ASSET>``
  entries (the layout of :mod:`tickcast.storage.online_store`);
* durable events: :class:`EventSink` appends to the events stream through a circuit breaker and
  a write-ahead log, so a decision taken while Redis is down is written once it is back;
* Ray metrics under the names of :mod:`tickcast.monitoring.metrics_names`;
* get-or-create and kill of named, detached actors in the ``tickcast`` namespace.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import ray
import redis

from tickcast.config import Settings
from tickcast.monitoring import metrics_names as mn
from tickcast.monitoring.events import EventLog
from tickcast.monitoring.shadow_eval import parse_prediction
from tickcast.ray_runtime import NAMESPACE
from tickcast.storage.breaker import CircuitBreaker
from tickcast.storage.wal import GuardedWriter, WriteAheadLog

log = logging.getLogger(__name__)


def settings_fingerprint(settings: Settings, redis_url: str) -> str:
    """Identity of an actor's configuration: a live actor with another one is replaced."""
    blob = settings.model_dump_json() + "|" + redis_url
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------ checkpoints
def checkpoint_path(settings: Settings, name: str) -> Path:
    """``<data_dir>/checkpoints/<name>.pkl``."""
    return Path(settings.data_dir).resolve() / "checkpoints" / f"{name}.pkl"


def load_checkpoint(path: Path) -> tuple[Any, str | None]:
    """``(state, None)``, ``(None, None)`` when there is none, ``(None, error)`` when unusable."""
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"checkpoint {path} unreadable: {exc}"
    try:
        return pickle.loads(blob), None
    except Exception as exc:  # noqa: BLE001 - a foreign or incompatible file: start over
        return None, f"checkpoint {path} unusable: {type(exc).__name__}: {exc}"


def save_checkpoint(path: Path, state: Any) -> str | None:
    """Atomically replace ``path`` with ``state``; returns an error message or None."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            pickle.dump(state, fh, protocol=pickle.HIGHEST_PROTOCOL)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        return f"checkpoint {path} failed: {exc}"
    return None


# ------------------------------------------------------------------------------ streams
def _id_text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def stream_tail_id(client: redis.Redis, key: str) -> str:
    """Id of the newest entry of ``key`` (``0-0`` when the stream is empty or absent)."""
    try:
        info = client.xinfo_stream(key)
    except redis.ResponseError:
        return "0-0"
    top = info.get("last-generated-id") or info.get(b"last-generated-id")
    return _id_text(top) if top else "0-0"


def read_entries(client: redis.Redis, key: str, after: str,
                 count: int) -> list[tuple[str, dict[bytes, bytes]]]:
    """Up to ``count`` entries of ``key`` after id ``after`` (non-blocking)."""
    reply = client.xread({key: after}, count=count)
    return [(_id_text(eid), fields) for _stream, items in (reply or ()) for eid, fields in items]


def read_forecasts(client: redis.Redis, key: str, asset: str, after: str, count: int,
                   rejected: dict[str, int]) -> tuple[list[Any], list[tuple[str, Any]]]:
    """``asset``'s logged forecasts after id ``after`` on ``key`` (a ``predictions:<ASSET>``
    stream), and the raw entries read (the caller advances its cursor to the last one).

    Malformed entries are counted in ``rejected`` by reason (``prediction_<why>``), never lost
    silently; entries of another asset are skipped.
    """
    entries = read_entries(client, key, after, count)
    forecasts = []
    for _eid, fields in entries:
        f, why = parse_prediction(fields)
        if f is None:
            name = f"prediction_{why}"
            rejected[name] = rejected.get(name, 0) + 1
        elif f.asset == asset:
            forecasts.append(f)
    return forecasts, entries


def decode_features(fields: dict[bytes, bytes]) -> tuple[int, tuple[str, ...], np.ndarray] | None:
    """``(bar_ts, names, values)`` of a ``features_log:<ASSET>`` entry, None if malformed."""
    try:
        names = tuple(json.loads(fields[b"names"]))
        values = np.frombuffer(fields[b"values"], dtype="<f8").astype(np.float64)
        bar_ts = int(fields[b"bar_ts"])
    except (KeyError, ValueError, TypeError):
        return None
    if len(values) != len(names):
        return None
    return bar_ts, names, values


# ------------------------------------------------------------------------------ events
class EventSink:
    """Durable emission of events: direct to the stream, or a WAL while Redis is down.

    Parameters
    ----------
    client
        Redis client.
    settings
        ``controller.events_stream`` / ``events_maxlen``, ``breaker``, ``data_dir``.
    name
        Names the breaker and the WAL file (``<data_dir>/wal/<name>.events.wal``).
    """

    def __init__(self, client: redis.Redis, settings: Settings, name: str) -> None:
        c = settings.controller
        self.log = EventLog(client, c.events_stream, c.events_maxlen)
        wal = WriteAheadLog(Path(settings.data_dir).resolve() / "wal" / f"{name}.events.wal")
        self.writer = GuardedWriter(CircuitBreaker(settings.breaker, f"events:{name}"), wal,
                                    self._write)

    def _write(self, payload: bytes) -> None:
        self.log.append(json.loads(payload))

    def emit(self, events: list[dict[str, Any]]) -> None:
        """Append ``events`` (one round trip); queued in the WAL when Redis is unreachable."""
        if self.writer.pending:
            self.writer.drain()
        if events:
            self.writer.write(json.dumps(events, separators=(",", ":")).encode())

    def drain(self) -> None:
        """Send what waits in the WAL (called from the actors' loops)."""
        if self.writer.pending:
            self.writer.drain()

    def stats(self) -> dict[str, Any]:
        """The writer's counters."""
        return self.writer.stats()


# ------------------------------------------------------------------------------ metrics
class LoopMetrics:
    """Ray gauges and counters of the loop (Prometheus via Ray's metrics agent).

    Outside a Ray worker (unit use) every call is a no-op.
    """

    def __init__(self, names: tuple[str, ...]) -> None:
        self._m: dict[str, Any] = {}
        try:
            from ray.util.metrics import Counter, Gauge
        except ImportError:  # pragma: no cover - ray is a hard dependency
            return
        for name in names:
            spec = mn.METRICS[name]
            cls = Gauge if spec.kind == "gauge" else Counter
            try:
                self._m[name] = cls(spec.name, description=spec.description, tag_keys=spec.tag_keys)
            except Exception as exc:  # noqa: BLE001 - metrics must never stop the loop
                log.info("metric %s unavailable: %s", name, exc)

    def set(self, name: str, value: float, asset: str) -> None:
        """Set a gauge."""
        m = self._m.get(name)
        if m is not None:
            m.set(float(value), tags={mn.ASSET: asset})

    def inc(self, name: str, asset: str, value: float = 1.0) -> None:
        """Increment a counter."""
        m = self._m.get(name)
        if m is not None:
            m.inc(float(value), tags={mn.ASSET: asset})


# ------------------------------------------------------------------------------ actor lookup
def get_or_create(actor_class: Any, name: str, settings: Settings, redis_url: str,
                  args: tuple[Any, ...], *, max_concurrency: int = 4,
                  timeout_s: float = 60.0, options: dict[str, Any] | None = None) -> Any:
    """The live detached actor ``name`` with this configuration, creating it if needed.

    An actor of that name running with another configuration (another data dir, Redis or
    thresholds) is stopped and replaced.

    Raises
    ------
    TimeoutError
        The actor could not be created or reached within ``timeout_s``.
    """
    fingerprint = settings_fingerprint(settings, redis_url)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            try:
                handle = ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:
                handle = actor_class.options(
                    name=name, namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
                    max_concurrency=max_concurrency, **(options or {}),
                ).remote(*args)
            if ray.get(handle.fingerprint.remote(), timeout=timeout_s) == fingerprint:
                return handle
            kill_named(name)
        except ValueError:
            pass  # the name is held by an actor being killed: retry
        if time.monotonic() > deadline:
            raise TimeoutError(f"could not create actor {name} within {timeout_s:.0f}s")
        time.sleep(0.2)


def kill_named(name: str, stop_timeout_s: float = 30.0) -> bool:
    """Stop (checkpoint) and remove the actor ``name`` for good. False if there was none."""
    try:
        handle = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return False
    try:
        ray.get(handle.stop.remote(), timeout=stop_timeout_s)
    except Exception:  # noqa: BLE001 - already dying or unreachable: the kill is what matters
        pass
    ray.kill(handle, no_restart=True)
    return True


def call_quietly(fn: Callable[[], Any]) -> Any:
    """Run ``fn``; log and swallow any error (best-effort notifications between actors)."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        log.info("best-effort call failed: %s", exc)
        return None


class CheckpointedLoopActor:
    """Messages every closed-loop actor answers the same way.

    Subclasses own ``_fingerprint`` (configuration identity), a background thread ``_thread``
    driven by the event ``_stop``, a ``_lock`` over ``state``, and ``path``, where ``state`` is
    checkpointed with :func:`save_checkpoint`.
    """

    _fingerprint: str
    _stop: Any
    _thread: Any
    _lock: Any
    path: Path
    state: Any
    settings: Settings
    last_error: str

    def _step(self) -> bool:
        """One pass over the inputs; True when more is waiting (subclasses define it)."""
        raise TypeError(f"{type(self).__name__} must define _step")

    def _rollback(self) -> None:
        """Back to the last checkpoint after a failed step (subclasses define it)."""
        raise TypeError(f"{type(self).__name__} must define _rollback")

    def _idle_s(self) -> float:
        """How long the loop sleeps when a step found nothing to do."""
        return self.settings.controller.monitor_poll_s

    def _run(self) -> None:
        """The background loop: step; on failure roll back and retry with backoff."""
        label = " ".join(filter(None, (type(self).__name__, getattr(self, "asset", ""))))
        backoff = self.settings.ingest.read_retry_initial_s
        while not self._stop.is_set():
            try:
                busy = self._step()
                backoff = self.settings.ingest.read_retry_initial_s
            except Exception as exc:  # noqa: BLE001 - Redis down, unreadable files: retry later
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("%s: %s", label, self.last_error)
                self._rollback()
                self._stop.wait(backoff)
                backoff = min(2 * backoff, self.settings.ingest.read_retry_max_s)
                continue
            if not busy:
                self._stop.wait(self._idle_s())

    def fingerprint(self) -> str:
        """Configuration identity."""
        return self._fingerprint

    def pid(self) -> int:
        """OS process id (fault tests kill it)."""
        return os.getpid()

    def stop(self) -> bool:
        """Stop the loop and checkpoint (before a planned kill)."""
        self._stop.set()
        self._thread.join(timeout=10)
        with self._lock:
            return save_checkpoint(self.path, self.state) is None
