"""Scale: the live system with N assets on one node, measured from outside its processes.

``python -m bench.scale --assets N`` (default 1,000) starts the system the way
``tickcast serve`` does -- the same :func:`tickcast.commands.serving.run_server`: embedded
Redis, a private Ray, the market shards with the closed loop on, the controller, the Serve app
behind HAProxy, and the live simulator feed with 4 providers per asset -- for N assets, and
also for 10 and 100 (``--sizes``), so the growth shows. Every asset serves a real model: one
``train_model`` run with the default settings (``--trials`` Tune trials) on simulated history
of the first asset, shared by the registry to the others (:meth:`ModelRegistry.share`, hard
links; serving and the shards load it once).

For each size it reports

* ``assets``, ``shards``;
* ``start_s``: from the call until ``/v1/health`` answers and every shard runs; ``ready_s``:
  until health reports every asset servable (model loaded, fresh features), if within
  ``--ready-timeout``; ``ready_assets`` at the end;
* ``rss_gib`` (and ``pss_gib``, which counts shared pages once): all processes of the system,
  Ray's own included -- the bench process, which runs the server, and every descendant
  (GCS, raylet, workers, shards, the controller, Serve and its replicas, HAProxy, Redis);
* ``idle_cpu_cores``: CPU time of those processes over ``--idle-s`` (30 s) with no client
  traffic, divided by the wall time;
* ``bar_delay_p99_s``: how long after its watermark passed (the arrival in Redis of the entry
  that closed the bar) each bar was emitted, p99 over the bars of the idle window;
* ``ticks_per_s``: ticks ingested by the shards over the idle window;
* ``assets_with_bars``: assets that have emitted consensus bars (all of them, or it says so).

The last line is one JSON object: ``{"runs": [...], "machine": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.ingest import machine


def _asset_names(n: int) -> list[str]:
    return [f"S{i:04d}-USD" for i in range(n)]


def _descendants(root: int) -> list[int]:
    """``root`` and every process below it (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _cpu_s(pids: list[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except (OSError, IndexError, ValueError):
            continue
    return total / tick


def _memory_gib(pids: list[int]) -> tuple[float, float]:
    """(sum of RSS, sum of PSS) in GiB."""
    rss = pss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                for line in fh:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
        except (OSError, ValueError):
            continue
    return rss / 2**20, pss / 2**20


def train_shared_model(work: Path, trials: int, say: Any) -> tuple[Path, str, str]:
    """One model trained by the real pipeline on simulated history; (registry, asset, version)."""
    from tickcast.config import load_settings
    from tickcast.ingest import IngestPlan, run_ingest
    from tickcast.ray_runtime import connect_ray, disconnect_ray
    from training.pipeline import train_model

    asset = _asset_names(1)[0]
    settings = load_settings(overrides=[f"data_dir={work}", f"assets=[{asset}]",
                                        "ingest.ray_address=local"])
    settings = settings.with_overrides(**{"simulator.start_prices": {asset: 100.0}})
    conn = connect_ray(settings)
    try:
        t0 = time.perf_counter()
        run_ingest(settings, IngestPlan("sim", (asset,), minutes=2 * 24 * 60, seed=11))
        say(f"model: 2 simulated days of {asset} ingested in {time.perf_counter() - t0:.0f} s")
        t0 = time.perf_counter()
        summary = train_model(settings, asset, trials=trials, log=lambda _m: None)
        say(f"model: {summary['version']} trained ({trials} trials) in {time.perf_counter() - t0:.0f} s")
    finally:
        disconnect_ray(conn)
    return work / settings.model.registry_dir, asset, str(summary["version"])


def _health(url: str) -> dict[str, Any] | None:
    try:
        r = httpx.get(f"{url}/v1/health", timeout=5.0)
        return dict(r.json())
    except (httpx.HTTPError, ValueError):
        return None


def run_size(n: int, model: tuple[Path, str, str], args: argparse.Namespace, say: Any) -> dict[str, Any]:
    """Start the system for ``n`` assets, measure it idle, stop it."""
    import ray

    from tickcast.commands.serving import run_server
    from tickcast.config import load_settings
    from tickcast.net import free_port
    from training.registry import ModelRegistry

    assets = _asset_names(n)
    work = Path(tempfile.mkdtemp(prefix=f"scale-{n}-", dir=args.workdir))
    reg_src, src_asset, version = model
    registry = ModelRegistry(work / "registry")
    source = ModelRegistry(reg_src)
    # The trained version, then shared to every other asset (hard links).
    import shutil

    shutil.copytree(source.path(src_asset, version), registry.root / src_asset / version)
    registry.set_alias(src_asset, "champion", version)
    registry.share(src_asset, version, assets, alias="champion")
    port = free_port()
    settings = load_settings(overrides=[
        f"data_dir={work}", f"assets=[{','.join(assets)}]", f"serve.port={port}",
        "ingest.ray_address=local",
        f"serve.feed_backfill_minutes={args.backfill_minutes}",
    ])
    url = f"http://127.0.0.1:{port}"
    stop = threading.Event()
    log_path = work / "serve.log"
    logf = open(log_path, "w")
    result: dict[str, Any] = {}

    def serve() -> None:
        try:
            result["summary"] = run_server(settings, stop, log=logf)
        except BaseException as exc:  # noqa: BLE001 - reported below
            result["error"] = f"{type(exc).__name__}: {exc}"

    t0 = time.perf_counter()
    thread = threading.Thread(target=serve, name="server", daemon=True)
    thread.start()
    health = None
    while time.perf_counter() - t0 < args.start_timeout:
        if "error" in result:
            raise RuntimeError(f"server failed: {result['error']} (log {log_path})")
        health = _health(url)
        if health is not None:
            break
        time.sleep(0.5)
    start_s = time.perf_counter() - t0
    say(f"{n} assets: API up after {start_s:.1f} s")
    ready_s = None
    while time.perf_counter() - t0 < args.ready_timeout:
        health = _health(url)
        if health and health.get("ready"):
            ready_s = time.perf_counter() - t0
            break
        time.sleep(1.0)
    per_asset = (health or {}).get("assets") or {}
    ready_assets = sum(1 for a in per_asset.values() if a.get("model") and a.get("features"))
    say(f"{n} assets: {ready_assets} servable after {time.perf_counter() - t0:.0f} s")

    from actors.market_shard import find_shards

    shards = find_shards(settings)
    handles = list(shards.handles.values()) if shards else []

    def shard_totals() -> list[dict[str, Any]]:
        return ray.get([h.shard_status.remote() for h in handles], timeout=60)

    time.sleep(args.settle_s)
    pids = _descendants(os.getpid())
    before = shard_totals()
    cpu0, w0 = _cpu_s(pids), time.perf_counter()
    time.sleep(args.idle_s)
    pids = _descendants(os.getpid())
    cpu1, w1 = _cpu_s(pids), time.perf_counter()
    after = shard_totals()
    rss, pss = _memory_gib(pids)
    ticks = sum(s["ticks_in"] for s in after) - sum(s["ticks_in"] for s in before)
    delays = [s["bar_delay_s"] for s in after if s["bar_delay_s"].get("n")]
    out = {
        "assets": n, "shards": len(handles), "start_s": round(start_s, 1),
        "ready_s": None if ready_s is None else round(ready_s, 1), "ready_assets": ready_assets,
        "rss_gib": round(rss, 2), "pss_gib": round(pss, 2), "processes": len(pids),
        "idle_cpu_cores": round((cpu1 - cpu0) / (w1 - w0), 3),
        "bar_delay_p99_s": max((d["p99"] for d in delays), default=None),
        "bar_delay_p50_s": max((d["p50"] for d in delays), default=None),
        "ticks_per_s": round(ticks / (w1 - w0), 1),
        "assets_with_bars": sum(s["assets_with_bars"] for s in after),
        "shard_load_s": [s["load_s"] for s in after],
    }
    say(f"{n} assets: {json.dumps(out)}")
    stop.set()
    thread.join(timeout=180)
    logf.close()
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", type=int, default=1000, help="the largest size (default 1,000)")
    ap.add_argument("--sizes", default="10,100", help="smaller sizes run first (comma list)")
    ap.add_argument("--trials", type=int, default=2, help="Tune trials of the one trained model")
    ap.add_argument("--idle-s", type=float, default=30.0)
    ap.add_argument("--settle-s", type=float, default=20.0, help="wait after ready before measuring")
    ap.add_argument("--start-timeout", type=float, default=300.0)
    ap.add_argument("--ready-timeout", type=float, default=180.0)
    ap.add_argument("--backfill-minutes", type=float, default=3.0,
                    help="simulated minutes back-filled per asset at start (serve.feed_backfill_minutes)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the data dirs")
    ap.add_argument("--model-from", default=None,
                    help="a data dir of an earlier run (--keep) whose trained model to reuse")
    args = ap.parse_args(argv)

    def say(msg: str) -> None:
        print(f"[bench.scale] {msg}", file=sys.stderr, flush=True)

    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()} | {args.assets})
    if args.model_from:
        from training.registry import ModelRegistry

        reg_dir = Path(args.model_from) / "registry"
        asset = _asset_names(1)[0]
        version = ModelRegistry(reg_dir).aliases(asset)["champion"]
        model = (reg_dir, asset, version)
        say(f"model: reusing {version} from {reg_dir}")
    else:
        work = Path(tempfile.mkdtemp(prefix="scale-model-", dir=args.workdir))
        model = train_shared_model(work, args.trials, say)
        say(f"model: kept in {work} (--model-from {work} reuses it)")
    runs = [run_size(n, model, args, say) for n in sizes]
    print(json.dumps({"runs": runs, "machine": machine()}, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
