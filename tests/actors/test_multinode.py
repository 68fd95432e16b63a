"""Per-asset actors on a multi-node Ray cluster survive losing a node (see multinode_drill.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.redis, pytest.mark.slow]

DRILL = Path(__file__).with_name("multinode_drill.py")
ROOT = Path(__file__).resolve().parents[2]


def test_node_removed_mid_replay(baseline: Any, day_slice: Path, redis_url: str, tmp_path: Path,
                                 read_bars: Callable[..., Any]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "REDIS_URL"))}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, str(DRILL), "--path", str(day_slice), "--data-dir", str(tmp_path),
         "--redis-url", redis_url, "--prefix", f"multinode-{uuid.uuid4().hex[:8]}:ticks:",
         "--assets", ",".join(baseline.assets), "--batch", str(baseline.batch_max_ticks),
         "--speed", str(86_400 / 10), "--strike-at", "40"],
        capture_output=True, text=True, timeout=420, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])

    first, second = baseline.assets
    assert out["before"][first] != out["before"][second], "the two shards were placed on different nodes"
    assert out["removed"] == out["before"][first]
    assert out["after"][first] != out["removed"], "the lost shard was restarted on another node"
    read_bars(tmp_path, baseline.assets).assert_equal(baseline.bars)
    for key, value in out["report"].items():
        assert value == baseline.report[key], key
