"""``tickcast drill`` and ``tickcast events`` end to end.

Each drill runs the real loop (its own embedded Redis, the session's Ray, the asset's market shard, a
champion trained with Ray Tune, the Serve app, its drift and safety, the controller) on
the shared BTC file; each takes one to two minutes here, hence ``slow``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tickcast.cli import main
from tickcast.monitoring.events import EventLog, make_event
from tickcast.redis_server import EmbeddedRedis, connect


def _last_json(text: str) -> dict[str, Any]:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return json.loads(lines[-1])


def _drill(scenario: str, data_dir: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    rc = main(["drill", "--scenario", scenario, "--data-dir", str(data_dir)])
    captured = capsys.readouterr()
    out = _last_json(captured.out)
    assert "[drill" in captured.err  # progress on stderr
    assert rc == (0 if out["ok"] else 1)
    for key in ("alert_at", "candidate", "decision", "dm_stat", "dm_p", "rolled_back", "seconds"):
        assert key in out, key
    return out


def _kinds(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, int]:
    assert main(["events", "--data-dir", str(data_dir), "--asset", "BTC-USD"]) == 0
    return _last_json(capsys.readouterr().out)["by_type"]


@pytest.mark.slow
def test_regime_shift_alerts_retrains_shadows_and_decides(
        ray_session: None, shared_data_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = _drill("regime-shift", tmp_path / "drill", capsys)
    assert out["ok"], out
    assert out["alert_at"] is not None and out["alert_bars_after_shift"] >= 0
    assert out["retrain_runner"] == "task"  # the session's Ray runs no job server
    assert out["candidate"] and out["candidate"] != out["champion"]
    assert out["decision"] in ("promoted", "rejected") and out["n"] == 150
    assert out["dm_stat"] is not None and 0.0 <= out["dm_p"] <= 1.0
    if out["decision"] == "promoted":
        assert out["dm_p"] < 0.05 and out["watch"]["type"] in ("watch_passed", "rolled_back")
    kinds = _kinds(tmp_path / "drill", capsys)
    for kind in ("drift_alert", "retrain_scheduled", "retrain_submitted", "retrain_finished",
                 "shadow_started", out["decision"]):
        assert kinds.get(kind), kind


@pytest.mark.slow
def test_a_worse_challenger_is_never_promoted(
        ray_session: None, shared_data_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = _drill("worse-challenger", tmp_path / "drill", capsys)
    assert out["ok"], out
    assert out["decision"] == "rejected" and "phantom trend" in out["how_made_worse"]
    assert out["dm_stat"] > 0 and out["dm_p"] > 0.05  # worse, nowhere near better
    assert out["loss_candidate"] > out["loss_incumbent"] and not out["rolled_back"]


@pytest.mark.slow
def test_a_bad_promotion_is_rolled_back(
        ray_session: None, shared_data_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = _drill("bad-promotion", tmp_path / "drill", capsys)
    assert out["ok"], out
    assert out["decision"] == "promoted" and out["rolled_back"]
    assert out["dm_stat"] > 0 and out["dm_p"] < 0.05
    assert "significantly worse" in out["reason"]
    kinds = _kinds(tmp_path / "drill", capsys)
    assert kinds.get("forced_promotion") and kinds.get("champion_changed") and kinds.get("rolled_back")


def test_drill_refuses_a_directory_holding_other_data(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "precious.parquet").write_bytes(b"data")
    assert main(["drill", "--scenario", "regime-shift", "--data-dir", str(tmp_path)]) == 2
    assert "not a drill's" in capsys.readouterr().err
    assert (tmp_path / "precious.parquet").exists()


def test_events_command_lists_filters_and_summarizes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)  # the data dir's own server, whatever CI sets
    srv = EmbeddedRedis.start(tmp_path)
    log = EventLog(connect(srv.url))
    log.append([make_event("controller", "BTC-USD", "promoted", seq=1, dm_p=0.01),
                make_event("safety", "ETH-USD", "regime", seq=1, to="CRISIS"),
                make_event("controller", "BTC-USD", "rolled_back", seq=2, reason="worse")])
    srv.stop()  # the command restarts the data dir's embedded server (events come back)
    assert main(["events", "--data-dir", str(tmp_path), "--asset", "BTC-USD", "--last", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [json.loads(ln)["type"] for ln in lines[:-1]] == ["rolled_back"]
    assert json.loads(lines[-1]) == {"count": 1, "by_type": {"rolled_back": 1}, "asset": "BTC-USD",
                                     "stream": "events"}
    assert main(["events", "--data-dir", str(tmp_path), "--type", "regime"]) == 0
    assert _last_json(capsys.readouterr().out)["by_type"] == {"regime": 1}
    assert main(["events", "--data-dir", str(tmp_path), "--last", "0"]) == 2
    assert "--last" in capsys.readouterr().err
