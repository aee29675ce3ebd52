"""deploy/grafana/backup-tasks.json: a dashboard Grafana can import, showing metrics that exist.

Grafana accepts a dashboard with overlapping panels, duplicate ids or a metric nobody exports, and
shows empty or garbled panels; so the structure is checked here, every PromQL expression is parsed
by promtool, and every metric name in the dashboard and the alert rules is one the exporter (or
Flower) serves.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
from collections.abc import Iterator
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.prometheus import DASHBOARD, ISSUE_METRICS, RULES, prometheus_tool

DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
METRIC = re.compile(r"\b(?:backup_tasks_|flower_)\w+")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
#: What Grafana substitutes into an expression before sending it; any value parses.
GRAFANA_VARIABLES = re.compile(r"\$\{?(\w+)\}?")


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def graph_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [panel for panel in dashboard["panels"] if panel["type"] != "row"]


def expressions(dashboard: dict[str, Any]) -> Iterator[str]:
    for panel in graph_panels(dashboard):
        for target in panel["targets"]:
            yield target["expr"]


def rule_expressions() -> Iterator[str]:
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            yield rule["expr"]


def metric_names(expr: str) -> set[str]:
    """The backup_tasks_* and flower_* series an expression reads (label values in quotes are not names)."""
    return set(METRIC.findall(STRING.sub('""', expr)))


def exporter_metrics() -> set[str]:
    """What ``backup-tasks metrics`` can serve: its own list of names."""
    from backup_tasks.observe.metrics import METRIC_NAMES

    return set(METRIC_NAMES)


def flower_metrics() -> set[str]:
    """The metric names Flower's events module defines, with a histogram's series suffixes."""
    import flower.events

    tree = ast.parse(Path(flower.events.__file__).read_text())
    names = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
             and isinstance(node.value, str) and re.fullmatch(r"flower_\w+", node.value)}
    return names | {name + suffix for name in names for suffix in ("_bucket", "_sum", "_count")}


def test_grafana_can_import_it(dashboard: dict[str, Any]) -> None:
    assert dashboard["title"] and re.fullmatch(r"[\w-]{1,40}", dashboard["uid"])
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert all(isinstance(i, int) for i in ids) and len(set(ids)) == len(ids), "panel ids must be unique integers"
    boxes = []
    for panel in panels:
        grid = panel["gridPos"]
        assert set(grid) == {"h", "w", "x", "y"} and all(isinstance(v, int) and v >= 0 for v in grid.values()), panel
        assert grid["w"] >= 1 and grid["h"] >= 1, panel["title"]
        assert grid["x"] + grid["w"] <= 24, f"{panel['title']}: wider than Grafana's 24 columns"
        boxes.append((panel["title"], grid))
    for (one, a), (other, b) in combinations(boxes, 2):
        apart = (a["x"] + a["w"] <= b["x"] or b["x"] + b["w"] <= a["x"]
                 or a["y"] + a["h"] <= b["y"] or b["y"] + b["h"] <= a["y"])
        assert apart, f"panels {one!r} and {other!r} overlap"
    for panel in graph_panels(dashboard):
        assert panel["type"] in {"stat", "timeseries"}, panel["title"]
        assert panel["datasource"] == DATASOURCE, panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(set(refs)) == len(refs), panel["title"]
        assert all(target["datasource"] == DATASOURCE and target["expr"].strip() for target in panel["targets"])


def test_the_data_source_and_every_variable_are_template_variables(dashboard: dict[str, Any]) -> None:
    variables = {var["name"]: var for var in dashboard["templating"]["list"]}
    # Choose the Prometheus when importing or from the dropdown; nothing names a data source of one install.
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    used = set(GRAFANA_VARIABLES.findall(json.dumps(dashboard["panels"])))
    for var in variables.values():
        if "datasource" in var:
            assert var["datasource"] == DATASOURCE
            used |= set(GRAFANA_VARIABLES.findall(json.dumps(var["query"])))
    assert {name for name in used if not name.startswith("__")} <= set(variables)


def test_it_shows_what_the_issue_asks_for(dashboard: dict[str, Any]) -> None:
    """The recovery window, backup age and size over time, verify and drill durations, archive lag."""
    shown = set().union(*(metric_names(expr) for expr in expressions(dashboard)))
    assert {
        "backup_tasks_recovery_window_start_timestamp_seconds", "backup_tasks_recovery_window_end_timestamp_seconds",
        "backup_tasks_last_success_timestamp_seconds", "backup_tasks_last_size_bytes",
        "backup_tasks_last_verification_duration_seconds", "backup_tasks_last_drill_duration_seconds",
        "backup_tasks_wal_last_archived_timestamp_seconds",
    } <= shown
    over_time = {name for panel in graph_panels(dashboard) if panel["type"] == "timeseries"
                 for target in panel["targets"] for name in metric_names(target["expr"])}
    assert {"backup_tasks_last_size_bytes", "backup_tasks_last_success_timestamp_seconds"} <= over_time


def test_every_metric_in_the_dashboard_and_the_rules_is_served(dashboard: dict[str, Any]) -> None:
    served = exporter_metrics()
    assert served >= ISSUE_METRICS, f"the exporter lacks {sorted(ISSUE_METRICS - served)}"
    known = served | flower_metrics()
    for where, exprs in (("dashboard", list(expressions(dashboard))), ("rules", list(rule_expressions()))):
        used = set().union(*(metric_names(expr) for expr in exprs))
        assert used, where
        assert used <= known, f"{where} reads metrics nobody serves: {sorted(used - known)}"
    # Recording rules the dashboard or the rules read are defined in the rules file.
    recorded = {rule["record"] for group in yaml.safe_load(RULES.read_text())["groups"]
                for rule in group["rules"] if "record" in rule}
    for expr in (*expressions(dashboard), *rule_expressions()):
        assert set(re.findall(r"\bbackup_tasks:\w+", STRING.sub('""', expr))) <= recorded, expr


def test_every_expression_parses(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """promtool parses each panel query (as a recording rule), with the template variables filled in."""
    rules = [{"record": f"dashboard:panel_{panel['id']}_{target['refId']}",
              "expr": GRAFANA_VARIABLES.sub(".*", target["expr"])}
             for panel in graph_panels(dashboard) for target in panel["targets"]]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([prometheus_tool("promtool"), "check", "rules", str(path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout
