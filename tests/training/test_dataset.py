"""Dataset building and time splits: ordered, purged, no label looks past the range."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest

from tickcast.config import Settings, load_settings
from tickcast.errors import InvalidInput
from tickcast.features.definitions import FEATURE_NAMES, schema_hash
from training.dataset import (build_dataset, load_bars, parse_time, purge_before,
                              split_calibration, walk_forward_folds)

NS_PER_MIN = 60_000_000_000


@pytest.fixture
def cfg(tmp_path: Path) -> Settings:
    return load_settings(env={}, overrides=[f"data_dir={tmp_path}"])


def test_build_dataset_from_the_store(cfg: Settings, tmp_path: Path,
                                      synthetic_bars: Callable[..., pd.DataFrame],
                                      write_bars: Callable[..., int]) -> None:
    bars = synthetic_bars(600)
    write_bars(tmp_path, "BTC-USD", bars)
    loaded = load_bars(cfg, "BTC-USD")
    ds = build_dataset(loaded, cfg)
    assert ds.feature_names == FEATURE_NAMES and ds.schema_hash == schema_hash(cfg.features)
    assert ds.features.dtype == np.float32 and ds.features.shape == (599, len(FEATURE_NAMES))
    assert np.all(np.diff(ds.ts) > 0)  # time order, never shuffled
    # Label of bar t is log(close_{t+1} / close_t).
    close = bars.set_index("ts")["close"]
    t = int(ds.ts[100])
    assert ds.labels[100] == pytest.approx(np.log(close[t + NS_PER_MIN] / close[t]))
    assert ds.close[100] == close[t]
    assert list(ds.frame().columns) == list(FEATURE_NAMES)


def test_training_labels_never_look_past_the_range_end(
        cfg: Settings, tmp_path: Path, synthetic_bars: Callable[..., pd.DataFrame],
        write_bars: Callable[..., int]) -> None:
    bars = synthetic_bars(600)
    write_bars(tmp_path, "BTC-USD", bars)
    end = int(bars["ts"].iloc[400])
    train = build_dataset(load_bars(cfg, "BTC-USD", None, end), cfg, None, end)
    # The last training row's label needs the bar at `end`: it is not there, so no row at end-1.
    assert train.ts[-1] + cfg.model.horizon * NS_PER_MIN < end
    # A backtest range realizes the labels of its last rows, and its first rows are warm.
    test = build_dataset(load_bars(cfg, "BTC-USD", end, None, realize_labels=True), cfg, end)
    assert test.ts[0] == end
    assert np.isfinite(test.features[0]).all()


def test_walk_forward_folds_expand_and_are_purged() -> None:
    ts = np.arange(2000, dtype=np.int64) * NS_PER_MIN
    ts = np.delete(ts, np.s_[700:760])  # a gap: purging is by time, not by row count
    folds = walk_forward_folds(ts, 3, horizon=1, purge_bars=60, freq=NS_PER_MIN)
    assert len(folds) == 3
    prev_val_end = -1
    for k, fold in enumerate(folds):
        assert np.all(np.diff(fold.train) == 1) and np.all(np.diff(fold.val) == 1)
        assert fold.train[0] == 0  # expanding window
        # Purge honoured: last training label ends 60 bars before the first validation bar.
        assert ts[fold.train[-1]] + (1 + 60) * NS_PER_MIN <= ts[fold.val[0]]
        assert ts[fold.train[-1]] + (1 + 61) * NS_PER_MIN > ts[fold.val[0]]
        assert fold.val[0] > prev_val_end  # validation chunks follow each other in time
        prev_val_end = int(fold.val[-1])
        if k:
            assert len(fold.train) > len(folds[k - 1].train)
    assert folds[-1].val[-1] == len(ts) - 1


def test_calibration_slice_is_last_and_purged(cfg: Settings,
                                              synthetic_bars: Callable[..., pd.DataFrame]) -> None:
    ds = build_dataset(synthetic_bars(1000), cfg)
    fit, cal = split_calibration(ds, 0.2, horizon=1, purge_bars=60, freq=NS_PER_MIN)
    assert len(cal) == round(len(ds) * 0.2) and cal[-1] == len(ds) - 1
    assert ds.ts[fit[-1]] + 61 * NS_PER_MIN <= ds.ts[cal[0]]
    assert purge_before(ds.ts[fit], int(ds.ts[cal[0]]), 1, 60, NS_PER_MIN).all()


def test_too_little_data_is_a_clear_error(cfg: Settings,
                                          synthetic_bars: Callable[..., pd.DataFrame]) -> None:
    ts = np.arange(100, dtype=np.int64) * NS_PER_MIN
    with pytest.raises(InvalidInput) as info:
        walk_forward_folds(ts, 3, horizon=1, purge_bars=60, freq=NS_PER_MIN)
    assert info.value.field in ("model.walk_forward_folds", "model.purge_bars")
    bars = synthetic_bars(200)
    with pytest.raises(InvalidInput) as info:
        build_dataset(bars, cfg, start_ns=int(bars["ts"].iloc[-1]) + NS_PER_MIN)
    assert info.value.field == "bars"


def test_parse_time_accepts_iso_and_names_bad_fields() -> None:
    assert parse_time("2023-03-08", "x") == int(pd.Timestamp("2023-03-08T00:00:00Z").value)
    assert parse_time("2023-03-08T01:00:00+01:00", "x") == parse_time("2023-03-08", "x")
    assert parse_time(5, "x") == 5 and parse_time(None, "x") is None
    with pytest.raises(InvalidInput) as info:
        parse_time("March eighth", "train_end")
    assert info.value.field == "train_end"
