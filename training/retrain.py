"""Retraining entry point for ``ray job submit``.

::

    ray job submit --working-dir . -- python -m training.retrain --asset BTC-USD \\
        [--data-dir DIR] [--train-start ISO] [--train-end ISO] [--trials N] [--set k=v ...]

Runs the same pipeline as ``tickcast train`` (:func:`training.pipeline.train_model`). Inside a
submitted job the driver joins the job's cluster (``RAY_ADDRESS``) and the trials spread over
its nodes; run by hand it joins a running cluster or starts a private local Ray. Progress on
stderr; the last stdout line is the JSON summary (version, alias, validation metrics,
``dm_vs_random_walk``). Exit code 2 with ``error: ...`` on a user mistake.
"""

from __future__ import annotations

import argparse
import sys

from tickcast.cli import add_common, print_json_line, settings_from_args
from tickcast.errors import InvalidInput, TickcastError, UnknownAsset


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m training.retrain`` arguments."""
    p = argparse.ArgumentParser(prog="python -m training.retrain",
                                description=__doc__.splitlines()[0])
    add_common(p)
    p.add_argument("--asset", required=True)
    p.add_argument("--train-start")
    p.add_argument("--train-end")
    p.add_argument("--trials", type=int)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse, train, print the JSON summary; returns the exit code."""
    from training.pipeline import train_model

    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
        if args.asset not in settings.assets:
            raise UnknownAsset(f"unknown asset '{args.asset}'", field="asset")
        if args.trials is not None and args.trials < 1:
            raise InvalidInput("--trials must be >= 1", field="trials")
        result = train_model(settings, args.asset, args.train_start, args.train_end, args.trials,
                             seed=args.seed)
    except TickcastError as exc:
        where = f" ({exc.field})" if exc.field else ""
        print(f"error: {exc.message}{where}", file=sys.stderr)
        return 2
    print_json_line(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
