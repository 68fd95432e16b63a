"""``tickcast shards`` and ``tickcast serve`` without any model, as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

from tests.test_cli_data import tickcast
from tickcast.shards import assign

ASSETS = [f"S{i:03d}-USD" for i in range(40)]


def test_shards_prints_the_planned_mapping(tmp_path: Path) -> None:
    proc = tickcast("shards", "--data-dir", str(tmp_path), "--set", f"assets=[{','.join(ASSETS)}]",
                    "--set", "shards.count=4", timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["source"] == "planned"  # no server runs for this data dir
    assert out["assets"] == assign(ASSETS, 4)
    assert sum(s["assets"] for s in out["shards"].values()) == len(ASSETS)
    assert all(f"{name}: {info['assets']} assets" in proc.stderr for name, info in out["shards"].items())
    one = tickcast("shards", "--data-dir", str(tmp_path), "--set", f"assets=[{','.join(ASSETS)}]",
                   "--set", "shards.count=4", "--asset", ASSETS[7], timeout=60)
    assert json.loads(one.stdout.strip().splitlines()[-1])["assets"] == {ASSETS[7]: assign(ASSETS, 4)[ASSETS[7]]}


def test_serve_without_any_model_says_so_at_once(tmp_path: Path) -> None:
    proc = tickcast("serve", "--detach", "--data-dir", str(tmp_path), timeout=60)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("error: no model to serve") and "tickcast train --asset BTC-USD" in err
    assert str(tmp_path) in err
    # Refused before any start-up (not after a readiness timeout): no Redis, no server state.
    assert not (tmp_path / "redis").exists() and not (tmp_path / "serve" / "state.json").exists()
