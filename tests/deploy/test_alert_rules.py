"""deploy/prometheus: the alert rules as Prometheus itself reads them.

``promtool check rules`` and ``promtool test rules`` (the unit tests in deploy/prometheus/tests, where
each alert is seen firing and staying quiet), ``promtool check config`` for the configuration that
loads them, and what promtool cannot judge: that every alert has a unit test both ways, a severity,
and annotations that say what to do, pointing at a README section that exists.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.paths import ROOT
from tests.support.prometheus import CONFIG, RULE_TESTS, RULES, prometheus_tool

SEVERITIES = {"critical", "warning"}


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([prometheus_tool("promtool"), *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def unit_tests() -> Iterator[dict[str, Any]]:
    for path in RULE_TESTS:
        yield from yaml.safe_load(path.read_text())["tests"]


def readme_anchors() -> set[str]:
    """GitHub's anchors of README.md's headings (outside code blocks)."""
    anchors, fenced = set(), False
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (heading := re.match(r"#{1,6} (.+)", line)):
            anchors.add(re.sub(r"[^\w\- ]", "", heading[1].strip().lower()).replace(" ", "-"))
    return anchors


def test_the_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("test_file", RULE_TESTS, ids=lambda path: path.name)
def test_the_unit_tests_of_the_rules_pass(test_file: Path) -> None:
    # Each file names the shipped rules file, not a copy.
    named = [(test_file.parent / name).resolve() for name in yaml.safe_load(test_file.read_text())["rule_files"]]
    assert named == [RULES]
    result = promtool("test", "rules", test_file)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_unit_tested_firing_and_quiet() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    recordings: set[str] = set()
    for test in unit_tests():
        for case in test.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
        for case in test.get("promql_expr_test", []):
            recordings.add(case["expr"])
    names = {rule["alert"] for rule in alerts()}
    assert names - firing == set(), "alerts never seen firing in deploy/prometheus/tests"
    assert names - quiet == set(), "alerts never seen staying quiet in deploy/prometheus/tests"
    assert firing | quiet <= names, "a unit test names an alert the rules do not have"
    assert {rule["record"] for rule in rules() if "record" in rule} <= recordings


def test_every_alert_says_how_bad_and_what_to_do() -> None:
    anchors = readme_anchors()
    for rule in alerts():
        name = rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, name
        notes = rule["annotations"]
        assert notes["summary"] and notes["description"], name
        # A command to run or a place to look, not only a statement of the problem.
        assert re.search(r"`(backup-tasks|docker compose) [^`]+`", notes["description"]), name
        page, _, anchor = notes["runbook"].partition("#")
        assert page == "README.md" and anchor in anchors, f"{name}: no README section {notes['runbook']}"
    # The names are a contract for silences and routes: one prefix, CamelCase.
    assert all(re.fullmatch(r"BackupTasks[A-Z][A-Za-z]+", rule["alert"]) for rule in alerts())


def test_the_prometheus_config_loads_the_rules_and_scrapes_the_job_they_watch() -> None:
    result = promtool("check", "config", CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(CONFIG.read_text())
    assert [(CONFIG.parent / name).resolve() for name in config["rule_files"]] == [RULES]
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    down = next(rule for rule in alerts() if rule["alert"] == "BackupTasksExporterDown")
    watched = set(re.findall(r'up\{job="([^"]+)"\}', down["expr"]))
    assert watched and watched <= jobs, (watched, jobs)
    assert "flower" in jobs  # the task counters come from Flower, not from the exporter
