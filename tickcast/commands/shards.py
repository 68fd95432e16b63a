"""``tickcast shards``: which market shard owns which asset.

With a server running for the data dir (``tickcast serve``), the live mapping it published to
Redis (``tickcast:shards``); otherwise the mapping a server would use here (``shards.count``,
else one shard per CPU of this machine), computed by the same rendezvous hashing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from tickcast.cli import add_common, print_json_line, settings_from_args
from tickcast.config import Settings
from tickcast.shards import partition, shard_count
from tickcast.streams import SHARD_MAP_KEY

STATE_FILE = Path("serve") / "state.json"


def _live_map(settings: Settings) -> dict[str, str] | None:
    """The map a running server published, or None (no server, or its Redis is not reachable)."""
    import redis

    from tickcast.redis_server import connect

    try:
        state = json.loads((Path(settings.data_dir) / STATE_FILE).read_text())
        url = str(state["redis_url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        raw: dict[bytes, bytes] = connect(url, settings.redis.socket_timeout_s).hgetall(  # type: ignore[assignment]
            SHARD_MAP_KEY)
    except redis.RedisError:
        return None
    if not raw:
        return None
    return {k.decode(): v.decode() for k, v in raw.items()}


def shard_report(settings: Settings, owners: dict[str, str], source: str) -> dict[str, Any]:
    """JSON-ready view of a mapping: per shard its asset count and assets; per asset its shard."""
    by_shard: dict[str, list[str]] = {}
    for asset, name in owners.items():
        by_shard.setdefault(name, []).append(asset)
    shards = {name: {"assets": len(assets), "owns": sorted(assets)}
              for name, assets in sorted(by_shard.items(), key=lambda kv: int(kv[0].split(":")[1]))}
    return {"source": source, "shards": shards, "assets": dict(sorted(owners.items()))}


def cmd_shards(args: argparse.Namespace) -> int:
    """``tickcast shards``."""
    settings = settings_from_args(args)
    owners = None if args.planned else _live_map(settings)
    source = "live"
    if owners is None:
        n = shard_count(settings.shards.count, float(os.cpu_count() or 1))
        owners = {a: name for name, assets in partition(settings.assets, n).items() for a in assets}
        source = "planned"
    if args.asset:
        owners = {a: s for a, s in owners.items() if a in set(args.asset)}
    report = shard_report(settings, owners, source)
    for name, info in report["shards"].items():
        shown = ", ".join(info["owns"][:8]) + (" ..." if info["assets"] > 8 else "")
        print(f"{name}: {info['assets']} assets: {shown}", file=sys.stderr)
    print_json_line(report)
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``shards``."""
    p = subparsers.add_parser("shards", help="which market shard owns which asset")
    add_common(p)
    p.add_argument("--asset", action="append", help="only this asset (repeatable)")
    p.add_argument("--planned", action="store_true",
                   help="the mapping a server would use here, even if one runs")
    p.set_defaults(func=cmd_shards)
