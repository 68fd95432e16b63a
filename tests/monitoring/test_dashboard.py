"""The Grafana dashboard queries only the shared metric names, and covers all of them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tickcast.monitoring.metrics_names import (
    ALL_METRICS,
    LATENCY_BOUNDARIES_MS,
    METRICS,
    PROMETHEUS_PREFIX,
    SLA_TABLE,
    prometheus_names,
)

DASHBOARD = Path(__file__).resolve().parents[2] / "configs" / "grafana_dashboard.json"
SERIES = re.compile(r"\bray_tickcast_[a-z0-9_]+\b")


def _panels(items: list[dict]) -> list[dict]:
    out = []
    for p in items:
        out.append(p)
        out.extend(_panels(p.get("panels", [])))
    return out


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_every_panel_queries_known_metrics(dashboard: dict) -> None:
    known = {s: name for name in ALL_METRICS for s in prometheus_names(name)}
    panels = [p for p in _panels(dashboard["panels"]) if p["type"] != "row"]
    assert len(panels) >= 12
    for panel in panels:
        assert panel.get("targets"), panel["title"]
        for target in panel["targets"]:
            series = SERIES.findall(target["expr"])
            assert series, f"{panel['title']}: no tickcast metric in {target['expr']!r}"
            unknown = [s for s in series if s not in known]
            assert not unknown, f"{panel['title']}: unknown series {unknown}"


def test_every_metric_is_charted_and_the_sla_table_is_there(dashboard: dict) -> None:
    text = json.dumps(dashboard)
    used = {name for name in ALL_METRICS if any(s in text for s in prometheus_names(name))}
    assert used == set(ALL_METRICS)
    titles = [p["title"] for p in _panels(dashboard["panels"])]
    for needle in ("p99", "SLA violation", "Drift score", "gap", "Dedup", "consensus",
                   "Promotions", "rollbacks", "Regime", "rejected"):
        assert any(needle.lower() in t.lower() for t in titles), needle
    limits = {float(s["value"]) for p in _panels(dashboard["panels"]) if p["type"] == "stat"
              for s in p.get("fieldConfig", {}).get("defaults", {}).get("thresholds", {}).get("steps", [])
              if s["value"] is not None}
    for _, _, limit, _ in SLA_TABLE:
        assert limit in limits


def test_dashboard_is_importable_shape(dashboard: dict) -> None:
    panels = _panels(dashboard["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0
    names = [v["name"] for v in dashboard["templating"]["list"]]
    assert names == ["datasource", "asset"]
    assert dashboard["uid"] and dashboard["schemaVersion"] >= 30


def test_metric_specs_are_consistent() -> None:
    assert all(name.startswith("tickcast_") for name in ALL_METRICS)
    assert len(ALL_METRICS) == 17
    for spec in METRICS.values():
        assert spec.kind in {"counter", "gauge", "histogram"}
        assert spec.prometheus_name == PROMETHEUS_PREFIX + spec.name
        assert (spec.kind == "counter") == spec.name.endswith("_total")
    assert 150.0 in LATENCY_BOUNDARIES_MS
    assert list(LATENCY_BOUNDARIES_MS) == sorted(LATENCY_BOUNDARIES_MS)
