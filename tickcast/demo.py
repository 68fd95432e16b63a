"""``make demo``: the system end to end on this machine, step by step.

1. History (only when the model registry has no champion): two simulated days of ticks for the
   two assets, as fast as the actors take them, so that there is something to train on.
2. Live data plane (:func:`run_data_demo`, below).
3. Training (only when the registry has no champion): Ray Tune over XGBoost quantile models per
   asset, with Tune's progress, ONNX export, registration as champion.
4. Serving: ``tickcast serve --detach`` (its own Ray and Redis, so it outlives this process),
   with the live simulator feeding features; a sample ``curl`` and a few live predictions with
   the regime, position multiplier and drift level. The API stays up: ``tickcast down`` stops it.

Data plane (this module's first step, :func:`run_data_demo`): the market simulator feeds two
assets (four providers each, with injected anomalies) through Redis Streams into the per-asset
Ray actors for about a minute of wall time, simulated time running ~120x faster so that many
1-minute bars close. A line is printed for each consensus bar as it closes; then the stored
bars, the gap audit and the ingest report (with the detection scores of the injected anomalies).

:func:`demo_runtime` starts what the steps share -- an embedded Redis and a local Ray instance
on a fresh data dir -- and stops them at the end, so later steps (training, serving) run inside
the same ``with`` block.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, TextIO

import pandas as pd

from tickcast.config import Settings, load_settings

DEMO_MINUTES = 120.0  # simulated minutes
DEMO_WALL_S = 60.0  # wall time they take
HISTORY_MINUTES = 2 * 24 * 60.0  # simulated history to train on when the registry is empty


@dataclass
class DataDemoResult:
    """What the data step produced (the next steps train and serve on it).

    Attributes
    ----------
    settings
        The demo's settings (fresh data dir, Redis URL).
    report
        The ingest report (``tickcast ingest`` JSON).
    bars
        Stored consensus bars per asset.
    gaps
        Gap audit per asset.
    """

    settings: Settings
    report: dict[str, Any]
    bars: dict[str, pd.DataFrame]
    gaps: dict[str, pd.DataFrame]


def _utc(ts_ns: int) -> str:
    return pd.Timestamp(int(ts_ns), unit="ns", tz="UTC").strftime("%Y-%m-%d %H:%M")


def bar_line(asset: str, bar: dict[str, Any]) -> str:
    """One live line for a closed consensus bar.

    >>> bar_line("BTC-USD", {"ts": 0, "open": 1.0, "high": 2.0, "low": 0.5, "close": 1.5,
    ...                      "ticks": 7, "providers": 3, "confidence": 1.25, "imputed": ""})
    'BTC-USD  1970-01-01 00:00  O 1.00  H 2.00  L 0.50  C 1.50  ticks 7  providers 3  conf 1.2bp'
    """
    imputed = f"  imputed:{bar['imputed']}" if bar.get("imputed") else ""
    return (f"{asset:<8} {_utc(bar['ts'])}  O {bar['open']:.2f}  H {bar['high']:.2f}  "
            f"L {bar['low']:.2f}  C {bar['close']:.2f}  ticks {int(bar['ticks'])}  "
            f"providers {int(bar['providers'])}  conf {bar['confidence']:.1f}bp{imputed}")


class LiveBars:
    """Prints each consensus bar once, as the actors close it (an ``on_poll`` ingest hook)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.last_ts: dict[str, int] = {}
        self.printed = 0

    def poll(self, actors: dict[str, Any]) -> None:
        """Ask each actor for bars newer than the last one printed."""
        import ray

        calls = {a: h.recent_bars.remote(self.last_ts.get(a, -1)) for a, h in actors.items()}
        for asset, frame in zip(calls, ray.get(list(calls.values()))):
            for bar in frame.to_dict("records"):
                if int(bar["ts"]) > self.last_ts.get(asset, -1):
                    print(bar_line(asset, bar), file=self.out, flush=True)
                    self.last_ts[asset] = int(bar["ts"])
                    self.printed += 1


@contextlib.contextmanager
def demo_runtime(settings: Settings) -> Iterator[Settings]:
    """Embedded Redis and a local Ray for the whole demo; yields settings pointing at them."""
    from tickcast.ray_runtime import connect_ray, disconnect_ray
    from tickcast.redis_server import ensure_redis

    url, started = ensure_redis(settings.redis, settings.data_dir)
    settings = settings.with_overrides(**{"redis.url": url})
    conn = None
    try:  # a Ray that fails to start must not leave the Redis just started behind
        conn = connect_ray(settings)
        yield settings
    finally:
        if conn is not None:
            disconnect_ray(conn)
        if started is not None:
            started.stop()


def run_data_demo(settings: Settings, *, minutes: float = DEMO_MINUTES, wall_s: float = DEMO_WALL_S,
                  seed: int = 7, out: TextIO = sys.stdout, start_ns: int | None = None) -> DataDemoResult:
    """Simulator -> Redis -> per-asset actors -> bars, printed live; then bars and gap audit.

    Parameters
    ----------
    settings
        Configuration (the first two configured assets are simulated).
    minutes, wall_s
        Simulated minutes and the wall time they should take (sets the replay speed).
    seed
        Simulator seed.
    out
        Where to print.
    start_ns
        First simulated event time (default: the simulator's own start).
    """
    from tickcast.commands.data import write_bars_csv, write_gaps_csv
    from tickcast.ingest import IngestHooks, IngestPlan, report_line, run_ingest
    from tickcast.storage.bar_store import BarStore, GapAuditStore

    assets = tuple(settings.assets[:2])
    speed = minutes * 60.0 / wall_s
    print(f"== data plane: simulator -> Redis Streams ticks:<ASSET> -> market shards ({', '.join(assets)})"
          f" -> bars ({minutes:.0f} simulated minutes at {speed:.0f}x)", file=out, flush=True)
    live = LiveBars(out)
    t0 = time.monotonic()
    report = run_ingest(settings, IngestPlan("sim", assets, speed=speed, minutes=minutes, seed=seed,
                                                     start_ns=start_ns),
                        hooks=IngestHooks(on_poll=live.poll, poll_s=0.5))
    root = Path(settings.data_dir)
    store, audit_store = BarStore(root / "bars"), GapAuditStore(root / "gaps")
    bars = {a: store.read(a) for a in assets}
    gaps = {a: audit_store.read(a) for a in assets}
    for asset in assets:  # bars that closed after the last poll (the final flush)
        for bar in bars[asset].to_dict("records"):
            if int(bar["ts"]) > live.last_ts.get(asset, -1) and bar["imputed"] == "":
                print(bar_line(asset, bar), file=out)

    print(f"\n== stored bars ({root / 'bars'})", file=out)
    for asset in assets:
        frame = bars[asset]
        imputed = int((frame["imputed"] != "").sum())
        span = f"{_utc(frame['ts'].iloc[0])} .. {_utc(frame['ts'].iloc[-1])}" if len(frame) else "none"
        print(f"{asset}: {len(frame)} bars ({imputed} imputed), {span}; last five:", file=out)
        write_bars_csv(frame.tail(5), out)
    print("\n== gap audit", file=out)
    for asset in assets:
        print(f"{asset}: {len(gaps[asset])} gap(s)", file=out)
        write_gaps_csv(gaps[asset], out)
    print(f"\n== ingest: {report_line(report)} in {time.monotonic() - t0:.0f}s", file=out)
    detected = report.get("detected", {})
    scores = ", ".join(f"{k} {detected.get(k, 0)}/{n}" for k, n in report.get("injected", {}).items() if n)
    print(f"   anomalies detected/injected: {scores}; clean ticks rejected: "
          f"{100 * report.get('clean_rejected_fraction', 0.0):.3f}%", file=out, flush=True)
    return DataDemoResult(settings=settings, report=report, bars=bars, gaps=gaps)


def registry_has_champions(settings: Settings, assets: tuple[str, ...]) -> bool:
    """True when every asset already has a champion model (training can be skipped)."""
    from training.registry import ModelRegistry, registry_root

    registry = ModelRegistry(registry_root(settings))
    return all("champion" in registry.aliases(a) for a in assets)


def run_history(settings: Settings, *, minutes: float, start_ns: int, seed: int,
                out: TextIO = sys.stdout) -> dict[str, Any]:
    """Simulated history through the real actors at full speed (training data)."""
    from tickcast.ingest import IngestPlan, report_line, run_ingest

    assets = tuple(settings.assets[:2])
    print(f"\n== history: {minutes / 1440:.1f} simulated days of ticks for {', '.join(assets)} "
          "through the actors, as fast as they go (training data)", file=out, flush=True)
    t0 = time.monotonic()
    report = run_ingest(settings, IngestPlan("sim", assets, speed=None, minutes=minutes, seed=seed,
                                             start_ns=start_ns))
    print(f"   {report_line(report)} in {time.monotonic() - t0:.0f}s", file=out, flush=True)
    return report


def train_first_models(settings: Settings, *, trials: int, out: TextIO = sys.stdout) -> dict[str, Any]:
    """Tune, fit, export and register a champion per asset (Tune prints its progress)."""
    from training.pipeline import train_model

    results: dict[str, Any] = {}
    for asset in settings.assets[:2]:
        print(f"\n== training {asset}: Ray Tune, {trials} trials of XGBoost quantile models", file=out,
              flush=True)
        t0 = time.monotonic()
        summary = train_model(settings, asset, trials=trials)
        results[asset] = summary
        dm = summary.get("dm_vs_random_walk", {})
        metrics = summary.get("metrics", summary.get("validation", {}))
        print(f"   {asset}: version {summary.get('version')} as {summary.get('alias')} in "
              f"{time.monotonic() - t0:.0f}s; validation coverage_90 "
              f"{metrics.get('coverage_90', float('nan')):.3f}, DM vs random walk stat "
              f"{dm.get('stat', float('nan')):.2f} p {dm.get('p', float('nan')):.3f}", file=out, flush=True)
        if metrics.get("verdict"):
            print(f"   {metrics['verdict']}", file=out, flush=True)
    return results


def start_api(settings: Settings, out: TextIO = sys.stdout) -> str:
    """``tickcast serve --detach`` on the demo's data dir; returns the API's base URL."""
    import json
    import subprocess

    print("\n== serving: tickcast serve --detach (Ray Serve, blue/green slots, live simulator feed)",
          file=out, flush=True)
    # The server runs in its own process from the default config: hand it the demo's registry.
    cmd = [sys.executable, "-m", "tickcast.cli", "serve", "--detach", "--data-dir", str(settings.data_dir),
           "--set", f"model.registry_dir={settings.model.registry_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"tickcast serve failed ({proc.returncode}): {proc.stderr[-2000:]}")
    status = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"   {status}", file=out, flush=True)
    return str(status["url"])


def drift_level(data_dir: str, asset: str) -> str:
    """The drift actor's published level for ``asset`` (Redis hash ``drift:<ASSET>``), or ``-``."""
    from tickcast.redis_server import connect

    url_file = Path(data_dir) / "redis" / "url"
    try:
        level = connect(url_file.read_text().strip()).hget(f"drift:{asset}", "level")
    except Exception:  # noqa: BLE001 - status display only: Redis unreachable shows "-"
        return "-"
    return level.decode() if level else "-"


def show_predictions(url: str, assets: tuple[str, ...], data_dir: str, *, rounds: int = 5,
                     every_s: float = 3.0, out: TextIO = sys.stdout) -> int:
    """Print a sample curl and a few live predictions; returns how many succeeded."""
    import httpx

    print(f"\n== try it:\n   curl -s -X POST {url}/v1/predict -H 'content-type: application/json' "
          f"-d '{{\"asset\": \"{assets[0]}\"}}'", file=out)
    print(f"   open {url}/docs for the API, {url}/v1/models for slots and regime, "
          f"{url}/metrics for Prometheus", file=out, flush=True)
    ok = 0
    with httpx.Client(timeout=5.0) as client:
        deadline = time.monotonic() + 120  # features become fresh once the live feed catches up
        while time.monotonic() < deadline:
            if client.get(f"{url}/v1/health").json().get("ready"):
                break
            time.sleep(1.0)
        for i in range(rounds):
            for asset in assets:
                r = client.post(f"{url}/v1/predict", json={"asset": asset})
                if r.status_code != 200:
                    print(f"   {asset}: HTTP {r.status_code} {r.text[:200]}", file=out, flush=True)
                    continue
                p = r.json()
                ok += 1
                print(f"   {asset:<8} bar {p.get('bar_time') or '-'}  close {p['price']:.2f}  "
                      f"next-bar forecast {p['pred_price']:.2f} [{p['lo_price']:.2f}, {p['hi_price']:.2f}] "
                      f"(90%)  {p['slot']}:{p['model_version']}  regime {p['regime']} "
                      f"x{p['multiplier']:.2f}{'  HALTED' if p['halted'] else ''}  "
                      f"drift {drift_level(data_dir, asset)}  {p['latency_ms']:.1f}ms", file=out, flush=True)
            if i + 1 < rounds:
                time.sleep(every_s)
    print(f"\nThe API stays up at {url}. Stop everything with: "
          f".venv/bin/tickcast down --data-dir {data_dir}", file=out, flush=True)
    return ok


def fresh_settings(base_dir: str | None = None, overrides: list[str] | None = None) -> Settings:
    """Settings on a new ``<data_dir>/demo-<UTC time>`` directory (a clean run every time).

    The model registry is shared by demo runs (``<base>/registry``), so a second ``make demo``
    serves the models the first one trained instead of training again.
    """
    settings = load_settings(overrides=overrides)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    base = Path(base_dir or settings.data_dir).resolve()
    data_dir = base / f"demo-{stamp}"
    data_dir.mkdir(parents=True, exist_ok=True)
    registry = Path(settings.model.registry_dir)
    if not registry.is_absolute():
        registry = base / registry
    return settings.with_overrides(data_dir=str(data_dir), **{"model.registry_dir": str(registry)})


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``make demo`` / ``python -m tickcast.demo``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", help="base directory (a fresh demo-<time> folder is made in it)")
    ap.add_argument("--minutes", type=float, default=DEMO_MINUTES, help="simulated minutes (live step)")
    ap.add_argument("--wall-s", type=float, default=DEMO_WALL_S, help="wall time of the live step")
    ap.add_argument("--history-minutes", type=float, default=HISTORY_MINUTES,
                    help="simulated history to train on when the registry is empty")
    ap.add_argument("--trials", type=int, default=None, help="Tune trials (default: tune.trials)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--no-serve", action="store_true", help="stop after the data and model steps")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args(argv)
    settings = fresh_settings(args.data_dir, args.set)
    assets = tuple(settings.assets[:2])
    print(f"tickcast demo -- data dir {settings.data_dir}", flush=True)
    need_models = not registry_has_champions(settings, assets)
    # Simulated time is laid out so that the live step ends about now: the serving feed then
    # continues each asset from its last stored close at wall-clock time, without a gap.
    freq = settings.bars.freq_s * 1_000_000_000
    end_ns = time.time_ns() // freq * freq
    live_start = end_ns - int(args.minutes * 60e9)
    with demo_runtime(settings) as live:
        if need_models:
            hist_start = live_start - int(args.history_minutes * 60e9)
            run_history(live, minutes=args.history_minutes, start_ns=hist_start, seed=args.seed + 1)
            live = _continue_prices(live, assets)
        run_data_demo(live, minutes=args.minutes, wall_s=args.wall_s, seed=args.seed, start_ns=live_start)
        if need_models:
            train_first_models(live, trials=args.trials or live.tune.trials)
        else:
            print("\n== models: the registry already has champions; training skipped", flush=True)
    if args.no_serve:
        return 0
    url = start_api(settings)
    ok = show_predictions(url, assets, str(settings.data_dir))
    return 0 if ok else 1


def _continue_prices(settings: Settings, assets: tuple[str, ...]) -> Settings:
    """Start the next simulated segment at each asset's last stored close (no price jump)."""
    from tickcast.storage.bar_store import BarStore

    store = BarStore(Path(settings.data_dir) / "bars")
    prices = dict(settings.simulator.start_prices)
    for asset in assets:
        last = store.read(asset).tail(1)
        if len(last):
            prices[asset] = float(last["close"].iloc[0])
    return settings.with_overrides(**{"simulator.start_prices": prices})


if __name__ == "__main__":
    sys.exit(main())
