"""The container image's default command: a prediction API that answers out of the box.

``python -m tickcast.container [options] [-- tickcast serve options]``, with no arguments:

1. **Models.** When the model registry has no champion for a configured asset, it makes one:
   ``--history-minutes`` of simulated ticks for those assets run through the real per-asset
   actors at full speed (ending now, so the live feed continues from their last close), then
   Ray Tune → XGBoost quantiles → ONNX → registry, as ``tickcast train`` does. A registry that
   already has champions (a mounted volume, a second start) is used as it is.
2. **Serving.** It then *becomes* ``tickcast serve`` (``exec``), in the foreground, so that the
   container's stop signal reaches the server and its clean-up. ``serve.feed`` decides what
   feeds the features (``simulator`` by default; ``streams`` for feed handlers writing the
   ingress streams of an external Redis).

Everything else comes from the configuration as everywhere: ``TICKCAST_DATA_DIR`` (``/data`` in
the image), ``TICKCAST__SERVE__HOST=0.0.0.0`` (set by the image), ``REDIS_URL`` (embedded Redis
when unset), ``RAY_ADDRESS`` (a private Ray when unset; a cluster's head otherwise), ``--set``.
The last stdout line of the bootstrap is a JSON object, like every command's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from tickcast.cli import print_json_line
from tickcast.config import Settings, load_settings
from tickcast.errors import InvalidInput, TickcastError

HISTORY_MINUTES = 2 * 24 * 60.0  # simulated history to train on when the registry is empty


def missing_champions(settings: Settings) -> tuple[str, ...]:
    """Configured assets without a champion model in the registry."""
    from training.registry import ModelRegistry, registry_root

    registry = ModelRegistry(registry_root(settings))
    return tuple(a for a in settings.assets if "champion" not in registry.aliases(a))


def bootstrap_models(settings: Settings, assets: tuple[str, ...], *, history_minutes: float,
                     trials: int | None, seed: int) -> dict[str, Any]:
    """Simulated history through the actors, then a champion per asset (see module docstring).

    Runs inside its own embedded Redis / Ray (:func:`tickcast.demo.demo_runtime`), stopped before
    the server starts its own.
    """
    from tickcast.demo import demo_runtime
    from tickcast.ingest import IngestPlan, report_line, run_ingest
    from training.pipeline import train_model

    freq = settings.bars.freq_s * 1_000_000_000
    end_ns = time.time_ns() // freq * freq
    start_ns = end_ns - int(history_minutes * 60e9)
    out: dict[str, Any] = {"assets": list(assets), "history_minutes": history_minutes, "models": {}}
    with demo_runtime(settings) as live:
        t0 = time.monotonic()
        print(f"[tickcast container] no champion for {', '.join(assets)}: {history_minutes / 1440:.2f} "
              "simulated days of ticks through the actors", file=sys.stderr, flush=True)
        report = run_ingest(live, IngestPlan("sim", assets, speed=None, minutes=history_minutes,
                                             seed=seed, start_ns=start_ns))
        print(f"[tickcast container] {report_line(report)} in {time.monotonic() - t0:.0f}s",
              file=sys.stderr, flush=True)
        for asset in assets:
            t1 = time.monotonic()
            summary = train_model(live, asset, trials=trials or live.tune.trials, seed=seed)
            out["models"][asset] = {"version": summary.get("version"), "alias": summary.get("alias"),
                                    "seconds": round(time.monotonic() - t1, 1)}
            print(f"[tickcast container] {asset}: version {summary.get('version')} as "
                  f"{summary.get('alias')} in {time.monotonic() - t1:.0f}s", file=sys.stderr, flush=True)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments (everything after ``--`` goes to ``tickcast serve``)."""
    p = argparse.ArgumentParser(prog="python -m tickcast.container", description=__doc__.splitlines()[0])
    p.add_argument("--history-minutes", type=float,
                   default=float(os.environ.get("TICKCAST_BOOTSTRAP_HISTORY_MINUTES", HISTORY_MINUTES)),
                   help="simulated minutes to train on when the registry is empty "
                        "(env TICKCAST_BOOTSTRAP_HISTORY_MINUTES)")
    p.add_argument("--trials", type=int, default=None, help="Tune trials per asset (default: tune.trials)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--no-train", action="store_true", help="serve whatever the registry holds")
    p.add_argument("--config", help="config file (default: $TICKCAST_CONFIG or configs/default.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("serve_args", nargs=argparse.REMAINDER, help="-- then `tickcast serve` options")
    return p


def serve_argv(settings: Settings, args: argparse.Namespace) -> list[str]:
    """The ``tickcast serve`` command line this process becomes."""
    extra = args.serve_args[1:] if args.serve_args[:1] == ["--"] else args.serve_args
    argv = [sys.executable, "-m", "tickcast.cli", "serve", "--data-dir", str(settings.data_dir)]
    if args.config:
        argv += ["--config", args.config]
    for item in args.set:
        argv += ["--set", item]
    return argv + list(extra)


def main(argv: list[str] | None = None) -> int:
    """Train when needed, then exec ``tickcast serve``; exit code 2 on a configuration mistake."""
    args = build_parser().parse_args(argv)
    try:
        if args.history_minutes <= 0:
            raise InvalidInput("--history-minutes must be > 0", field="history_minutes")
        if args.trials is not None and args.trials < 1:
            raise InvalidInput("--trials must be >= 1", field="trials")
        settings = load_settings(args.config, overrides=args.set)
        missing = missing_champions(settings)
        result: dict[str, Any] = {"status": "serving", "trained": None}
        if missing and not args.no_train:
            result["trained"] = bootstrap_models(settings, missing, history_minutes=args.history_minutes,
                                                 trials=args.trials, seed=args.seed)
        elif missing:
            result["untrained"] = list(missing)
    except TickcastError as exc:
        where = f" ({exc.field})" if exc.field else ""
        print(f"error: {exc.message}{where}", file=sys.stderr)
        return 2
    cmd = serve_argv(settings, args)
    print_json_line({**result, "exec": cmd[1:]})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
