"""The Prometheus exposition: the issue's names and labels, values from a real catalog, up 0 instead of stale values."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from backup_tasks.clock import parse_time
from backup_tasks.observe.facts import collect
from backup_tasks.observe.metrics import METRIC_NAMES, exposition
from tests.support.observe import Samples, samples, value
from tests.support.paths import BACKUP_TASKS
from tests.support.pitr import cli_env, reachable_dir, run_cli
from tests.support.prometheus import ISSUE_METRICS
from tests.support.s3 import free_port

if TYPE_CHECKING:
    from tests.support.observe import Scene

IS_ROOT = os.geteuid() == 0



def names(parsed: Samples) -> set[str]:
    return {name for name, _labels in parsed}


def test_every_name_of_the_issue_is_served() -> None:
    assert set(METRIC_NAMES) >= ISSUE_METRICS


def test_values_come_from_the_catalog_the_archive_and_its_state(scene: Scene) -> None:
    parsed = samples(exposition(collect(scene.settings, storage=scene.storage, archive=scene.archive, now=scene.now)))
    dump = {"database": "aitrapp", "kind": "dump"}
    snap = {"database": "aitrapp", "kind": "snapshot"}
    newest_dump, failed_dump = scene.dumps[-1], scene.dumps[1]
    assert value(parsed, "backup_tasks_up") == 1
    assert value(parsed, "backup_tasks_backups", **dump) == 3
    assert value(parsed, "backup_tasks_backups", **snap) == 2
    assert value(parsed, "backup_tasks_last_success_timestamp_seconds", **dump) == \
        parse_time(newest_dump.finished_at).timestamp()
    assert value(parsed, "backup_tasks_last_size_bytes", **dump) == newest_dump.size_bytes
    assert value(parsed, "backup_tasks_last_duration_seconds", **dump) == 95
    assert value(parsed, "backup_tasks_last_verification_success", **dump) == 0, "yesterday's verification failed"
    assert failed_dump.verification is not None
    assert value(parsed, "backup_tasks_last_verification_timestamp_seconds", **dump) == \
        parse_time(failed_dump.verification.verified_at).timestamp()
    assert value(parsed, "backup_tasks_last_verification_duration_seconds", **dump) == 31.5
    assert value(parsed, "backup_tasks_last_verification_success", **snap) == 1
    assert value(parsed, "backup_tasks_wal_last_archived_timestamp_seconds", location="archive") == \
        pytest.approx(scene.completed_at(scene.last).timestamp())
    assert value(parsed, "backup_tasks_recovery_window_start_timestamp_seconds", database="aitrapp") == \
        pytest.approx(scene.completed_at(scene.first + 1).timestamp())
    assert value(parsed, "backup_tasks_recovery_window_end_timestamp_seconds", database="aitrapp") == \
        pytest.approx((scene.now - timedelta(seconds=scene.end_age)).timestamp())
    assert value(parsed, "backup_tasks_last_drill_success", database="aitrapp") == 1
    assert value(parsed, "backup_tasks_last_drill_duration_seconds", database="aitrapp") == 4.2
    assert value(parsed, "backup_tasks_source_up", source="catalog") == 1
    assert "backup_tasks_archiver_failed_count" not in names(parsed), "no DATABASE_URL: no server facts, no zeros"
    assert {labels for name, labels in parsed if name == "backup_tasks_wal_last_archived_timestamp_seconds"} == \
        {frozenset({("location", "archive")})}, "no copy configured: no copy series"


@pytest.mark.slow
def test_the_command_prints_the_exposition_with_up_0_when_backup_dir_is_gone(
        disk_scene: Callable[..., Scene], tmp_path: Path) -> None:
    scene = disk_scene()
    result = run_cli("metrics", env=cli_env(scene.settings))
    assert result.returncode == 0, result.stderr
    assert value(samples(result.stdout), "backup_tasks_backups", database="aitrapp", kind="dump") == 3

    Path(scene.settings.backup_dir).rename(tmp_path / "unmounted")
    result = run_cli("metrics", env=cli_env(scene.settings))
    assert result.returncode == 0, "a textfile collector must get the file that says up 0"
    parsed = samples(result.stdout)
    assert value(parsed, "backup_tasks_up") == 0
    assert value(parsed, "backup_tasks_source_up", source="catalog") == 0
    assert "backup_tasks_backups" not in names(parsed), "no value from a source that was not read"


@pytest.mark.slow
@pytest.mark.skipif(not IS_ROOT, reason="needs root to run the exporter as another user")
def test_an_unreadable_backup_dir_is_up_0(disk_scene: Callable[..., Scene], server_user_cli: list[str]) -> None:
    base = reachable_dir("bt-test-observe-")
    try:
        scene = disk_scene(base)
        Path(scene.settings.backup_dir).chmod(0o700)  # root's: the postgres user may enter its parent, not list it
        as_postgres = ["runuser", "-u", "postgres", "--", *server_user_cli, "metrics"]
        result = subprocess.run(as_postgres, env=cli_env(scene.settings), capture_output=True, text=True,
                                check=False, cwd="/")
        why = subprocess.run([*as_postgres, "--json"], env=cli_env(scene.settings), capture_output=True, text=True,
                             check=False, cwd="/")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert result.returncode == 0, result.stderr
    parsed = samples(result.stdout)
    assert value(parsed, "backup_tasks_up") == 0
    assert value(parsed, "backup_tasks_source_up", source="catalog") == 0
    assert "backup_tasks_backups" not in names(parsed)
    problems = json.loads(why.stdout)["problems"]
    assert any(p.startswith("catalog: ") and "permission denied" in p.lower() for p in problems), problems


@pytest.mark.slow
def test_metrics_json_and_a_bad_listen_address(disk_scene: Callable[..., Scene]) -> None:
    scene = disk_scene()
    result = run_cli("metrics", "--json", env=cli_env(scene.settings))
    document = json.loads(result.stdout)
    assert document["ok"] is True
    assert document["metrics"]["backup_tasks_backups"][0]["labels"] == {"database": "aitrapp", "kind": "dump"}
    result = run_cli("metrics", "--listen", "localhost", env=cli_env(scene.settings))
    assert result.returncode == 2
    assert "HOST:PORT" in result.stderr


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        assert response.status == 200
        return response.read().decode()


@pytest.mark.slow
def test_the_server_reads_the_sources_on_every_scrape(disk_scene: Callable[..., Scene], tmp_path: Path) -> None:
    scene = disk_scene()
    port = free_port()
    server = subprocess.Popen([BACKUP_TASKS, "metrics", "--listen", f"127.0.0.1:{port}"],
                              env=cli_env(scene.settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                first = samples(scrape(port))
                break
            except OSError:
                assert server.poll() is None, server.communicate()
                assert time.monotonic() < deadline, "the exporter never listened"
                time.sleep(0.1)
        assert value(first, "backup_tasks_up") == 1
        assert value(first, "backup_tasks_backups", database="aitrapp", kind="dump") == 3

        (Path(scene.settings.backup_dir) / f"{scene.dumps[0].id}.manifest.json").unlink()
        assert value(samples(scrape(port)), "backup_tasks_backups", database="aitrapp", kind="dump") == 2

        moved = tmp_path / "moved"
        Path(scene.settings.backup_dir).rename(moved)  # the volume goes away under a running exporter
        down = samples(scrape(port))
        assert value(down, "backup_tasks_up") == 0
        assert "backup_tasks_backups" not in names(down), "never the numbers of the previous scrape"
        assert "backup_tasks_last_success_timestamp_seconds" not in names(down)

        moved.rename(scene.settings.backup_dir)
        assert value(samples(scrape(port)), "backup_tasks_up") == 1
    finally:
        server.send_signal(signal.SIGTERM)
        _out, err = server.communicate(timeout=15)
    assert server.returncode == 0, err
    assert f"serving /metrics on 127.0.0.1:{port}" in err
