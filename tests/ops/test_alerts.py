"""The SLA alert rules (``configs/alerts.yml``): promtool accepts them, their unit tests pass,
and they are written on the project's metric names and thresholds.

promtool comes with Debian's ``prometheus`` package (``make tools`` installs it; CI does).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tickcast.config import load_settings
from tickcast.monitoring import metrics_names as mn

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "configs" / "alerts.yml"
RULES_TEST = ROOT / "configs" / "alerts_test.yml"

# The SLA table's rows, their action and the threshold the issue gives for the action.
ACTIONS: dict[str, tuple[str, str, float]] = {
    # sla label: (metric of the row, action, threshold)
    "latency_p99": (mn.REQUEST_LATENCY_MS, "alert", 180.0),
    "sla_violations": (mn.SLA_VIOLATIONS_TOTAL, "escalate", 0.05),
    "drift_score": (mn.DRIFT_SCORE, "retrain", 0.2),
    "data_gap": (mn.GAP_MINUTES, "investigate", 30.0),
    "dedup_rate": (mn.DUPLICATES_TOTAL, "review", 0.02),
    "provider_consensus": (mn.PROVIDER_AGREEMENT, "flag", 0.8),
}


def _promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool not installed (`make tools`, or apt-get install prometheus)")
    return tool


def _alerts() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_promtool_check_rules_accepts_them() -> None:
    out = subprocess.run([_promtool(), "check", "rules", str(RULES)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in out.stdout


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    out = subprocess.run([_promtool(), "test", "rules", str(RULES_TEST)], capture_output=True,
                         text=True, timeout=120, cwd=RULES_TEST.parent)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_every_rule_has_a_unit_test() -> None:
    tested = {t["alertname"] for case in yaml.safe_load(RULES_TEST.read_text())["tests"]
              for t in case.get("alert_rule_test", [])}
    firing = {t["alertname"] for case in yaml.safe_load(RULES_TEST.read_text())["tests"]
              for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}
    names = {r["alert"] for r in _alerts()}
    assert names == tested == firing


def test_all_six_sla_rows_have_their_action_on_project_metrics() -> None:
    known = {name for metric in mn.METRICS for name in mn.prometheus_names(metric)}
    rows: dict[str, list[dict[str, Any]]] = {}
    for rule in _alerts():
        expr = rule["expr"]
        used = set(re.findall(r"\bray_tickcast_\w+", expr))
        assert used <= known, f"{rule['alert']} uses unknown series {used - known}"
        assert rule["labels"]["severity"] in ("info", "warning", "critical")
        assert {"summary", "description"} <= set(rule["annotations"])
        if "sla" in rule["labels"]:
            rows.setdefault(rule["labels"]["sla"], []).append(rule)
    assert set(rows) == set(ACTIONS)
    for sla, (metric, action, threshold) in ACTIONS.items():
        rule = rows[sla][0]  # the row's main rule (gaps have a second, the silent feed)
        assert rule["labels"]["action"] == action, sla
        assert mn.prometheus_names(metric)[0] in rule["expr"], sla
        m = re.search(r"([<>]=?)\s*([0-9.]+)\s*$", rule["expr"].strip())
        assert m is not None and float(m.group(2)) == threshold, (sla, rule["expr"])
    # Every row of the metrics module's SLA table is covered.
    assert {row[0] for row in mn.SLA_TABLE} == {metric for metric, _a, _t in ACTIONS.values()}


def test_drift_alert_threshold_is_the_controllers_retrain_score() -> None:
    rule = next(r for r in _alerts() if r["labels"].get("sla") == "drift_score")
    threshold = float(rule["expr"].rsplit(">", 1)[1])
    assert threshold == load_settings().drift.retrain_score


def test_sla_violations_rule_counts_the_configured_latency_sla() -> None:
    # The counter counts requests slower than serve.sla_latency_ms; the rule's text names it.
    rule = next(r for r in _alerts() if r["labels"].get("sla") == "sla_violations")
    assert f"{load_settings().serve.sla_latency_ms:g} ms" in rule["annotations"]["description"]
