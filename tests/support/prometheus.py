"""Prometheus' own tools for the tests of deploy/prometheus and deploy/grafana: promtool and the server.

Both come from Debian's ``prometheus`` package, which ``scripts/bootstrap.sh`` installs. Without it a
test skips on a developer's machine, but fails under CI (``CI`` set): the alert rules are only
shipped tested if the tests ran.
"""

from __future__ import annotations

from tests.support.paths import ROOT
from tests.support.require import tool

PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "backup-tasks.rules.yml"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.test.yml"))
#: The names issue 12 makes public; the exporter may serve more, never fewer.
ISSUE_METRICS = {
    "backup_tasks_up", "backup_tasks_last_success_timestamp_seconds", "backup_tasks_last_size_bytes",
    "backup_tasks_last_duration_seconds", "backup_tasks_backups", "backup_tasks_last_verification_success",
    "backup_tasks_last_verification_timestamp_seconds", "backup_tasks_last_verification_duration_seconds",
    "backup_tasks_wal_last_archived_timestamp_seconds", "backup_tasks_archiver_failed_count",
    "backup_tasks_archiver_last_failed_timestamp_seconds", "backup_tasks_recovery_window_start_timestamp_seconds",
    "backup_tasks_recovery_window_end_timestamp_seconds", "backup_tasks_last_drill_success",
    "backup_tasks_last_drill_duration_seconds",
}
DASHBOARD = ROOT / "deploy" / "grafana" / "backup-tasks.json"


def prometheus_tool(name: str) -> str:
    """The path of ``promtool`` or ``prometheus`` (Debian's ``prometheus`` package): ``require.tool``."""
    return tool(name, "prometheus")
