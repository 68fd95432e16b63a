"""Model-plane commands: ``tickcast train``, ``tickcast backtest``, ``tickcast models``.

Each prints progress on stderr (Ray Tune's progress table goes to stdout before the result) and
one JSON object as the LAST line of stdout. User mistakes (unknown asset, alias or version, a
bad time, no bars) raise :class:`~tickcast.errors.TickcastError`: ``error: ...``, exit code 2.
"""

from __future__ import annotations

import argparse
from typing import Any

from tickcast.cli import add_common, print_json_line, settings_from_args
from tickcast.config import Settings
from tickcast.errors import InvalidInput, UnknownAsset


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``train``, ``backtest`` and ``models`` to the ``tickcast`` command."""
    p = subparsers.add_parser(
        "train", help="tune, fit, calibrate, export and register a forecasting model",
        description="Walk-forward Ray Tune search of an XGBoost quantile model on stored "
                    "consensus bars, conformal calibration, ONNX export (parity-checked) and "
                    "registration (champion if none, else challenger). Last stdout line: JSON.")
    add_common(p)
    p.add_argument("--asset", required=True)
    p.add_argument("--train-start", help="ISO-8601 start of the training range (default: first bar)")
    p.add_argument("--train-end", help="ISO-8601 end (exclusive) of the training range "
                                       "(default: after the last bar)")
    p.add_argument("--trials", type=int, help="Tune trials (default: tune.trials)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser(
        "backtest", help="evaluate a registered model on stored bars and write a report",
        description="ONNX forecasts with causal adaptive conformal intervals on the bars of a "
                    "range; metrics, Diebold-Mariano test against the random walk, a plain "
                    "verdict and an HTML/PNG report. Last stdout line: JSON.")
    add_common(p)
    p.add_argument("--asset", required=True)
    p.add_argument("--model", default="champion", help="alias (champion|challenger|previous) "
                                                       "or version id")
    p.add_argument("--start", help="ISO-8601 start (default: end of the model's training data)")
    p.add_argument("--end", help="ISO-8601 end, exclusive (default: after the last bar)")
    p.add_argument("--no-report", action="store_true", help="skip the PNG/HTML report")
    p.set_defaults(func=cmd_backtest)

    p = subparsers.add_parser(
        "models", help="list, compare, promote or roll back registered models",
        description="Registry administration. Last stdout line: JSON.")
    add_common(p)
    p.add_argument("action", choices=("list", "compare", "promote", "rollback"))
    p.add_argument("--asset", required=True)
    p.add_argument("--version", help="version or alias (promote; first of compare)")
    p.add_argument("--other", help="second version or alias (compare)")
    p.set_defaults(func=cmd_models)


def _check_asset(settings: Settings, asset: str) -> None:
    if asset not in settings.assets:
        raise UnknownAsset(f"unknown asset '{asset}' (configured: {', '.join(settings.assets)})",
                           field="asset")


def cmd_train(args: argparse.Namespace) -> int:
    """``tickcast train``."""
    from training.pipeline import train_model

    settings = settings_from_args(args)
    _check_asset(settings, args.asset)
    if args.trials is not None and args.trials < 1:
        raise InvalidInput("--trials must be >= 1", field="trials")
    print_json_line(train_model(settings, args.asset, args.train_start, args.train_end,
                                args.trials, seed=args.seed))
    return 0


def cmd_backtest(args: argparse.Namespace) -> int:
    """``tickcast backtest``."""
    from training.backtest import backtest_model

    settings = settings_from_args(args)
    _check_asset(settings, args.asset)
    result = backtest_model(settings, args.asset, args.model, args.start, args.end,
                            report=not args.no_report)
    if "report" in result:
        print(f"report: {result['report']}", flush=True)
    print_json_line(result)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """``tickcast models list|compare|promote|rollback``."""
    from training.registry import ModelRegistry, registry_root

    settings = settings_from_args(args)
    _check_asset(settings, args.asset)
    reg = ModelRegistry(registry_root(settings))
    out: dict[str, Any] = {"asset": args.asset, "action": args.action}
    if args.action == "list":
        out["versions"] = reg.list(args.asset)
    elif args.action == "compare":
        if not args.version or not args.other:
            raise InvalidInput("compare needs --version and --other", field="other")
        out["a"] = reg.resolve(args.asset, args.version)
        out["b"] = reg.resolve(args.asset, args.other)
        out["metrics"] = reg.compare(args.asset, args.version, args.other)
    elif args.action == "promote":
        if not args.version:
            raise InvalidInput("promote needs --version", field="version")
        reg.promote(args.asset, args.version)
    else:
        reg.rollback(args.asset)
    out["aliases"] = reg.aliases(args.asset)
    print_json_line(out)
    return 0
