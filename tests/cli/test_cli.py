"""The CLI contract: exit codes 0/1/2, one JSON document with --json, never a traceback for a user's mistake."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from backup_tasks.conninfo import ConnInfo
from backup_tasks.postgres.cluster import free_port
from tests.support.paths import BACKUP_TASKS
from tests.support.postgres import url_of
from tests.support.processes import worker_env


def run(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BACKUP_TASKS, *args], env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


@pytest.mark.parametrize(("env", "code", "fragment"), [
    ({}, 2, "DATABASE_URL is not set"),
    ({"DATABASE_URL": "trader:pw9876@localhost:5432/aitrapp"}, 2, "must start with postgresql://"),
    ({"DATABASE_URL": "postgresql://u:pw9876@127.0.0.1:5432/"}, 2, "names no database"),
    ({"DATABASE_URL": "postgresql://u@127.0.0.1:5432/x", "BACKUP_COMPRESSION": "rar"}, 2, "BACKUP_COMPRESSION"),
    ({"DATABASE_URL": "postgresql://u:pw9876@127.0.0.1:{port}/aitrapp"}, 1, "cannot reach PostgreSQL"),
    ({"DATABASE_URL": "postgresql://postgres:pw9876@127.0.0.1:5432/bt_no_such_db_x"}, 1, "does not exist"),
])
def test_dump_errors_have_the_right_exit_code_and_no_secret(
        env: dict[str, str], code: int, fragment: str, tmp_path: Path) -> None:
    values = {k: v.format(port=free_port()) for k, v in env.items()}
    result = run("dump", "--json", env=worker_env(BACKUP_DIR=str(tmp_path / "b"), BACKUP_LOCK_URL="", **values))
    assert result.returncode == code, result.stderr
    assert fragment in result.stderr and "Traceback" not in result.stderr
    document = json.loads(result.stdout)
    assert document["ok"] is False and fragment in document["error"]
    assert "pw9876" not in result.stdout + result.stderr
    assert not (tmp_path / "b").exists()


def test_usage_errors_exit_2() -> None:
    assert run("frobnicate", env=worker_env()).returncode == 2
    assert run("restore", env=worker_env()).returncode == 2  # missing ID
    assert run("dump", "--trading-day", "yesterday", env=worker_env(DATABASE_URL="postgresql://h/db")).returncode == 2


@pytest.mark.slow
def test_list_and_health_on_an_empty_and_a_healthy_catalog(
        trading_db: ConnInfo, tmp_path: Path) -> None:
    env = worker_env(DATABASE_URL=url_of(trading_db), BACKUP_DIR=str(tmp_path), BACKUP_LOCK_URL="")
    assert json.loads(run("list", "--json", env=env).stdout)["backups"] == []
    unhealthy = run("health", "--json", env=env)
    assert unhealthy.returncode == 1 and "no backup" in json.loads(unhealthy.stdout)["problems"][0]
    assert run("dump", env=env).returncode == 0
    listed = json.loads(run("list", "--json", env=env).stdout)["backups"]
    assert len(listed) == 1 and listed[0]["verification"] is None
    assert run("health", env=env).returncode == 0  # just taken: inside the verification grace period
    assert run("verify", env=env).returncode == 0
    healthy = run("health", "--json", env=env)
    assert healthy.returncode == 0 and json.loads(healthy.stdout)["verified"] is True
    human = run("list", env=env).stdout
    assert listed[0]["id"] in human and "ok" in human


@pytest.fixture
def demo_tmpdir() -> Iterator[Path]:
    """A TMPDIR of the demo's own (traversable by the postgres OS user, unlike pytest's tmp_path)."""
    path = Path(tempfile.mkdtemp(prefix="bt-demo-test-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if text.encode() in cmd:
                found.append(cmd.decode(errors="replace"))
    return found


@pytest.mark.slow
def test_demo_runs_a_full_cycle_and_leaves_nothing_behind(demo_tmpdir: Path) -> None:
    result = run("demo", "--json", "--size-mb", "5", env=worker_env(TMPDIR=str(demo_tmpdir)), timeout=300)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["ok"] is True
    assert document["steps"]["post_close"]["status"] == "started"
    assert document["steps"]["dump"]["status"] == "complete"
    assert document["steps"]["verify"]["ok"] is True
    assert document["backups"][0]["verification"]["ok"] is True
    assert os.listdir(demo_tmpdir) == []
    assert processes_mentioning(str(demo_tmpdir)) == []


@pytest.mark.slow
def test_demo_interrupted_with_ctrl_c_stops_its_server_and_removes_its_files(demo_tmpdir: Path) -> None:
    proc = subprocess.Popen([BACKUP_TASKS, "demo", "--size-mb", "30"], env=worker_env(TMPDIR=str(demo_tmpdir)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:  # interrupt once the cluster is up and being filled
        if "creating database" in line:
            break
    time.sleep(0.5)
    assert processes_mentioning(str(demo_tmpdir)), "the demo's server should be running now"
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    assert proc.returncode == 130
    assert os.listdir(demo_tmpdir) == []
    assert processes_mentioning(str(demo_tmpdir)) == []


def test_sample_data_fills_an_empty_database(make_database: Callable[..., ConnInfo]) -> None:
    target = make_database()
    result = run("sample-data", "--json", "--size-mb", "1", "--target-database-url", url_of(target),
                 env=worker_env())
    assert result.returncode == 0, result.stderr
    tables = json.loads(result.stdout)["tables"]
    assert set(tables) == {"signals", "decisions", "orders", "positions", "trades", "audit_logs"}
    assert all(count > 0 for count in tables.values())
