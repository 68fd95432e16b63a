"""The closed-loop pure parts on the real multi-venue BTC file (read in place)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tickcast.config import SafetyConfig
from tickcast.monitoring.detectors import PageHinkleyDetector
from tickcast.monitoring.safety import REGIMES, SafetyState


@pytest.fixture(scope="module")
def closes(shared_data_file: Path) -> np.ndarray:
    df = pd.read_csv(shared_data_file, usecols=["timestamp_utc", "venue", "symbol", "close"])
    one = df[(df["venue"] == "binanceus") & (df["symbol"] == "BTC/USD")]
    return one.sort_values("timestamp_utc")["close"].to_numpy(dtype=float)


def test_regimes_on_real_bars_follow_thresholds_and_hysteresis(closes: np.ndarray) -> None:
    cfg = SafetyConfig()
    state = SafetyState(cfg, fee_bp=1.0)
    statuses = [state.update(c) for c in closes]
    counts = Counter(s.regime for s in statuses)
    assert set(counts) == set(REGIMES) and counts["NORMAL"] > counts["ELEVATED"] > counts["CRISIS"]
    changes = [e for s in statuses for e in s.events if e["type"] == "regime"]
    assert changes
    for e in changes:
        up = REGIMES.index(e["to"]) > REGIMES.index(e["from"])
        if up:  # stepping up: the ratio crossed the new regime's threshold on that bar
            limit = cfg.crisis_ratio if e["to"] == "CRISIS" else cfg.elevated_ratio
            assert e["ratio"] >= limit and e["bars_below"] == 0
        else:  # stepping down: only after recovery_bars bars below the current regime
            assert e["bars_below"] == cfg.recovery_bars
        assert e["multiplier"] == cfg.multipliers[e["to"]]


def test_warmup_tames_detector_alarms_on_real_rolling_features(closes: np.ndarray) -> None:
    r = np.diff(np.log(closes))
    frame = pd.DataFrame({"ret_1": r, "ret_10": pd.Series(r).rolling(10).sum(),
                          "rv_30": pd.Series(r).rolling(30).std()}).dropna()
    ref = frame.iloc[:4000].sample(2000, random_state=0)
    live = frame.iloc[4000:].to_numpy()
    kw = {"mean": ref.mean().to_numpy(), "std": ref.std(ddof=0).to_numpy()}
    plain = PageHinkleyDetector(**kw)
    warm = PageHinkleyDetector(**kw, warmup=500)
    n_plain, n_warm = len(plain.update(live)), len(warm.update(live))
    assert warm.inflation[0] < 1.5 and warm.inflation[1] > 5 and warm.inflation[2] > 5
    assert n_warm * 5 < n_plain
