"""The ingest driver: source -> Redis Streams -> per-asset actors -> stored bars (orchestration only).

:func:`run_ingest` is what ``tickcast ingest`` runs:

1. make sure Redis answers (embedded server unless ``REDIS_URL``) and attach to Ray;
2. get or create the market shards that own the assets (``shard:<i>``) and note the
   assets' counters;
3. read the source -- a bar file expanded into ticks (``replay``) or the market simulator
   (``sim``; unpaced, its deliveries are joined per asset up to ``ingest.batch_max_ticks``
   ticks) -- and append one stream entry per tick batch through a
   :class:`~actors.feeder.StreamFeeder` (pipelined, breaker + write-ahead log, so a Redis
   outage loses no acknowledged batch), pacing by event time when a speed is given and holding
   back while the streams' backlog is large;
4. wait until each actor has consumed the last entry of its stream, flush the actors (close
   open bars, judge remaining gaps), and report what this run added to their counters.

The report (the last line ``tickcast ingest`` prints) holds ``ticks_in``, ``ticks_accepted``,
``rejected`` (by reason; rows the file reader rejected included), ``duplicates``, ``outliers``
(by provider), ``late``, ``bars``, ``ticks_per_s``, and for the simulator ``injected``,
``detected`` (by kind) and ``clean_rejected_fraction``.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, TextIO

import numpy as np

from tickcast.config import Settings
from tickcast.errors import InvalidInput, ServiceUnavailable
from tickcast.ticks import TickBatch

# How long one wait_until call may block before the driver prints progress again.
_WAIT_SLICE_S = 2.0


@dataclass(frozen=True)
class IngestPlan:
    """What to ingest.

    Attributes
    ----------
    source
        ``"replay"`` (a bar file) or ``"sim"`` (the market simulator).
    assets
        Assets to ingest (each gets its actor and stream).
    path
        The bar file (replay).
    speed
        None: as fast as possible; else event time runs ``speed`` times faster than wall time.
    minutes, seed
        Simulated minutes and simulator seed (sim).
    """

    source: Literal["replay", "sim"]
    assets: tuple[str, ...]
    path: Path | None = None
    speed: float | None = None
    minutes: float = 60.0
    seed: int = 7
    start_ns: int | None = None  # sim: first event time (default: the simulator's own start)

    def __post_init__(self) -> None:
        if self.source not in ("replay", "sim"):
            raise InvalidInput(f"source must be 'replay' or 'sim', got {self.source!r}", field="source")
        if not self.assets:
            raise InvalidInput("no asset to ingest", field="assets")
        if self.source == "replay" and self.path is None:
            raise InvalidInput("replay needs a path", field="path")
        if self.speed is not None and not self.speed > 0:
            raise InvalidInput(f"speed must be positive, got {self.speed}", field="speed")
        if not self.minutes > 0:
            raise InvalidInput(f"minutes must be positive, got {self.minutes}", field="minutes")


@dataclass
class IngestHooks:
    """Callbacks for live views and fault drills (all optional).

    Attributes
    ----------
    on_entry
        Called after each stream entry is queued, with the number queued so far.
    on_poll
        Called about every ``poll_s`` while feeding and while waiting, with the actor handles.
    poll_s
        Period of ``on_poll``.
    """

    on_entry: Callable[[int], None] | None = None
    on_poll: Callable[[dict[str, Any]], None] | None = None
    poll_s: float = 0.5


@dataclass
class _Source:
    batches: Iterator[TickBatch]
    total_ticks: int | None  # for progress percentages (None when unknown)
    file_rejected: dict[str, int] = field(default_factory=dict)
    simulator: Any = None


# -- sources ----------------------------------------------------------------------------------------

def open_replay(path: Path, assets: tuple[str, ...], known: tuple[str, ...],
                batch_max_ticks: int) -> _Source:
    """A bar file as tick batches of ``assets``, merged in event-time order.

    Rows of symbols outside the configured assets (``known``) are rejected as
    ``unknown_asset``; rows of configured assets not asked for are simply not replayed.
    """
    from tickcast.sources.replay import iter_replay_batches, read_bar_file

    replay = read_bar_file(path, known)
    per_asset = [iter_replay_batches(replay, a, batch_max_ticks) for a in assets]
    counts = replay.bars["asset"].value_counts()
    total = int(sum(4 * int(counts.get(a, 0)) for a in assets))  # four ticks per bar
    merged = heapq.merge(*per_asset, key=lambda b: int(b.ts_event[0]) if len(b) else 0)
    return _Source(batches=merged, total_ticks=total, file_rejected=dict(replay.rejected))


def open_sim(settings: Settings, assets: tuple[str, ...], minutes: float, seed: int,
             coalesce_max_ticks: int | None = None, start_ns: int | None = None) -> _Source:
    """The market simulator (batches per asset in delivery order).

    With ``coalesce_max_ticks``, consecutive batches of an asset are joined into one of at most
    that many ticks (see :func:`coalesce_batches`; for unpaced runs).
    """
    from tickcast.sources.simulator import MarketSimulator

    sim = MarketSimulator.from_settings(settings, seed, assets, start_ns=start_ns)
    batches: Iterator[TickBatch] = iter(sim.run(minutes))
    if coalesce_max_ticks is not None:
        batches = coalesce_batches(batches, coalesce_max_ticks)
    return _Source(batches=batches, total_ticks=None, simulator=sim)


def coalesce_batches(batches: Iterable[TickBatch], max_ticks: int) -> Iterator[TickBatch]:
    """Join consecutive batches of each asset into batches of at most ``max_ticks`` ticks.

    Each asset's ticks keep their delivery order (a joined batch is its parts one after the
    other), so per-tick statuses line up with the source's labels and lateness, which the
    pipeline judges tick by tick in arrival order, is unchanged. A batch larger than
    ``max_ticks`` is passed on whole (it was one delivery). Joined batches are yielded when the
    next part would overflow them, and the rest at the end, per asset in order of first
    appearance. Meant for unpaced runs: it holds ticks back until a batch is full.

    Raises
    ------
    InvalidInput
        ``max_ticks`` < 1.

    Examples
    --------
    >>> from tickcast.ticks import NS_PER_S
    >>> parts = [TickBatch.from_columns(a, ["p"] * k, ts_event=[i * NS_PER_S] * k, price=[1.0] * k)
    ...          for i, (a, k) in enumerate([("A", 2), ("B", 1), ("A", 2), ("A", 3), ("B", 1)])]
    >>> [(b.asset, len(b)) for b in coalesce_batches(parts, 4)]
    [('A', 4), ('A', 3), ('B', 2)]
    """
    if isinstance(max_ticks, bool) or not isinstance(max_ticks, int) or max_ticks < 1:
        raise InvalidInput(f"max_ticks must be an integer >= 1, got {max_ticks!r}", field="max_ticks")
    pending: dict[str, list[TickBatch]] = {}
    sizes: dict[str, int] = {}
    for batch in batches:
        parts = pending.setdefault(batch.asset, [])
        if parts and sizes[batch.asset] + len(batch) > max_ticks:
            yield _joined(parts)
            parts.clear()
            sizes[batch.asset] = 0
        parts.append(batch)
        sizes[batch.asset] = sizes.get(batch.asset, 0) + len(batch)
    for parts in pending.values():
        if parts:
            yield _joined(parts)


def _joined(parts: list[TickBatch]) -> TickBatch:
    return parts[0] if len(parts) == 1 else TickBatch.concat(parts)


def _paced(batches: Iterable[TickBatch], speed: float | None) -> Iterator[TickBatch]:
    """Release each batch when its receive time, divided by ``speed``, has elapsed."""
    if speed is None:
        yield from batches
        return
    t0_event: int | None = None
    t0_wall = time.monotonic()
    for batch in batches:
        if len(batch):
            t_event = int(batch.ts_init.max())
            if t0_event is None:
                t0_event = int(batch.ts_init.min())
            due = (t_event - t0_event) / 1e9 / speed
            delay = due - (time.monotonic() - t0_wall)
            if delay > 0:
                time.sleep(delay)
        yield batch


# -- counters ---------------------------------------------------------------------------------------

_SCALARS = ("ticks_in", "ticks_accepted", "duplicates", "late", "frozen", "bars", "amended")
_MAPS = ("rejected", "outliers")


def counts_delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """What a run added to cumulative counters (``IngestCounts.to_dict()`` shape).

    >>> counts_delta({"ticks_in": 5, "rejected": {"null": 2}}, {"ticks_in": 1, "rejected": {}})
    {'ticks_in': 4, 'rejected': {'null': 2}}
    """
    out: dict[str, Any] = {}
    for key, value in after.items():
        if isinstance(value, dict):
            prev = before.get(key, {}) or {}
            diff = {k: int(v) - int(prev.get(k, 0)) for k, v in value.items()}
            out[key] = {k: v for k, v in diff.items() if v}
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = value - before.get(key, 0)
        else:
            out[key] = value
    return out


def counts_sum(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Add counters of several assets (``IngestCounts.to_dict()`` shape).

    >>> counts_sum([{"bars": 2, "outliers": {"a": 1}}, {"bars": 3, "outliers": {"a": 1, "b": 2}}])
    {'bars': 5, 'outliers': {'a': 2, 'b': 2}}
    """
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, dict):
                acc = out.setdefault(key, {})
                for k, v in value.items():
                    acc[k] = acc.get(k, 0) + int(v)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                out[key] = out.get(key, 0) + value
    return out


# -- the driver -------------------------------------------------------------------------------------

class _Progress:
    """One stderr line every ``every_s`` (long replays), silent when ``out`` is None."""

    def __init__(self, out: TextIO | None, every_s: float) -> None:
        self.out = out
        self.every_s = every_s
        self.t0 = time.monotonic()
        self.last = self.t0

    def due(self) -> bool:
        return self.out is not None and time.monotonic() - self.last >= self.every_s

    def line(self, text: str) -> None:
        if self.out is None:
            return
        self.last = time.monotonic()
        print(f"[ingest {self.last - self.t0:7.1f}s] {text}", file=self.out, flush=True)


def run_ingest(settings: Settings, plan: IngestPlan, *, progress: TextIO | None = None,
               hooks: IngestHooks | None = None) -> dict[str, Any]:
    """Ingest a source through the per-asset actors; return the run's report.

    Parameters
    ----------
    settings
        Configuration (``data_dir``, ``redis``, ``ingest``...).
    plan
        Source, assets and pacing.
    progress
        Stream for progress lines (e.g. ``sys.stderr``); None for silence.
    hooks
        Live views and fault drills (:class:`IngestHooks`).

    Raises
    ------
    InvalidInput
        Unreadable source (from the reader, naming the path/field).
    ServiceUnavailable
        Redis stayed unreachable longer than ``ingest.drain_timeout_s`` or the actors did not
        catch up within ``ingest.wait_timeout_s``.
    """
    import ray

    from actors.market_shard import get_or_create_shards
    from actors.feeder import StreamFeeder
    from tickcast.preflight import writable_dir
    from tickcast.ray_runtime import RayConnection, connect_ray, disconnect_ray
    from tickcast.redis_server import connect, ensure_redis

    hooks = hooks or IngestHooks()
    cfg = settings.ingest
    data_dir = writable_dir(settings.data_dir)
    settings = settings.with_overrides(data_dir=str(data_dir))  # actors may run elsewhere
    meter = _Progress(progress, cfg.progress_every_s)

    # Open the source first: a bad file is the user's error and needs neither Redis nor Ray.
    if plan.source == "replay":
        assert plan.path is not None  # checked by IngestPlan
        source = open_replay(plan.path, plan.assets, settings.assets, cfg.batch_max_ticks)
    else:
        # Unpaced, the simulator's small deliveries (``simulator.batch_s`` of receive time) are
        # joined per asset into stream entries of up to ``batch_max_ticks``, as a replay's are:
        # the per-entry costs (a step, a group of store writes, a checkpoint) dominate tiny
        # entries. Paced runs keep one entry per delivery, on time.
        source = open_sim(settings, plan.assets, plan.minutes, plan.seed,
                          cfg.batch_max_ticks if plan.speed is None else None, plan.start_ns)
    if plan.source == "sim" and not settings.ingest.keep_tick_status:
        settings = settings.with_overrides(**{"ingest.keep_tick_status": True})  # to score detection

    url, started_redis = ensure_redis(settings.redis, data_dir)
    conn: RayConnection | None = None
    try:  # from here on, whatever happens (an error, SIGINT, SIGTERM), the finally stops Redis
        conn = connect_ray(settings)
        # Per-asset handles on the market shards that own them (one process per shard).
        actors = get_or_create_shards(settings, url, plan.assets).refs(plan.assets)
        before = {a: s for a, s in zip(plan.assets, ray.get([h.status.remote() for h in actors.values()]))}
        status_offset = {a: _status_len(h) for a, h in actors.items()} if plan.source == "sim" else {}

        client = connect(url, settings.redis.socket_timeout_s)
        feeder = StreamFeeder(client, settings, data_dir / "wal" / "feeder.wal", plan.assets)
        t_start = time.perf_counter()
        _feed(source, plan, feeder, actors, hooks, meter)
        meter.line(f"source done: {feeder.stats.ticks:,} ticks in {feeder.stats.entries:,} entries; "
                   f"draining")
        if not feeder.drain(cfg.drain_timeout_s):
            raise ServiceUnavailable(
                f"Redis stayed unreachable for {cfg.drain_timeout_s:.0f}s: {feeder.pending()} "
                f"round trips remain in {feeder.wal.path} and will be sent by the next ingest")
        _wait_consumed(feeder.last_ids, actors, cfg.wait_timeout_s, hooks, meter)
        after = dict(zip(plan.assets, ray.get([actors[a].flush.remote() for a in plan.assets])))
        elapsed = time.perf_counter() - t_start  # source -> Redis -> actors -> stored bars
        # Online features trail the bars while an actor catches up, and writes may wait in a
        # write-ahead log after an outage; the run ends when nothing is owed, timed apart.
        _wait_settled(actors, cfg.wait_timeout_s, meter)
        settle_s = time.perf_counter() - t_start - elapsed

        per_asset = {a: counts_delta(after[a]["counts"], before[a]["counts"]) for a in plan.assets}
        report = _report(per_asset, source.file_rejected, feeder.stats.ticks, elapsed)
        report["gaps"] = int(sum(after[a]["gaps"] - before[a]["gaps"] for a in plan.assets))
        report["imputed"] = int(sum(after[a]["imputed"] - before[a]["imputed"] for a in plan.assets))
        report["settle_s"] = round(settle_s, 3)
        report["per_asset"] = per_asset
        if source.simulator is not None:
            report.update(_score(source.simulator, actors, status_offset))
        meter.line(f"done: {report['ticks_in']:,} ticks, {report['bars']:,} bars, "
                   f"{report['ticks_per_s']:,.0f} ticks/s")
        return report
    finally:
        if conn is not None:
            disconnect_ray(conn)
        if started_redis is not None:
            started_redis.stop()


def _status_len(handle: Any) -> int:
    import ray

    return len(ray.get(handle.tick_statuses.remote())["status"])


def _feed(source: _Source, plan: IngestPlan, feeder: Any, actors: dict[str, Any],
          hooks: IngestHooks, meter: _Progress) -> None:
    """Push every batch of the source into its asset's stream (paced, with backpressure)."""
    cfg = feeder.settings.ingest
    max_backlog = cfg.max_backlog_entries
    next_poll = time.monotonic() + hooks.poll_s
    for batch in _paced(source.batches, plan.speed):
        if batch.asset not in actors or not len(batch):
            continue
        feeder.add(batch)
        n = feeder.stats.entries
        if hooks.on_entry is not None:
            hooks.on_entry(n)
        if n % cfg.xadd_pipeline_entries == 0:
            _hold_back(feeder, max_backlog, actors, cfg.wait_timeout_s)
        now = time.monotonic()
        if hooks.on_poll is not None and now >= next_poll:
            hooks.on_poll(actors)
            next_poll = now + hooks.poll_s
        if meter.due():
            pct = (f" ({100 * feeder.stats.ticks / source.total_ticks:.0f}%)"
                   if source.total_ticks else "")
            meter.line(f"sent {feeder.stats.ticks:,} ticks{pct} in {feeder.stats.entries:,} entries"
                       f"; {feeder.pending()} round trips waiting in the WAL")
    feeder.flush()


def _hold_back(feeder: Any, max_backlog: int, actors: dict[str, Any], timeout_s: float) -> None:
    """Wait while the consumers are far behind (Redis memory is not a tick archive)."""
    import redis

    deadline = time.monotonic() + timeout_s
    next_check = time.monotonic() + _WAIT_SLICE_S
    delay = 0.01
    while True:
        try:
            if feeder.pending() or feeder.backlog() <= max_backlog:
                return  # (while Redis is down the WAL, not Redis memory, holds the backlog)
        except redis.RedisError:
            return
        if time.monotonic() > next_check:
            _check_actors(actors)  # a stalled consumer would otherwise hold us here forever
            next_check = time.monotonic() + _WAIT_SLICE_S
        if time.monotonic() > deadline:
            raise ServiceUnavailable(f"the actors consumed nothing for {timeout_s:.0f}s",
                                     field="ingest.wait_timeout_s")
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


def _check_actors(actors: dict[str, Any]) -> None:
    """Raise if an actor reports a processing failure (it rolls back and retries meanwhile)."""
    import ray

    for asset, st in zip(actors, ray.get([h.status.remote() for h in actors.values()])):
        _raise_on_failure(asset, st)


def _raise_on_failure(asset: str, status: dict[str, Any]) -> None:
    if status.get("failure"):
        raise ServiceUnavailable(
            f"actor of {asset} cannot process its stream ({status['failures']} attempts): "
            f"{status['failure']}; its ticks stay in Redis, nothing was skipped", field="asset")


def _wait_consumed(last_ids: dict[str, str], actors: dict[str, Any], timeout_s: float,
                   hooks: IngestHooks, meter: _Progress) -> None:
    """Block until every actor has consumed the last entry of its stream."""
    import ray

    deadline = time.monotonic() + timeout_s
    waiting = dict(last_ids)
    while waiting:
        calls = {a: actors[a].wait_until.remote(eid, _WAIT_SLICE_S) for a, eid in waiting.items()}
        for asset, st in zip(calls, ray.get(list(calls.values()))):
            if st["reached"]:
                waiting.pop(asset)
            else:
                _raise_on_failure(asset, st)
        if hooks.on_poll is not None:
            hooks.on_poll(actors)
        if waiting and meter.due():
            meter.line("waiting for " + ", ".join(sorted(waiting)))
        if waiting and time.monotonic() > deadline:
            raise ServiceUnavailable(
                f"actors {', '.join(sorted(waiting))} did not consume their streams within "
                f"{timeout_s:.0f}s", field="ingest.wait_timeout_s")


def _wait_settled(actors: dict[str, Any], timeout_s: float, meter: _Progress) -> dict[str, Any]:
    """Block until every actor's online features caught up and its write-ahead logs drained.

    Returns each actor's final status.
    """
    import ray

    deadline = time.monotonic() + timeout_s
    waiting = set(actors)
    final: dict[str, Any] = {}
    while waiting:
        calls = {a: actors[a].wait_settled.remote(_WAIT_SLICE_S) for a in waiting}
        for asset, st in zip(calls, ray.get(list(calls.values()))):
            final[asset] = st
            if st["reached"]:
                waiting.discard(asset)
            elif meter.due():
                meter.line(f"{asset}: {st['features_pending']:,} bars to feed to the online "
                           f"features, {st['store_writer']['pending'] + st['redis_writer']['pending']}"
                           f" writes in write-ahead logs")
        if waiting and time.monotonic() > deadline:
            raise ServiceUnavailable(
                f"actors {', '.join(sorted(waiting))} still owe feature updates or queued writes "
                f"after {timeout_s:.0f}s", field="ingest.wait_timeout_s")
    return final


def _report(per_asset: dict[str, dict[str, Any]], file_rejected: dict[str, int],
            ticks_sent: int, elapsed_s: float) -> dict[str, Any]:
    total = counts_sum(per_asset.values())
    rejected = dict(total.get("rejected", {}))
    file_rows = 0
    for reason, n in file_rejected.items():
        rejected[reason] = rejected.get(reason, 0) + int(n)
        if reason != "truncated":  # a flag (the file ends early), not a row
            file_rows += int(n)
    report: dict[str, Any] = {
        # Records received: ticks that reached the actors plus file rows that could not be read.
        "ticks_in": int(total.get("ticks_in", 0)) + file_rows,
        "ticks_accepted": int(total.get("ticks_accepted", 0)),
        "rejected": rejected,
        "duplicates": int(total.get("duplicates", 0)),
        "outliers": dict(total.get("outliers", {})),
        "late": int(total.get("late", 0)),
        "frozen": int(total.get("frozen", 0)),
        "bars": int(total.get("bars", 0)),
        "amended": int(total.get("amended", 0)),
        "ticks_per_s": round(ticks_sent / elapsed_s, 1) if elapsed_s > 0 else 0.0,
        "elapsed_s": round(elapsed_s, 3),
        "file_rows_rejected": file_rows,
    }
    return report


def _score(sim: Any, actors: dict[str, Any], offset: dict[str, int]) -> dict[str, Any]:
    """Detection scores: actors' per-tick statuses against the simulator's labels."""
    import ray

    from tickcast.sources.simulator import score_detection

    labels, statuses = [], []
    for asset, handle in actors.items():
        st = ray.get(handle.tick_statuses.remote())
        keys = sim.tick_keys(asset)
        got = {k: v[offset.get(asset, 0):] for k, v in st.items()}
        if len(got["status"]) != len(keys) or not (
                np.array_equal(got["seq"], keys["seq"].to_numpy())
                and np.array_equal(got["provider"].astype(str), keys["provider"].to_numpy().astype(str))):
            raise ServiceUnavailable(
                f"{asset}: the actor's tick statuses ({len(got['status'])}) do not line up with "
                f"the {len(keys)} ticks the simulator emitted")
        labels.append(keys["label"].to_numpy())
        statuses.append(got["status"])
    injected, detected, clean_frac = score_detection(np.concatenate(labels), np.concatenate(statuses))
    return {"injected": injected, "detected": detected, "clean_rejected_fraction": clean_frac}


def report_line(report: dict[str, Any]) -> str:
    """A one-line human summary of a report (the demo prints it)."""
    return (f"{report['ticks_in']:,} ticks in, {report['ticks_accepted']:,} accepted, "
            f"{sum(report['rejected'].values()):,} rejected, {report['duplicates']:,} duplicates, "
            f"{sum(report['outliers'].values()):,} outliers, {report['late']:,} late, "
            f"{report['bars']:,} bars, {report['ticks_per_s']:,.0f} ticks/s")

