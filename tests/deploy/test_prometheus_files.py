"""config/prometheus and config/grafana: promtool accepts them, the alerts fire when they should
(`promtool test rules` on synthetic series), and every metric and label they query is one that
ebcd exports (ebcd/metrics.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import Info
from prometheus_client.metrics import MetricWrapperBase

from ebcd.delivery.state import AState as AlertState
from ebcd.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "config/prometheus/ebcd-rules.yml"
SCRAPE = ROOT / "config/prometheus/prometheus-scrape.yml"
DASHBOARD = ROOT / "config/grafana/ebcd-district.json"
SEVERITIES = {"critical", "warning", "info"}
# Labels Prometheus adds to every series it scrapes (job, instance) or that the scrape config adds.
TARGET_LABELS = {"job", "instance", "district"}
# Label values ebcd sets that are not pre-declared in its registry (the rest are read from it).
KNOWN_VALUES: dict[tuple[str, str], set[str]] = {
    ("ebcd_alerts_in_state", "state"): {s.value for s in AlertState},
    ("ebcd_queue_depth", "queue"): {"ingest", "mqtt_outgoing"},
}
# Grafana's variables, replaced by something PromQL accepts to check a panel's query.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$instance": ".*"}
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and"}
PROMQL_KEYWORDS |= {"or", "unless", "le", "inf", "nan"}


def promtool() -> str:
    """promtool's path; skip if missing, but fail in CI (CI=...), where it must be installed."""
    path = shutil.which("promtool")
    if path is None:
        message = "promtool is not installed: apt-get install prometheus (it provides /usr/bin/promtool)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def run_promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def exported_series() -> dict[str, set[str]]:
    """Every series name ebcd's registry exposes → the label names it may carry."""
    series: dict[str, set[str]] = {}
    for metric in vars(Metrics()).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        # Not public API, but stable for years: the declared name, type and label names.
        name, kind = metric._name, metric._type
        labels = set(metric._labelnames)
        if isinstance(metric, Info):
            series[f"{name}_info"] = {"version"}
        elif kind == "counter":
            series[f"{name}_total"] = labels
        elif kind == "histogram":
            series[f"{name}_bucket"] = labels | {"le"}
            series[f"{name}_sum"] = series[f"{name}_count"] = labels
        else:
            series[name] = labels
    return series


def known_label_values() -> dict[tuple[str, str], set[str]]:
    """(series, label) → the values ebcd uses, for the labels whose values are closed sets."""
    known = {key: set(values) for key, values in KNOWN_VALUES.items()}
    for family in Metrics().registry.collect():
        for sample in family.samples:
            for label, value in sample.labels.items():
                known.setdefault((sample.name, label), set()).add(value)
    return known


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, expression) of every query of the dashboard."""
    doc = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"]) for panel in doc["panels"] for target in panel.get("targets", [])
    ]


def check_expression(where: str, expr: str, series: dict[str, set[str]]) -> list[str]:
    """What is wrong with the metric names and label matchers of one PromQL expression."""
    problems = []
    known = known_label_values()
    names = set(re.findall(r"\b(ebcd_[a-z0-9_]+)", expr))
    for name in sorted(names - set(series)):
        problems.append(f"{where}: {name} is not exported by ebcd")
    for name, matchers in re.findall(r"\b(ebcd_[a-z0-9_]+|up)\s*\{([^}]*)\}", expr):
        labels = series.get(name, set()) | TARGET_LABELS
        for label, op, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', matchers):
            if label not in labels:
                problems.append(f"{where}: {name} has no label {label}")
            values = known.get((name, label))
            if values is None or value.startswith("$"):
                continue
            used = value.split("|") if op in ("=~", "!~") else [value]
            problems += [f"{where}: {name}{{{label}}} is never {v!r}" for v in used if v not in values]
    return problems


def test_rules_pass_promtool_check() -> None:
    done = run_promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules())} rules found" in done.stdout


def test_scrape_config_passes_promtool_check() -> None:
    done = run_promtool("check", "config", SCRAPE.name, cwd=SCRAPE.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    doc = yaml.safe_load(SCRAPE.read_text())
    assert doc["rule_files"] == [RULES.name]
    (job,) = [job for job in doc["scrape_configs"] if job["job_name"] == "ebcd"]
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:9469"]


def test_every_rule_has_severity_summary_and_description() -> None:
    names = [rule["alert"] for rule in rules()]
    assert len(names) == len(set(names)), "alert names must be unique"
    for rule in rules():
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]
        assert rule["alert"].startswith("Ebcd"), rule["alert"]


def test_rules_and_dashboard_query_only_what_ebcd_exports() -> None:
    series = exported_series()
    problems = [p for rule in rules() for p in check_expression(rule["alert"], rule["expr"], series)]
    problems += [p for title, expr in dashboard_targets() for p in check_expression(title, expr, series)]
    assert problems == []


def test_the_checker_catches_a_wrong_name_and_label() -> None:
    series = exported_series()
    assert check_expression("x", 'ebcd_terminals{state="offline"}', series) == []
    assert check_expression("x", "rate(ebcd_delivery_latency_seconds_bucket[5m])", series) == []
    assert check_expression("x", "ebcd_deliveries", series)  # a counter is queried with _total
    assert check_expression("x", 'ebcd_terminals{town="1"}', series)
    assert check_expression("x", 'ebcd_terminals{state="gone"}', series)
    assert check_expression("x", 'ebcd_alerts_in_state{state=~"partial|done"}', series)


def test_dashboard_is_a_grafana_dashboard() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert 36 <= doc["schemaVersion"] <= 41
    assert doc["uid"] == "ebcd-district"
    assert doc["title"]
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = doc["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    occupied: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {
            (x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
    # What the district's duty room asked for.
    exprs = " ".join(expr for _, expr in dashboard_targets())
    for needed in (
        "ebcd_alerts_in_state",
        'ebcd_deliveries_total{instance=~"$instance", outcome="acked"}',
        "sum by (outcome, transport) (rate(ebcd_deliveries_total",
        "histogram_quantile(0.99, sum by (le) (rate(ebcd_delivery_latency_seconds_bucket",
        "ebcd_terminals",
        "ebcd_mqtt_connected",
        "ebcd_queue_depth",
        "ebcd_dropped_messages_total",
        "ebcd_rejected_messages_total",
        "ebcd_journal_commit_seconds_bucket",
        "group_left (name, lat, lon)",  # the map: towns where their terminals are
    ):
        assert needed in exprs, needed
    (geomap,) = [p for p in panels if p["type"] == "geomap"]
    location = geomap["options"]["layers"][0]["location"]
    assert (location["mode"], location["latitude"], location["longitude"]) == ("coords", "lat", "lon")


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    # promtool has no "check this expression": each query becomes a recording rule instead.
    recorded = []
    for i, (_, expr) in enumerate(dashboard_targets()):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"unknown Grafana variable in {expr}"
        recorded.append({"record": f"dashboard:query:{i}", "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recorded}]}))
    done = run_promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


# Synthetic series at one-minute steps and the alerts they must (or must not) raise. The rules
# are tested without their annotations: promtool would otherwise want every text verbatim.
RULE_TESTS = """
evaluation_interval: 1m
tests:
  - name: scrape target down, then no target at all
    interval: 1m
    input_series:
      - {series: 'up{job="ebcd",instance="h:9469"}', values: '1 0 0 0'}
      - {series: 'up{job="node",instance="h:9100"}', values: '1x20'}
    alert_rule_test:
      - {eval_time: 1m, alertname: EbcdDown, exp_alerts: []}
      - eval_time: 3m
        alertname: EbcdDown
        exp_alerts: [{exp_labels: {severity: critical, job: ebcd, instance: "h:9469"}}]
      - {eval_time: 3m, alertname: EbcdNotScraped, exp_alerts: []}
      # The last sample (3m) goes stale after 5 minutes; then absent() holds for 5 minutes.
      - eval_time: 14m
        alertname: EbcdNotScraped
        exp_alerts: [{exp_labels: {severity: critical, job: ebcd}}]
  - name: broker connection
    interval: 1m
    input_series:
      - {series: 'ebcd_mqtt_connected{job="ebcd",instance="h:9469"}', values: '1 1 0 0 0'}
      - {series: 'ebcd_mqtt_connects_total{job="ebcd",instance="h:9469"}', values: '1+1x20'}
      - {series: 'ebcd_mqtt_connects_total{job="ebcd",instance="calm:9469"}', values: '1x20'}
    alert_rule_test:
      - {eval_time: 2m, alertname: EbcdMqttDisconnected, exp_alerts: []}
      - eval_time: 4m
        alertname: EbcdMqttDisconnected
        exp_alerts: [{exp_labels: {severity: critical, job: ebcd, instance: "h:9469"}}]
      - eval_time: 16m
        alertname: EbcdMqttFlapping
        exp_alerts: [{exp_labels: {severity: warning, job: ebcd, instance: "h:9469"}}]
  - name: terminals offline, 9 % on one instance and 1.3 % on another
    interval: 1m
    input_series:
      - {series: 'ebcd_terminals{job="ebcd",instance="a",state="online"}', values: '769 700x20'}
      - {series: 'ebcd_terminals{job="ebcd",instance="a",state="offline"}', values: '0 69x20'}
      - {series: 'ebcd_terminals{job="ebcd",instance="a",state="unknown"}', values: '0x20'}
      - {series: 'ebcd_terminals{job="ebcd",instance="b",state="online"}', values: '759x20'}
      - {series: 'ebcd_terminals{job="ebcd",instance="b",state="offline"}', values: '10x20'}
    alert_rule_test:
      - {eval_time: 6m, alertname: EbcdTerminalsOffline, exp_alerts: []}
      - eval_time: 12m
        alertname: EbcdTerminalsOffline
        exp_alerts: [{exp_labels: {severity: warning, job: ebcd, instance: a}}]
  - name: an alert ends partial; a partial one from before does not alert again
    interval: 1m
    input_series:
      - {series: 'ebcd_alerts_in_state{job="ebcd",instance="a",state="partial"}', values: '0 0 0 1x30'}
      - {series: 'ebcd_alerts_in_state{job="ebcd",instance="b",state="partial"}', values: '2x30'}
      - {series: 'ebcd_alerts_in_state{job="ebcd",instance="a",state="completed"}', values: '0+1x30'}
    alert_rule_test:
      - {eval_time: 2m, alertname: EbcdAlertPartial, exp_alerts: []}
      - eval_time: 5m
        alertname: EbcdAlertPartial
        exp_alerts: [{exp_labels: {severity: critical, job: ebcd, instance: a, state: partial}}]
      - {eval_time: 25m, alertname: EbcdAlertPartial, exp_alerts: []}
  - name: terminals missed the test broadcast
    interval: 1m
    input_series:
      - {series: 'ebcd_test_broadcast_missed_terminals{job="ebcd",instance="a"}', values: '0 0 3x10'}
    alert_rule_test:
      - {eval_time: 4m, alertname: EbcdTestBroadcastMissed, exp_alerts: []}
      - eval_time: 8m
        alertname: EbcdTestBroadcastMissed
        exp_alerts: [{exp_labels: {severity: warning, job: ebcd, instance: a}}]
  - name: dropped messages
    interval: 1m
    input_series:
      - series: 'ebcd_dropped_messages_total{job="ebcd",instance="a",where="ingest_queue"}'
        values: '0 0 0 2x10'
      - series: 'ebcd_dropped_messages_total{job="ebcd",instance="a",where="mqtt_outgoing"}'
        values: '0 0 5x10'
    alert_rule_test:
      - {eval_time: 1m, alertname: EbcdUpstreamAlertDropped, exp_alerts: []}
      - eval_time: 4m
        alertname: EbcdUpstreamAlertDropped
        exp_alerts: [{exp_labels: {severity: critical, job: ebcd, instance: a, where: ingest_queue}}]
      - eval_time: 3m
        alertname: EbcdMessagesDropped
        exp_alerts: [{exp_labels: {severity: warning, job: ebcd, instance: a, where: mqtt_outgoing}}]
      - {eval_time: 12m, alertname: EbcdMessagesDropped, exp_alerts: []}
  - name: rejected upstream messages; duplicates are normal
    interval: 1m
    input_series:
      - {series: 'ebcd_rejected_messages_total{job="ebcd",instance="a",reason="duplicate"}', values: '0+5x30'}
      - series: 'ebcd_rejected_messages_total{job="ebcd",instance="a",reason="schema"}'
        values: '0 0 1x5 2+1x20'
    alert_rule_test:
      - eval_time: 4m
        alertname: EbcdUpstreamRejected
        exp_alerts: [{exp_labels: {severity: info, job: ebcd, instance: a, reason: schema}}]
      - {eval_time: 4m, alertname: EbcdUpstreamRejectionsRising, exp_alerts: []}
      - eval_time: 20m
        alertname: EbcdUpstreamRejectionsRising
        exp_alerts: [{exp_labels: {severity: warning, job: ebcd, instance: a}}]
  - name: journal commits slow on one instance, fast on another
    interval: 1m
    input_series:
      - {series: 'ebcd_journal_commit_seconds_bucket{job="ebcd",instance="a",le="0.25"}', values: '0+1x30'}
      - {series: 'ebcd_journal_commit_seconds_bucket{job="ebcd",instance="a",le="1.0"}', values: '0+100x30'}
      - {series: 'ebcd_journal_commit_seconds_bucket{job="ebcd",instance="a",le="+Inf"}', values: '0+100x30'}
      - {series: 'ebcd_journal_commit_seconds_bucket{job="ebcd",instance="b",le="0.01"}', values: '0+100x30'}
      - {series: 'ebcd_journal_commit_seconds_bucket{job="ebcd",instance="b",le="+Inf"}', values: '0+100x30'}
    alert_rule_test:
      - {eval_time: 8m, alertname: EbcdJournalCommitSlow, exp_alerts: []}
      - eval_time: 20m
        alertname: EbcdJournalCommitSlow
        exp_alerts: [{exp_labels: {severity: warning, job: ebcd, instance: a}}]
  - name: queue backlog
    interval: 1m
    input_series:
      - {series: 'ebcd_queue_depth{job="ebcd",instance="a",queue="mqtt_outgoing"}', values: '15000x10'}
      - {series: 'ebcd_queue_depth{job="ebcd",instance="a",queue="ingest"}', values: '10x10'}
    alert_rule_test:
      - eval_time: 5m
        alertname: EbcdQueueBacklog
        exp_alerts: [{exp_labels: {severity: warning, job: ebcd, instance: a, queue: mqtt_outgoing}}]
"""


def test_alerts_fire_when_they_should(tmp_path: Path) -> None:
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    bare = tmp_path / "rules.yml"
    bare.write_text(yaml.safe_dump(doc, allow_unicode=True))
    tests = yaml.safe_load(RULE_TESTS)
    tests["rule_files"] = [str(bare)]
    tested = {case["alertname"] for test in tests["tests"] for case in test["alert_rule_test"]}
    assert tested == {rule["alert"] for rule in rules()}, "every alert needs a case here"
    path = tmp_path / "rules-test.yml"
    path.write_text(yaml.safe_dump(tests))
    done = run_promtool("test", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
