"""Prometheus' own tools for the tests of deploy/prometheus and deploy/grafana: promtool and the server.

Both come from Debian's ``prometheus`` package, which ``scripts/bootstrap.sh`` installs. Without it a
test skips on a developer's machine, but fails under CI (``CI`` set): the alert rules are only
shipped tested if the tests ran.
"""

from __future__ import annotations

import os
import shutil

import pytest

from tests.support.paths import ROOT

PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "backup-tasks.rules.yml"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.test.yml"))
DASHBOARD = ROOT / "deploy" / "grafana" / "backup-tasks.json"


def prometheus_tool(name: str) -> str:
    """The path of ``promtool`` or ``prometheus``; skip the test when missing, unless under CI."""
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not installed (Debian's `prometheus` package; scripts/bootstrap.sh installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: CI must run this test")
        pytest.skip(reason)
    return path
