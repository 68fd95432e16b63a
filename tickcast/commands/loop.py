"""Closed-loop commands: ``tickcast events`` and ``tickcast drill``.

``events`` prints the audit trail of the loop, one JSON event per line (oldest first), then a
JSON summary as the last line. ``drill`` runs a scripted end-to-end exercise of the loop
(:mod:`tickcast.drill`): progress on stderr, the outcome as JSON on the last stdout line.
User mistakes raise :class:`~tickcast.errors.TickcastError` (``error: ...``, exit code 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tickcast.cli import add_common, print_json_line, settings_from_args
from tickcast.errors import InvalidInput, UnknownAsset


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``events`` and ``drill`` to the ``tickcast`` command."""
    p = subparsers.add_parser(
        "events", help="list the closed loop's decisions and transitions with their evidence",
        description="Events of the closed loop (drift, safety, controller), oldest first, one "
                    "JSON object per line; the last line is a JSON summary.")
    add_common(p)
    p.add_argument("--asset", help="only this asset's events")
    p.add_argument("--last", type=int, help="only the newest N events")
    p.add_argument("--type", action="append", dest="types", metavar="TYPE",
                   help="only events of this type (repeatable), e.g. promoted, rolled_back")
    p.set_defaults(func=cmd_events)

    from tickcast.drill import SCENARIOS

    p = subparsers.add_parser(
        "drill", help="run the closed loop end to end on a scripted market",
        description="Replayed calm BTC data, then the scenario, through the real actors, a real "
                    "trained champion, the Serve app and the controller. Progress on stderr; "
                    "last stdout line: JSON (alert_at, candidate, decision, dm_stat, dm_p, "
                    "rolled_back, seconds, evidence).")
    add_common(p)
    p.add_argument("--scenario", required=True, choices=SCENARIOS)
    p.add_argument("--data-file", help="multi-venue 1-minute bar file (default: the shared BTC file)")
    p.set_defaults(func=cmd_drill)


def cmd_events(args: argparse.Namespace) -> int:
    """``tickcast events``."""
    from tickcast.monitoring.events import EventLog
    from tickcast.redis_server import connect, ensure_redis

    settings = settings_from_args(args)
    if args.last is not None and args.last < 1:
        raise InvalidInput("--last must be >= 1", field="last")
    if args.asset is not None and args.asset not in settings.assets:
        # Drills configure their own asset list; an unknown name is still a likely typo.
        from tickcast.drill import DrillScript

        if args.asset != DrillScript().asset:
            raise UnknownAsset(f"unknown asset '{args.asset}' (configured: "
                               f"{', '.join(settings.assets)})", field="asset")
    url, started = ensure_redis(settings.redis, settings.data_dir)
    try:
        c = settings.controller
        events = EventLog(connect(url, settings.redis.socket_timeout_s), c.events_stream,
                          c.events_maxlen).read(asset=args.asset, last=args.last, types=args.types)
    finally:
        if started is not None:
            started.stop()
    by_type: dict[str, int] = {}
    for ev in events:
        print(json.dumps(ev, separators=(",", ":")), flush=True)
        by_type[str(ev.get("type"))] = by_type.get(str(ev.get("type")), 0) + 1
    summary: dict[str, Any] = {"count": len(events), "by_type": by_type, "asset": args.asset,
                               "stream": settings.controller.events_stream}
    print_json_line(summary)
    return 0


def cmd_drill(args: argparse.Namespace) -> int:
    """``tickcast drill``."""
    from tickcast.drill import drill_settings, run_drill

    if not args.data_dir:
        raise InvalidInput("--data-dir is required (an empty or new directory)", field="data_dir")
    settings = drill_settings(args.config, list(args.set or []))
    result = run_drill(settings, args.scenario, args.data_dir, progress=sys.stderr,
                       data_file=args.data_file)
    print_json_line(result)
    return 0 if result.get("ok") else 1
