"""The simulator's injections scored against the real per-asset pipeline (H1's AssetPipeline)."""

from __future__ import annotations

import numpy as np

from tickcast.config import load_settings
from tickcast.market.pipeline import AssetPipeline
from tickcast.sources.simulator import MarketSimulator, score_detection


def test_pipeline_catches_injected_nulls_jumps_duplicates_and_spares_clean_ticks() -> None:
    settings = load_settings(overrides=["simulator.anomaly_rate=0.03"])
    sim = MarketSimulator.from_settings(settings, seed=17)
    pipes = {a: AssetPipeline(a, settings) for a in settings.assets}
    statuses: dict[str, list[np.ndarray]] = {a: [] for a in settings.assets}
    for batch in sim.run(20):
        pipes[batch.asset].process(batch)  # sets statuses in place
        statuses[batch.asset].append(batch.status.copy())

    labels = np.concatenate([sim.labels(a) for a in settings.assets])
    status = np.concatenate([np.concatenate(statuses[a]) for a in settings.assets])
    injected, detected, clean_rejected = score_detection(labels, status)
    assert injected == sim.injected
    for kind in ("null", "jump", "duplicate"):
        assert injected[kind] >= 40, (kind, injected[kind])
        assert detected[kind] >= 0.99 * injected[kind], (kind, injected[kind], detected[kind])
    assert clean_rejected <= 0.001, clean_rejected
    # Stale stretches: every tick labelled "frozen" (older than frozen_after_s; the younger
    # "stale" ones are not scored) is caught, despite the provider's late/out-of-order ticks.
    assert injected["frozen"] >= 200, injected["frozen"]
    assert detected["frozen"] >= 0.95 * injected["frozen"], (injected["frozen"], detected["frozen"])
