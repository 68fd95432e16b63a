"""The data plane's command-line contracts, run as a user runs them (a subprocess each).

``tickcast ingest`` starts its own embedded Redis (in the data dir) and a private local Ray
instance, so these runs are independent of the session's servers.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.redis]

ROOT = Path(__file__).resolve().parent.parent
INGEST_KEYS = ("ticks_in", "ticks_accepted", "rejected", "duplicates", "outliers", "late", "bars",
               "ticks_per_s")
BARS_HEADER = ["timestamp_utc", "open", "high", "low", "close", "volume", "vwap", "ticks",
               "providers", "confidence", "imputed"]
GAPS_HEADER = ["start_utc", "end_utc", "missing_minutes", "method", "filled"]


def tickcast(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``tickcast ARGS`` with a private Redis and Ray (no REDIS_URL / RAY_ADDRESS)."""
    exe = Path(sys.executable).with_name("tickcast")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "tickcast.cli"]
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "RAY_ADDRESS")}
    env["TICKCAST__INGEST__RAY_ADDRESS"] = "local"
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT)


def last_json(proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def morning(shared_data_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first three hours of the shared file (all symbols)."""
    out = tmp_path_factory.mktemp("cli") / "morning.csv.gz"
    with gzip.open(shared_data_file, "rt") as src, gzip.open(out, "wt") as dst:
        dst.write(next(src))
        for line in src:
            if line >= "2023-03-01T03":
                break
            dst.write(line)
    return out


@pytest.fixture(scope="module")
def replayed(morning: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    data_dir = tmp_path_factory.mktemp("replayed")
    report = last_json(tickcast("ingest", "--source", "replay", "--path", str(morning),
                                "--assets", "BTC-USD", "--speed", "max", "--data-dir", str(data_dir)))
    return data_dir, report


def test_ingest_replay_prints_the_contract_json(replayed: tuple[Path, dict], morning: Path) -> None:
    _, report = replayed
    for key in INGEST_KEYS:
        assert key in report, key
    assert isinstance(report["rejected"], dict) and isinstance(report["outliers"], dict)
    assert report["bars"] == 180 and report["ticks_per_s"] > 0
    # Four ticks per BTC/USD venue bar reached the actor; other symbols are not configured.
    with gzip.open(morning, "rt") as f:
        btc_usd_rows = sum(1 for line in f if ",BTC/USD," in line)
    assert report["per_asset"]["BTC-USD"]["ticks_in"] == 4 * btc_usd_rows
    assert report["rejected"]["unknown_asset"] > 0
    assert report["ticks_in"] == 4 * btc_usd_rows + report["file_rows_rejected"]


def test_bars_csv(replayed: tuple[Path, dict]) -> None:
    data_dir, _ = replayed
    proc = tickcast("bars", "--data-dir", str(data_dir), "--asset", "BTC-USD")
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.reader(io.StringIO(proc.stdout)))
    assert rows[0] == BARS_HEADER and len(rows) == 1 + 180
    first = dict(zip(BARS_HEADER, rows[1]))
    assert first["timestamp_utc"] == "2023-03-01T00:00:00Z"
    assert float(first["low"]) <= float(first["close"]) <= float(first["high"])
    assert int(first["providers"]) == 3 and first["imputed"] == ""

    proc = tickcast("bars", "--data-dir", str(data_dir), "--asset", "BTC-USD", "--provider", "kraken")
    rows = list(csv.reader(io.StringIO(proc.stdout)))
    assert proc.returncode == 0 and rows[0] == BARS_HEADER and 170 < len(rows) <= 181
    assert {r[8] for r in rows[1:]} == {"1"} and {r[9] for r in rows[1:]} == {"0.0"}


def test_gaps_csv(replayed: tuple[Path, dict]) -> None:
    data_dir, _ = replayed
    proc = tickcast("gaps", "--data-dir", str(data_dir), "--asset", "BTC-USD")
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.reader(io.StringIO(proc.stdout)))
    assert rows[0] == GAPS_HEADER
    assert all(len(r) == 5 and r[4] in ("true", "false") for r in rows[1:])


def test_ingest_sim_adds_injected_and_detected(tmp_path: Path) -> None:
    report = last_json(tickcast("ingest", "--source", "sim", "--assets", "BTC-USD,ETH-USD",
                                "--minutes", "60", "--seed", "7", "--data-dir", str(tmp_path)))
    for key in (*INGEST_KEYS, "injected", "detected", "clean_rejected_fraction"):
        assert key in report, key
    injected, detected = report["injected"], report["detected"]
    assert set(injected) == set(detected) and sum(injected.values()) > 0
    assert all(0 <= detected[k] <= injected[k] for k in injected)
    assert report["bars"] == 120  # two assets, sixty minutes
    assert 0.0 <= report["clean_rejected_fraction"] <= 1.0


@pytest.mark.parametrize("args, message", [
    (("ingest", "--source", "replay", "--path", "/nonexistent/bars.csv", "--assets", "BTC-USD"),
     "not found"),
    (("ingest", "--source", "sim", "--assets", "DOGE-USD", "--minutes", "1"), "unknown asset"),
    (("ingest", "--source", "replay", "--assets", "BTC-USD"), "--path"),
    (("ingest", "--source", "sim", "--assets", "BTC-USD", "--speed", "fast"), "--speed"),
    (("bars", "--asset", "DOGE-USD"), "unknown asset"),
    (("gaps", "--asset", "DOGE-USD"), "unknown asset"),
])
def test_user_errors_exit_2_with_a_clear_message(args: tuple[str, ...], message: str,
                                                 tmp_path: Path) -> None:
    proc = tickcast(*args, "--data-dir", str(tmp_path), timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_provider_exits_2(replayed: tuple[Path, dict]) -> None:
    data_dir, _ = replayed
    proc = tickcast("bars", "--data-dir", str(data_dir), "--asset", "BTC-USD", "--provider", "nyse")
    assert proc.returncode == 2 and "nyse" in proc.stderr and "kraken" in proc.stderr
