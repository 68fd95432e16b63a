"""Multi-node drill, run in its own process by ``test_multinode.py``.

Starts a Ray cluster of several nodes on this machine (``ray.cluster_utils.Cluster``: a head
without CPUs, so the market shards go to the workers, and two one-CPU workers), replays the
slice through the actors, removes the worker node hosting the first asset's actor mid-replay
(an autoscaler-style replacement node joins), and prints one JSON line: where the actors ran
before and after, which node was removed, and the ingest report. The caller compares the stored
bars with an undisturbed run.

Why a separate process: a driver attaches to one Ray cluster at a time, and the test session
already holds one (``ray_session``); this cluster, its nodes and its driver live and die here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--redis-url", required=True)
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--assets", required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--speed", type=float, required=True)
    ap.add_argument("--strike-at", type=int, required=True)
    args = ap.parse_args(argv)

    import ray
    from ray.cluster_utils import Cluster

    from actors.market_shard import shard_for
    from tickcast.config import load_settings
    from tickcast.ingest import IngestHooks, IngestPlan, run_ingest
    from tickcast.ray_runtime import NAMESPACE

    assets = tuple(args.assets.split(","))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    out: dict[str, Any] = {"nodes": [w.node_id for w in workers]}
    try:
        settings = load_settings(overrides=[
            f"data_dir={args.data_dir}", f"redis.url={args.redis_url}",
            f"ingest.stream_prefix='{args.prefix}'", f"assets=[{args.assets}]",
            f"ingest.batch_max_ticks={args.batch}",
            # Three shards by rendezvous hashing put the two assets on two shards (shard:0 and
            # shard:2; shard:1 would own nothing and is not started), so they spread over the
            # two workers.
            "shards.count=3",
        ])

        def where() -> dict[str, str]:
            handles = {a: shard_for(a) for a in assets}
            return {a: ray.get(h.node_id.remote(), timeout=120) for a, h in handles.items()
                    if h is not None}

        def strike(entries: int) -> None:
            if entries != args.strike_at or "removed" in out:
                return
            out["before"] = where()
            victim = out["before"][assets[0]]
            node = next(w for w in workers if w.node_id == victim)
            t0 = time.monotonic()
            cluster.remove_node(node)
            workers.remove(node)
            workers.append(cluster.add_node(num_cpus=1))  # the autoscaler's replacement
            out["removed"] = victim
            out["remove_s"] = round(time.monotonic() - t0, 2)

        report = run_ingest(settings, IngestPlan("replay", assets, path=Path(args.path), speed=args.speed),
                            hooks=IngestHooks(on_entry=strike))
        out["after"] = where()
        out["report"] = {k: report[k] for k in ("ticks_in", "ticks_accepted", "rejected", "duplicates",
                                                "outliers", "late", "bars")}
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    sys.exit(main())
