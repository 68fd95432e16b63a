"""Cost of a serving replica's feature-cache refresh against the number of assets.

Run: ``python -m bench.feature_cache [--assets 10,100,1000] [--refreshes 50]``.

For each number of assets N, a private embedded Redis holds N assets' online feature rows
(25 features and the bar's close, written by :class:`~tickcast.storage.online_store.OnlineFeatureStore`)
and a ``safety:<ASSET>`` hash for every asset (written by
:func:`~tickcast.storage.safety_store.publish_safety`). Two caches are measured on it, each
refresh called directly on this thread (no background thread, so the process CPU time is the
refresh's own):

* ``new``: :class:`serve_app.feature_cache.FeatureCache`, following the change feed;
* ``old``: the polling cache the replicas used before it (one Lua script per 250 assets reading
  every ``updated`` field and safety hash, ``SCAN features:*`` every 5 s), loaded unchanged from
  git at commit ``OLD_COMMIT``; skipped when git or that commit is unavailable.

Per cache and N:

* ``idle``: a refresh when nothing changed (mean over ``--refreshes`` refreshes);
* ``busy``: a refresh after N/120 assets published a new row (every asset closing one bar a
  minute, refreshed every 0.5 s; at least one), the writes themselves not counted;
* ``resync`` (new): a full re-read of every asset, and ``start``, the first one;
  ``discovery`` (old): one ``SCAN features:*``;
* ``per_minute``: what a replica spends in a minute at the configured periods
  (``serve.feature_refresh_s``, ``serve.feature_resync_s``, and the old 5 s discovery):
  busy refreshes plus the resyncs or discoveries of that minute.

Figures: ``cpu_ms`` (this process's CPU time), ``wall_ms``, ``commands`` (Redis commands the
server executed, from ``INFO commandstats``, commands run inside scripts included) and, for
idle refreshes and resyncs, ``redis_cpu_ms`` (the server's CPU time, from ``INFO cpu``). The
last line is one JSON object with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Callable

import numpy as np
import redis

ROOT = Path(__file__).resolve().parent.parent
OLD_COMMIT = "c9f6695"  # last commit with the polling cache (serve_app/feature_cache.py)
OLD_DISCOVERY_S = 5.0  # the old serve.feature_discovery_s default
N_FEATURES = 25
MINUTE_NS = 60_000_000_000
_UNCOUNTED = {"info", "config", "client", "hello"}


def _commands(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items()
               if k.removeprefix("cmdstat_").split("|")[0] not in _UNCOUNTED)


def _redis_cpu_s(client: redis.Redis) -> float:
    cpu = client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def _measure(client: redis.Redis, calls: list[Callable[[], Any]],
             before_each: Callable[[int], None] | None = None) -> dict[str, float]:
    """Mean cost of each call.

    Without ``before_each``, the block's commands and server CPU are read once before and once
    after it. With it (untimed work before each call, such as writes), commands are counted
    around each call and the server's CPU is not reported (it would include that work).
    """
    cpu = wall = 0.0
    commands = 0
    c_block, server0 = _commands(client), _redis_cpu_s(client)
    for i, call in enumerate(calls):
        if before_each is not None:
            before_each(i)
            c0 = _commands(client)
        t0, p0 = time.perf_counter(), time.process_time()
        call()
        cpu += time.process_time() - p0
        wall += time.perf_counter() - t0
        if before_each is not None:
            commands += _commands(client) - c0
    n = len(calls)
    out = {"cpu_ms": round(1e3 * cpu / n, 3), "wall_ms": round(1e3 * wall / n, 3)}
    if before_each is None:
        server_s = _redis_cpu_s(client) - server0
        out["commands"] = round((_commands(client) - c_block) / n, 1)
        out["redis_cpu_ms"] = round(1e3 * server_s / n, 3)
    else:
        out["commands"] = round(commands / n, 1)
    return out


def load_old_cache() -> tuple[type | None, str]:
    """The polling ``FeatureCache`` class as of ``OLD_COMMIT`` (None and why when unavailable)."""
    try:
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{OLD_COMMIT}:serve_app/feature_cache.py"],
                             capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"git show {OLD_COMMIT} failed: {exc}"
    name = f"feature_cache_polling_{OLD_COMMIT}"
    module = types.ModuleType(name)
    module.__file__ = f"{OLD_COMMIT}:serve_app/feature_cache.py"
    sys.modules[name] = module  # dataclasses resolve their module by name
    exec(compile(src, module.__file__, "exec"), module.__dict__)
    return module.FeatureCache, ""


def _publish(store: Any, assets: list[str], bar_ts: int, rng: np.random.Generator) -> None:
    names = [f"f{i}" for i in range(N_FEATURES)]
    for a in assets:
        store.write(a, bar_ts, "schema", names, rng.normal(size=N_FEATURES),
                    close=float(rng.uniform(10, 1000)))


def run_size(url: str, n: int, refreshes: int, refresh_s: float, resync_s: float,
             old_cls: type | None) -> dict[str, Any]:
    """Both caches' costs for ``n`` assets (see the module docstring)."""
    from serve_app.feature_cache import FeatureCache
    from tickcast.redis_server import connect
    from tickcast.storage.online_store import OnlineFeatureStore
    from tickcast.storage.safety_store import publish_safety

    client = connect(url)
    client.flushall()
    client.script_flush()
    rng = np.random.default_rng(n)
    store = OnlineFeatureStore(connect(url))
    assets = [f"A{i:05d}-USD" for i in range(n)]
    bar_ts = (time.time_ns() // MINUTE_NS - 1) * MINUTE_NS
    _publish(store, assets, bar_ts, rng)
    for a in assets:
        publish_safety(client, a, {"regime": "NORMAL", "multiplier": 1.0, "halted": "0"})
    changed_per_refresh = max(1, round(n * refresh_s / 60.0))
    out: dict[str, Any] = {"assets": n, "changed_per_busy_refresh": changed_per_refresh}
    bar = {"ts": bar_ts, "next": 0}

    def change(_: int) -> None:
        # The next assets in turn close a new bar (a new row and a feed entry each).
        k = bar["next"]
        picked = [assets[(k + j) % n] for j in range(changed_per_refresh)]
        bar["next"] = k + changed_per_refresh
        if bar["next"] >= n:
            bar["next"] = 0
        bar["ts"] += 1  # strictly newer rows (the store refuses older bars)
        _publish(store, picked, bar["ts"], rng)

    new = FeatureCache(lambda: connect(url), refresh_s=refresh_s, resync_s=1e9)
    start = _measure(client, [new.refresh])
    res: dict[str, Any] = {"start": start}
    res["idle"] = _measure(client, [new.refresh] * refreshes)
    res["busy"] = _measure(client, [new.refresh] * refreshes, before_each=change)
    resyncs = max(3, refreshes // 10)
    res["resync"] = _measure(client, [lambda: new.refresh(force_resync=True)] * resyncs)
    per_refresh = 60.0 / refresh_s
    per_resync = 60.0 / resync_s
    res["per_minute"] = {
        k: round(per_refresh * res["busy"][k] + per_resync * res["resync"][k], 1)
        for k in ("cpu_ms", "commands")}
    assert len(new.snapshot.features) == n and not new.snapshot.error, new.snapshot.error
    out["new"] = res

    if old_cls is not None:
        old = old_cls(lambda: connect(url), refresh_s=refresh_s, discovery_s=1e9)
        old_res: dict[str, Any] = {"start": _measure(client, [old.refresh])}
        old_res["idle"] = _measure(client, [old.refresh] * refreshes)
        old_res["busy"] = _measure(client, [old.refresh] * refreshes, before_each=change)
        old_client = connect(url)
        old_res["discovery"] = _measure(client, [lambda: old._discover(old_client)] * resyncs)
        per_discovery = 60.0 / OLD_DISCOVERY_S
        old_res["per_minute"] = {
            k: round(per_refresh * old_res["busy"][k] + per_discovery * old_res["discovery"][k], 1)
            for k in ("cpu_ms", "commands")}
        out["old"] = old_res
        # Both caches must end holding the same rows: the figures compare equal work.
        new.refresh()
        old.refresh()
        same = all(new.snapshot.features[a].updated == old.snapshot.features[a].updated for a in assets)
        out["caches_agree"] = same
        assert same, "the two caches disagree"
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line entry: one JSON line with every size's figures and the machine."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", default="10,100,1000", help="comma-separated numbers of assets")
    ap.add_argument("--refreshes", type=int, default=50, help="refreshes measured per figure")
    ap.add_argument("--no-old", action="store_true", help="measure the change-feed cache only")
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.assets.split(",") if x.strip()]
    if not sizes or min(sizes) < 1 or args.refreshes < 1:
        ap.error("--assets must list positive integers and --refreshes be >= 1")

    from tickcast.config import load_settings
    from tickcast.redis_server import EmbeddedRedis

    settings = load_settings()
    refresh_s, resync_s = settings.serve.feature_refresh_s, settings.serve.feature_resync_s
    old_cls, why_not = (None, "--no-old") if args.no_old else load_old_cache()
    srv = EmbeddedRedis.start(tempfile.mkdtemp(prefix="tickcast-bench-fc-"))
    try:
        version = redis.Redis.from_url(srv.url).info("server")["redis_version"]
        results = []
        for n in sizes:
            r = run_size(srv.url, n, args.refreshes, refresh_s, resync_s, old_cls)
            results.append(r)
            print(f"[bench.feature_cache] {n} assets: new idle {r['new']['idle']} busy {r['new']['busy']}"
                  + (f"; old idle {r['old']['idle']} busy {r['old']['busy']}" if "old" in r else ""),
                  file=sys.stderr, flush=True)
    finally:
        srv.stop()
    print(json.dumps({
        "bench": "feature_cache", "refresh_s": refresh_s, "resync_s": resync_s,
        "old_discovery_s": OLD_DISCOVERY_S, "features": N_FEATURES, "refreshes": args.refreshes,
        "old": f"serve_app/feature_cache.py at {OLD_COMMIT}" if old_cls is not None else f"not run: {why_not}",
        "results": results,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "load_avg_1m": round(os.getloadavg()[0], 2), "python": platform.python_version(),
                    "redis": version, "redis_py": redis.__version__},
    }))


if __name__ == "__main__":
    main()
