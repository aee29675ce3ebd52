"""A real Prometheus server, loading the shipped rules, scrapes the real exporter and raises the alert.

``prometheus`` (Debian's package) runs with deploy/prometheus/prometheus.yml's scrape job for the
exporter, pointed at ``backup-tasks metrics --listen`` on a free port, everything every second, and
the rules file as shipped (BackupTasksNoRecentDump has no ``for:``: the 26 h threshold is the
grace). While the newest dump of the catalog is an hour old, every rule evaluates without error on
the real series and nothing fires; once that dump is gone and the newest is 27 h old, the next
scrape shows it and Prometheus' alerts API reports the alert firing.

BackupTasksVerificationFailed, on the issue's case: the newest dump failed its verification and an
older one was verified again afterwards (ok). The alert fires (the exporter reports the newest dump's
verdict, as ``health`` judges, which exits 1), and stops once a newer dump passes.
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from backup_tasks.catalog.manifest import Manifest, Verification, record_verification, save_new
from backup_tasks.clock import isoformat, parse_time
from backup_tasks.postgres.cluster import free_port
from backup_tasks.settings import Settings
from backup_tasks.storage.locations import open_storage
from tests.support.data import NOW, dump
from tests.support.paths import BACKUP_TASKS
from tests.support.pitr import cli_env, run_cli
from tests.support.processes import stop_process, wait_until, worker_env
from tests.support.prometheus import CONFIG, RULES, prometheus_tool

pytestmark = pytest.mark.slow

JOB = "backup-tasks"
ALERT = "BackupTasksNoRecentDump"


def get(url: str) -> Any:
    """The JSON of a GET, or None while the server does not answer (yet)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = response.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None
    return json.loads(body) if body.startswith(b"{") else body.decode()


def dump_finished(ago: timedelta, *, verified: bool | None = True) -> Manifest:
    """A dump of aitrapp that finished ``ago`` before the real now (the clock Prometheus uses)."""
    return dump((NOW - (datetime.now(UTC) - ago)) / timedelta(days=1), verified=verified)


def finished(manifest: Manifest) -> float:
    return parse_time(manifest.finished_at).timestamp()


@contextmanager
def running(argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield proc
        finally:
            stop_process(proc, timeout=15)


def prometheus_config(exporter: str) -> dict[str, Any]:
    """The shipped configuration with the exporter's job only, pointed at ``exporter``, every second."""
    shipped = yaml.safe_load(CONFIG.read_text())
    job = next(job for job in shipped["scrape_configs"] if job["job_name"] == JOB)
    job["static_configs"] = [{"targets": [exporter]}]
    return {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)], "scrape_configs": [job]}


def alerts(api: str, state: str = "firing") -> list[dict[str, Any]]:
    document = get(f"{api}/api/v1/alerts") or {"data": {"alerts": []}}
    return [alert for alert in document["data"]["alerts"] if alert["state"] == state]


def query(api: str, expr: str) -> list[dict[str, Any]]:
    document = get(f"{api}/api/v1/query?" + urllib.parse.urlencode({"query": expr})) or {"data": {"result": []}}
    return list(document["data"]["result"])


@contextmanager
def watched(tmp_path: Path, backups: Path) -> Iterator[tuple[str, int, Callable[[str], float | None]]]:
    """The exporter on ``backups`` and Prometheus scraping it: (the API's URL, the exporter's port, a query
    of one series' value that first checks both processes still run)."""
    exporter_port, prometheus_port = free_port(), free_port()
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config(f"127.0.0.1:{exporter_port}")))
    api = f"http://127.0.0.1:{prometheus_port}"
    exporter_argv = [BACKUP_TASKS, "metrics", "--listen", f"127.0.0.1:{exporter_port}"]
    prometheus_argv = [prometheus_tool("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
                       f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{prometheus_port}"]

    with running(exporter_argv, tmp_path / "exporter.log", worker_env(BACKUP_DIR=str(backups))) as exporter, \
            running(prometheus_argv, tmp_path / "prometheus.log") as prometheus:
        def scraped(expr: str) -> float | None:
            assert exporter.poll() is None, (tmp_path / "exporter.log").read_text()[-2000:]
            assert prometheus.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            series = query(api, expr)
            return float(series[0]["value"][1]) if series else None

        yield api, exporter_port, scraped


def test_prometheus_fires_no_recent_dump_when_the_newest_dump_is_too_old(tmp_path: Path) -> None:
    backups = tmp_path / "backups"
    storage = open_storage(str(backups))
    old, fresh = dump_finished(timedelta(hours=27)), dump_finished(timedelta(hours=1))
    for manifest in (old, fresh):
        save_new(storage, manifest)

    with watched(tmp_path, backups) as (api, exporter_port, scraped):
        def scraped_dump() -> float | None:
            return scraped(f'backup_tasks_last_success_timestamp_seconds{{job="{JOB}",kind="dump"}}')

        # The fresh dump is scraped, every rule then evaluates cleanly on the real series, and nothing fires.
        wait_until(lambda: scraped_dump() == finished(fresh), timeout=60,
                   what="Prometheus to scrape the exporter's newest dump")
        evaluated_after = datetime.now(UTC)

        def rules_evaluated_since_scrape() -> list[dict[str, Any]] | None:
            groups = (get(f"{api}/api/v1/rules") or {"data": {"groups": []}})["data"]["groups"]
            evaluated = [rule for group in groups for rule in group["rules"]]
            fresh_enough = all(datetime.fromisoformat(rule["lastEvaluation"].replace("Z", "+00:00"))
                               > evaluated_after for rule in evaluated)
            return evaluated if evaluated and fresh_enough else None

        evaluated = wait_until(rules_evaluated_since_scrape, timeout=30, what="a rule evaluation after the scrape")
        assert isinstance(evaluated, list)
        assert {rule["name"] for rule in evaluated} >= {ALERT, "BackupTasksExporterDown"}
        assert [(rule["name"], rule.get("lastError")) for rule in evaluated if rule["health"] != "ok"] == []
        assert alerts(api) == [] and alerts(api, "pending") == []
        assert query(api, f'up{{job="{JOB}"}}')[0]["value"][1] == "1"
        assert query(api, "backup_tasks_up")[0]["value"][1] == "1"

        # The newest dump goes away: the one left is 27 h old, and the alert fires on the next evaluations.
        storage.delete(fresh.key)
        firing = wait_until(lambda: [a for a in alerts(api) if a["labels"]["alertname"] == ALERT], timeout=30,
                            what=f"{ALERT} to fire")
        assert isinstance(firing, list) and len(firing) == 1
        assert firing[0]["labels"] == {"alertname": ALERT, "severity": "critical", "database": "aitrapp",
                                       "kind": "dump", "job": JOB, "instance": f"127.0.0.1:{exporter_port}"}
        assert scraped_dump() == finished(old)
        age = datetime.now(UTC).timestamp() - finished(old)
        assert 27 * 3600 - 60 < float(firing[0]["value"]) <= age + 5  # time() - the dump's end, as of the evaluation
        assert firing[0]["annotations"]["summary"].startswith("No successful dump of aitrapp for 1d 3h")
        # Only that alert: the empty-catalog twin waits 26 h, the exporter is up and reads its sources.
        assert {a["labels"]["alertname"] for a in alerts(api)} == {ALERT}


VERIFICATION_ALERT = "BackupTasksVerificationFailed"


def test_prometheus_fires_verification_failed_while_the_newest_dump_failed(tmp_path: Path) -> None:
    backups = tmp_path / "backups"
    storage = open_storage(str(backups))
    older, newest = dump_finished(timedelta(hours=30)), dump_finished(timedelta(hours=2), verified=None)
    for manifest in (older, newest):
        save_new(storage, manifest)
        storage.put_bytes(manifest.path, b"x" * manifest.size_bytes)

    def verify(manifest: Manifest, ok: bool, ago: timedelta) -> None:
        record_verification(storage, manifest.id, Verification(
            ok=ok, verified_at=isoformat(datetime.now(UTC) - ago), duration_seconds=3.0,
            method="throwaway-cluster", checked=["restore"], problems=[] if ok else ["row counts differ"]))

    verify(newest, False, timedelta(hours=1))
    verify(older, True, timedelta(minutes=1))  # verified again, later: the latest verdict recorded passed
    success = f'backup_tasks_last_verification_success{{job="{JOB}",kind="dump"}}'

    with watched(tmp_path, backups) as (api, exporter_port, scraped):
        wait_until(lambda: scraped(success) is not None, timeout=60, what="Prometheus to scrape the verification")
        assert scraped(success) == 0, "the newest dump's verdict, not the latest one recorded"
        firing = wait_until(lambda: [a for a in alerts(api) if a["labels"]["alertname"] == VERIFICATION_ALERT],
                            timeout=30, what=f"{VERIFICATION_ALERT} to fire")
        assert isinstance(firing, list) and len(firing) == 1
        assert firing[0]["labels"] == {"alertname": VERIFICATION_ALERT, "severity": "critical", "database": "aitrapp",
                                       "kind": "dump", "job": JOB, "instance": f"127.0.0.1:{exporter_port}"}
        health = run_cli("health", env=cli_env(Settings(backup_dir=str(backups), broker_url="memory://")))
        assert health.returncode == 1 and f"newest backup {newest.id} failed verification" in health.stdout

        # A newer dump passes: the metric says 1 and the alert resolves.
        passed = dump_finished(timedelta(minutes=30))
        save_new(storage, passed)
        storage.put_bytes(passed.path, b"x" * passed.size_bytes)
        wait_until(lambda: scraped(success) == 1, timeout=30, what="the newer dump's verdict to be scraped")
        wait_until(lambda: not [a for a in alerts(api) if a["labels"]["alertname"] == VERIFICATION_ALERT],
                   timeout=30, what=f"{VERIFICATION_ALERT} to resolve")
        assert alerts(api) == [], "nothing else fires on this catalog"
