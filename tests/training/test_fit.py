"""Pure walk-forward fitting (no Ray): reports, best round count, out-of-fold predictions."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd
import pytest

from tickcast.config import load_settings
from tickcast.errors import InvalidInput
from training.dataset import build_dataset, walk_forward_folds
from training.fit import (DEFAULT_CONFIG, TUNABLE, booster_params, fit_final, fit_walk_forward,
                          fold_arrays, mean_pinball)
from training.tuning import SEARCH_SPACE

Q = (0.05, 0.5, 0.95)
NS_PER_MIN = 60_000_000_000


@pytest.fixture(scope="module")
def folds(synthetic_bars: Callable[..., pd.DataFrame]) -> list:
    cfg = load_settings(env={})
    ds = build_dataset(synthetic_bars(2500, seed=1), cfg)
    return fold_arrays(ds, walk_forward_folds(ds.ts, 2, 1, 30, NS_PER_MIN))


def test_walk_forward_reports_every_n_rounds_and_keeps_the_best(folds: list) -> None:
    seen: list[tuple[int, float]] = []
    res = fit_walk_forward(DEFAULT_CONFIG, folds, Q, max_rounds=25, report_every=10,
                           on_report=lambda r, loss: seen.append((r, loss)),
                           keep_predictions=True)
    assert [r for r, _ in seen] == [10, 20, 25]  # every 10 rounds and after the last
    assert res.history == seen
    assert res.best_loss == min(loss for _, loss in seen)
    assert dict(seen)[res.best_rounds] == res.best_loss
    assert [p.shape for p in res.predictions] == [(len(f.y_val), 3) for f in folds]
    # The reported loss is the pinball of those predictions, weighted by fold size.
    n = np.array([len(f.y_val) for f in folds], dtype=float)
    losses = [mean_pinball(f.y_val, p, Q) for f, p in zip(folds, res.predictions)]
    assert res.best_loss == pytest.approx(float(np.dot(n / n.sum(), losses)), rel=1e-4)


def test_model_learns_the_synthetic_signal(folds: list) -> None:
    res = fit_walk_forward(DEFAULT_CONFIG, folds, Q, max_rounds=60, report_every=20,
                           keep_predictions=True)
    last = folds[-1]
    q50 = res.predictions[-1][:, 1]
    # AR(1) with phi = 0.35: the median forecast tracks the next return out of sample.
    assert np.corrcoef(q50, last.y_val)[0, 1] > 0.2
    booster = fit_final(DEFAULT_CONFIG, last.x_train, last.y_train, Q, rounds=res.best_rounds)
    assert booster.num_boosted_rounds() == res.best_rounds


def test_params_are_validated() -> None:
    p = booster_params({"max_depth": 4.0, "eta": "0.1"}, Q, nthread=1)
    assert p["max_depth"] == 4 and p["eta"] == 0.1 and p["quantile_alpha"] == list(Q)
    with pytest.raises(InvalidInput) as info:
        booster_params({"depth": 3}, Q, nthread=1)
    assert info.value.field == "params.depth"
    with pytest.raises(InvalidInput) as info:
        booster_params({"eta": "fast"}, Q, nthread=1)
    assert info.value.field == "params.eta"
    assert set(SEARCH_SPACE) <= set(TUNABLE)  # every searched key is a valid parameter


def test_bad_round_counts_and_empty_data_are_rejected(folds: list) -> None:
    with pytest.raises(InvalidInput):
        fit_walk_forward(DEFAULT_CONFIG, [], Q, 10, 5)
    with pytest.raises(InvalidInput):
        fit_walk_forward(DEFAULT_CONFIG, folds, Q, 0, 5)
    with pytest.raises(InvalidInput) as info:
        fit_final(DEFAULT_CONFIG, np.empty((0, 3), np.float32), np.empty(0), Q, 5)
    assert info.value.field == "bars"
