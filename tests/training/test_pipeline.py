"""End to end on real Ray: train → register → backtest, through the CLI and the job entry point.

Synthetic bars with a known AR(1) signal (see conftest): the trained model must beat the random
walk out of sample, with a small Diebold-Mariano p-value. Tune runs on the session's Ray with
few trials and rounds (config overrides), which is what keeps this file fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import pytest

from tickcast.cli import main
from training import retrain
from training.engine import QuantilePredictor
from training.registry import ModelRegistry

ASSET = "BTC-USD"
SMALL = ["--set", "tune.max_rounds=30", "--set", "tune.grace_rounds=10",
         "--set", "tune.report_every=10", "--set", "model.walk_forward_folds=2"]


def _last_json(out: str) -> dict[str, Any]:
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, ray_session: None,
            synthetic_bars: Callable[..., pd.DataFrame], write_bars: Callable[..., int]
            ) -> dict[str, Any]:
    """One training run through ``tickcast train`` on 4 days of synthetic bars (3 train)."""
    data_dir = tmp_path_factory.mktemp("model_plane")
    write_bars(data_dir, ASSET, synthetic_bars(4 * 1440, seed=11))
    return {"data_dir": data_dir}


def test_train_registers_a_champion_that_beats_the_random_walk(
        trained: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    data_dir = trained["data_dir"]
    rc = main(["train", "--asset", ASSET, "--data-dir", str(data_dir), "--train-end",
               "2024-01-04", "--trials", "2", *SMALL])
    out = _last_json(capsys.readouterr().out)
    assert rc == 0
    assert out["alias"] == "champion"
    val = out["validation"]
    assert val["n"] > 1000 and 0.8 < val["coverage_90"] < 0.97
    assert out["dm_vs_random_walk"]["stat"] < 0 and out["dm_vs_random_walk"]["p"] < 0.01
    assert "beats the random walk" in val["verdict"]
    assert out["parity_max_abs_diff"] <= 1e-5 and out["trials"] == 2

    reg = ModelRegistry(data_dir / "registry")
    v = out["version"]
    assert reg.resolve(ASSET, "champion") == v
    card = reg.card(ASSET, v)
    assert card["training"]["end_exclusive_ns"] == int(pd.Timestamp("2024-01-04", tz="UTC").value)
    assert card["parent_version"] is None and card["conformal"]["n_scores"] > 0
    assert card["params"]["rounds"] >= 10 and card["metrics"]["dm_p"] < 0.01
    ref = reg.reference(ASSET, v)
    assert list(ref.columns) == ["ts", *card["feature_names"], "label"]
    assert ref["ts"].max() < pd.Timestamp(card["training"]["calibration_start"]).value
    # Both engines stored beside each other agree.
    pred = QuantilePredictor.from_dir(reg.path(ASSET, v), native_min_rows=2)
    x = ref[card["feature_names"]].to_numpy(np.float32)[:50]
    np.testing.assert_allclose(pred.predict(x), pred.predict_onnx(x), atol=1e-5, rtol=0)
    trained["version"] = v


def test_backtest_is_out_of_sample_and_writes_a_report(
        trained: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    data_dir = trained["data_dir"]
    rc = main(["backtest", "--asset", ASSET, "--data-dir", str(data_dir), "--model", "champion"])
    text = capsys.readouterr().out
    out = _last_json(text)
    assert rc == 0
    for key in ("coverage_90", "interval_width_bp", "mae", "pinball", "directional_accuracy",
                "directional_ci95", "sharpe", "dm_vs_random_walk", "n", "verdict"):
        assert key in out, key
    assert out["version"] == trained["version"] and out["start"] == "2024-01-04T00:00:00Z"
    assert not out["overlaps_training"] and out["n"] > 1300
    assert 0.85 <= out["coverage_90"] <= 0.95
    assert out["dm_vs_random_walk"]["stat"] < 0 and out["dm_vs_random_walk"]["p"] < 0.05
    assert out["directional_ci95"][0] > 0.5
    page, png = Path(out["report"]), Path(out["report_png"])
    assert page.parent == data_dir / "reports" and f"report: {page}" in text
    assert png.stat().st_size > 10_000 and "data:image/png;base64," in page.read_text()


def test_retrain_entry_point_adds_a_challenger_and_models_admin(
        trained: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    data_dir = trained["data_dir"]
    rc = retrain.main(["--asset", ASSET, "--data-dir", str(data_dir), "--train-end",
                       "2024-01-04", "--trials", "1", *SMALL])
    out = _last_json(capsys.readouterr().out)
    assert rc == 0 and out["alias"] == "challenger"
    reg = ModelRegistry(data_dir / "registry")
    assert reg.card(ASSET, out["version"])["parent_version"] == trained["version"]

    main(["models", "compare", "--asset", ASSET, "--data-dir", str(data_dir),
          "--version", "champion", "--other", "challenger"])
    cmp = _last_json(capsys.readouterr().out)
    assert set(cmp["metrics"]["pinball"]) == {"a", "b", "diff"}
    main(["models", "promote", "--asset", ASSET, "--data-dir", str(data_dir),
          "--version", "challenger"])
    assert _last_json(capsys.readouterr().out)["aliases"] == {
        "champion": out["version"], "previous": trained["version"]}
    main(["models", "rollback", "--asset", ASSET, "--data-dir", str(data_dir)])
    assert _last_json(capsys.readouterr().out)["aliases"] == {"champion": trained["version"]}


def test_cli_errors_name_the_culprit(trained: dict[str, Any],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    data_dir = str(trained["data_dir"])
    assert main(["backtest", "--asset", ASSET, "--data-dir", data_dir, "--model",
                 "challenger"]) == 2
    assert "alias 'challenger' is not set for BTC-USD" in capsys.readouterr().err
    assert main(["backtest", "--asset", ASSET, "--data-dir", data_dir, "--model",
                 "20990101T000000Z-000000"]) == 2
    assert "version '20990101T000000Z-000000' of BTC-USD not found" in capsys.readouterr().err
    assert main(["backtest", "--asset", "DOGE-USD", "--data-dir", data_dir]) == 2
    assert "unknown asset 'DOGE-USD'" in capsys.readouterr().err
    assert main(["backtest", "--asset", ASSET, "--data-dir", data_dir, "--start", "soon"]) == 2
    assert "(start)" in capsys.readouterr().err
    assert main(["train", "--asset", "ETH-USD", "--data-dir", data_dir]) == 2
    assert "no consensus bars of ETH-USD" in capsys.readouterr().err
    assert retrain.main(["--asset", ASSET, "--data-dir", data_dir, "--trials", "0"]) == 2
    assert "(trials)" in capsys.readouterr().err


def _consensus_bars_of(path: Path) -> pd.DataFrame:
    """BTC-USD consensus bars made by the data plane itself: replay -> AssetPipeline."""
    from tickcast.config import load_settings
    from tickcast.market.pipeline import AssetPipeline
    from tickcast.sources.replay import iter_replay_batches, read_bar_file

    replay = read_bar_file(path, (ASSET,))
    pipeline = AssetPipeline(ASSET, load_settings(env={}))
    frames = [pipeline.process(b).consensus_bars for b in iter_replay_batches(replay, ASSET, 20_000)]
    frames.append(pipeline.flush().consensus_bars)
    bars = pd.concat([f for f in frames if len(f)], ignore_index=True)
    return bars.drop_duplicates("ts", keep="last").sort_values("ts").reset_index(drop=True)


@pytest.mark.slow
def test_real_btc_train_march_1_to_7_backtest_8_to_9(
        tmp_path: Path, ray_session: None, shared_data_file: Path,
        write_bars: Callable[..., int], capsys: pytest.CaptureFixture[str]) -> None:
    # Issue 3's acceptance check, on bars from the data plane (three venues' consensus).
    write_bars(tmp_path, ASSET, _consensus_bars_of(shared_data_file))
    assert main(["train", "--asset", ASSET, "--data-dir", str(tmp_path), "--train-start",
                 "2023-03-01", "--train-end", "2023-03-08"]) == 0
    train = _last_json(capsys.readouterr().out)
    assert main(["backtest", "--asset", ASSET, "--data-dir", str(tmp_path), "--start",
                 "2023-03-08", "--end", "2023-03-10"]) == 0
    bt = _last_json(capsys.readouterr().out)
    print(json.dumps({"train": train, "backtest": bt}))  # the figures, for the record
    assert 0.87 <= bt["coverage_90"] <= 0.93
