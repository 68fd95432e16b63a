"""Hyper-parameter search with Ray Tune: ASHA over walk-forward validation pinball loss.

The trainable is a plain function around the pure :func:`training.fit.fit_walk_forward`; it
reports the walk-forward validation loss every ``tune.report_every`` boosting rounds and ASHA
(grace ``tune.grace_rounds``, at most ``tune.max_rounds``) ends the trials that rank low at a
rung. Trials run in parallel, as many as the cluster's CPUs allow at ``tune.cpus_per_trial``
each. The fold arrays go to the object store once (``tune.with_parameters``).

This module only runs inside an existing Ray connection (see
:func:`tickcast.ray_runtime.connect_ray`): the caller decides whether that is a cluster, the
driver of a ``ray job submit`` job, or a private local instance.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from tickcast.config import Settings
from tickcast.errors import InvalidInput
from training.fit import FoldArrays, fit_walk_forward

METRIC = "pinball"

# The search space over XGBoost hyper-parameters (module level so it is visible and testable).
SEARCH_SPACE: dict[str, Any] = {
    "max_depth": tune.randint(2, 7),  # 2..6
    "eta": tune.loguniform(0.02, 0.3),
    "min_child_weight": tune.loguniform(1.0, 200.0),
    "subsample": tune.uniform(0.5, 1.0),
    "colsample_bytree": tune.uniform(0.5, 1.0),
    "lambda": tune.loguniform(0.1, 50.0),
    "alpha": tune.loguniform(1e-3, 1.0),
}


def train_quantile_model(config: dict[str, Any], folds: Sequence[FoldArrays],
                         quantiles: Sequence[float], max_rounds: int, report_every: int,
                         nthread: int, seed: int) -> None:
    """Tune trainable: walk-forward fit of ``config``, reporting every ``report_every`` rounds.

    Each report carries ``pinball`` (validation loss at this many rounds, what ASHA ranks),
    ``rounds``, and the best loss/rounds so far (what the final selection uses).
    """
    best = {"loss": math.inf, "rounds": 0}

    def report(rounds: int, loss: float) -> None:
        if loss < best["loss"]:
            best["loss"], best["rounds"] = loss, rounds
        tune.report({METRIC: loss, "rounds": rounds, "best_pinball": best["loss"],
                     "best_rounds": best["rounds"]})

    fit_walk_forward(config, folds, quantiles, max_rounds, report_every, nthread=nthread,
                     seed=seed, on_report=report)


@dataclass(frozen=True)
class TuneOutcome:
    """Best configuration found and what the search cost.

    Attributes
    ----------
    config
        Best hyper-parameters.
    rounds
        Boosting rounds at which that configuration scored best.
    loss
        Its walk-forward validation pinball loss.
    trials
        Trials run.
    stopped_early
        Trials ASHA ended before ``max_rounds``.
    errors
        Trials that failed.
    seconds
        Wall time of the search.
    concurrency
        Trials run at once.
    """

    config: dict[str, Any]
    rounds: int
    loss: float
    trials: int
    stopped_early: int
    errors: int
    seconds: float
    concurrency: int


def _cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


def run_tune(settings: Settings, folds: Sequence[FoldArrays], storage_dir: Path, name: str,
             trials: int | None = None, seed: int = 0, verbose: int = 1) -> TuneOutcome:
    """Search hyper-parameters on ``folds``; needs a live Ray connection.

    Parameters
    ----------
    settings
        ``tune.*`` (trials, rounds, grace, report period, CPUs per trial), ``model.quantiles``.
    folds
        Walk-forward fold arrays.
    storage_dir
        Where Tune keeps its experiment records (absolute; shared on a cluster).
    name
        Experiment name.
    trials
        Overrides ``tune.trials``.
    seed
        Seeds the search and XGBoost.
    verbose
        Tune's progress reporting (1: status table as trials progress).

    Raises
    ------
    InvalidInput
        Bad trial or round counts.
    RuntimeError
        Every trial failed.
    """
    t = settings.tune
    n_trials = int(trials if trials is not None else t.trials)
    if n_trials < 1:
        raise InvalidInput("trials must be >= 1", field="trials")
    if t.grace_rounds > t.max_rounds:
        raise InvalidInput("tune.grace_rounds must be <= tune.max_rounds", field="tune.grace_rounds")
    nthread = max(1, int(t.cpus_per_trial))
    concurrency = max(1, int(_cluster_cpus() // t.cpus_per_trial))
    # ASHA counts time in reports ("training_iteration"), one per report_every rounds.
    max_t = max(1, math.ceil(t.max_rounds / t.report_every))
    grace = max(1, min(max_t, t.grace_rounds // t.report_every))
    trainable = tune.with_resources(
        tune.with_parameters(train_quantile_model, folds=list(folds),
                             quantiles=tuple(settings.model.quantiles), max_rounds=t.max_rounds,
                             report_every=t.report_every, nthread=nthread, seed=seed),
        {"cpu": t.cpus_per_trial},
    )
    tuner = tune.Tuner(
        trainable,
        param_space=dict(SEARCH_SPACE),
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="min", num_samples=n_trials,
            scheduler=ASHAScheduler(max_t=max_t, grace_period=grace, reduction_factor=3),
            # The generator itself caps concurrency (Tune ignores max_concurrent_trials
            # when given a generator).
            search_alg=BasicVariantGenerator(random_state=seed, max_concurrent=concurrency),
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(name=name, storage_path=str(Path(storage_dir).resolve()),
                                  verbose=verbose),
    )
    start = time.monotonic()
    grid = tuner.fit()
    seconds = time.monotonic() - start
    ok = [r for r in grid if r.error is None and r.metrics and "best_pinball" in r.metrics]
    if not ok:
        first = next((r.error for r in grid if r.error is not None), None)
        raise RuntimeError(f"all {len(grid)} Tune trials failed: {first}")
    best = min(ok, key=lambda r: r.metrics["best_pinball"])
    stopped = sum(1 for r in ok if int(r.metrics.get("rounds", t.max_rounds)) < t.max_rounds)
    return TuneOutcome(
        config={k: best.config[k] for k in SEARCH_SPACE},
        rounds=int(best.metrics["best_rounds"]), loss=float(best.metrics["best_pinball"]),
        trials=len(grid), stopped_early=stopped, errors=len(grid) - len(ok),
        seconds=seconds, concurrency=concurrency,
    )
