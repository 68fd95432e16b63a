"""The ``tickcast`` command line.

Each plane registers its subcommands from a module in :mod:`tickcast.commands`; this file only
wires them together and turns :class:`~tickcast.errors.TickcastError` into a clear message
and exit code 2 (never a traceback for a user's mistake), as it does for the environment's
refusals to write (permissions, a read-only or full disk). SIGINT and SIGTERM unwind a command
through its clean-up (:mod:`tickcast.signals`) and end it with 128 + the signal's number.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import sys
from typing import Any

from tickcast import signals
from tickcast.config import Settings, load_settings
from tickcast.errors import TickcastError

# OSErrors that are the machine's state, not a bug: one line, exit 2.
ENVIRONMENT_ERRNOS: frozenset[int] = frozenset(
    {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EMFILE})

# Modules under tickcast.commands that define ``register(subparsers)``.
COMMAND_MODULES: tuple[str, ...] = ("data", "model", "serving", "loop", "shards")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Config file + environment + ``--set`` overrides + ``--data-dir``."""
    overrides = list(getattr(args, "set", None) or [])
    if getattr(args, "data_dir", None):
        overrides.append(f"data_dir={args.data_dir}")
    return load_settings(getattr(args, "config", None), overrides=overrides)


def add_common(parser: argparse.ArgumentParser, data_dir: bool = True) -> None:
    """Options every subcommand takes."""
    parser.add_argument("--config", help="YAML config (default: configs/default.yaml)")
    parser.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                        help="override a config value (repeatable)")
    if data_dir:
        parser.add_argument("--data-dir", help="data directory (bars, gap audit, embedded redis)")


def print_json_line(obj: dict[str, Any]) -> None:
    """The machine-readable last line of a command."""
    print(json.dumps(obj, default=float, separators=(",", ":")), flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tickcast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"tickcast.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"tickcast.commands.{name}":
                continue  # plane not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with signals.handled():
            rc = args.func(args)
    except TickcastError as exc:
        where = f" ({exc.field})" if exc.field else ""
        print(f"error: {exc.message}{where}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in ENVIRONMENT_ERRNOS:
            raise
        path = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror}{path}", file=sys.stderr)
        return 2
    except signals.Interrupted as exc:
        print(f"interrupted by {exc.name}; stopped what the command had started", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
