"""Flower, the real process, against the same broker as a real worker: its HTTP API lists the workflow's
tasks with their states (progress included) for the right credentials, and nothing without them."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis

from backup_tasks.conninfo import ConnInfo
from backup_tasks.postgres.cluster import free_port
from backup_tasks.worker.config import QUEUE
from tests.support.paths import CELERY, ROOT
from tests.support.postgres import url_of
from tests.support.processes import celery_env, client_app, running_worker, stop_process, wait_until

pytestmark = pytest.mark.slow

USER, PASSWORD = "ops", "Fl0wer-Pw-314"


def request(port: int, path: str, auth: tuple[str, str] | None = (USER, PASSWORD)) -> tuple[int, Any]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if auth is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            body = response.read()
            return response.status, json.loads(body) if body else None
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, None


@contextmanager
def running_flower(env: dict[str, str], port: int, log_path: Path, *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    log = open(log_path, "wb")  # noqa: SIM115
    proc = subprocess.Popen([CELERY, "-A", "backup_tasks", "flower", f"--port={port}", "--address=127.0.0.1", *extra],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: proc.poll() is not None or request(port, "/api/workers", auth=None)[0] != 0,
                   timeout=60, what="Flower to listen")
        assert proc.poll() is None, log_path.read_text()[-2000:]
        yield proc
    finally:
        stop_process(proc, timeout=15)
        log.close()


@pytest.fixture
def broker(redis_url: str) -> Iterator[str]:
    yield redis_url
    redis.Redis.from_url(redis_url).flushdb()


def test_flower_lists_the_workflow_tasks_and_their_states_with_authentication(
        broker: str, trading_db: ConnInfo, tmp_path: Path) -> None:
    env = celery_env(broker, tmp_path / "backups", url_of(trading_db))
    port = free_port()
    hostname = f"bt-flower-{os.getpid()}@localhost"
    with running_flower(env, port, tmp_path / "flower.log", f"--basic-auth={USER}:{PASSWORD}"), \
            running_worker(env, log_path=tmp_path / "worker.log", hostname=hostname):
        # Nothing without credentials, or with wrong ones.
        for path in ("/api/workers", "/api/tasks", "/", "/tasks"):
            assert request(port, path, auth=None)[0] == 401, path
            assert request(port, path, auth=(USER, "wrong"))[0] == 401, path
        workers = wait_until(lambda: hostname in (request(port, "/api/workers?refresh=1")[1] or {}),
                             timeout=30, what="Flower to see the worker")
        assert workers

        client = client_app(broker, broker)
        started = client.send_task("backup_tasks.post_close", args=["2026-11-27"], queue=QUEUE).get(timeout=30)
        ids = {"post_close": None, **started["tasks"]}
        seen: dict[str, set[str]] = {task_id: set() for task_id in started["tasks"].values()}
        deadline = time.monotonic() + 120
        # Watch the task list while the workflow runs, as someone looking at Flower would.
        while time.monotonic() < deadline:
            status, tasks = request(port, "/api/tasks")
            assert status == 200
            for task_id, info in (tasks or {}).items():
                if task_id in seen:
                    seen[task_id].add(info["state"])
            if all("SUCCESS" in states for states in seen.values()):
                break
            time.sleep(0.05)
        client.close()
        status, tasks = request(port, "/api/tasks")
        by_name = {info["name"]: (task_id, info) for task_id, info in tasks.items()}
        for name in ("backup_tasks.post_close", "backup_tasks.dump", "backup_tasks.verify", "backup_tasks.prune"):
            assert by_name[name][1]["state"] == "SUCCESS", (name, by_name[name][1])
            assert by_name[name][1]["worker"] == hostname
        ids["post_close"] = by_name["backup_tasks.post_close"][0]
        assert by_name["backup_tasks.dump"][0] == ids["dump"]
        # The verify step restores into a throwaway cluster for a second or two: long enough to be
        # seen in its custom PROGRESS state on the way to SUCCESS.
        assert "PROGRESS" in seen[ids["verify"]], seen
        # One task's details, filtered listing, and its result as stored by the worker.
        status, info = request(port, f"/api/task/info/{ids['dump']}")
        assert status == 200 and info["state"] == "SUCCESS" and "backup_id" in info["result"]
        status, dumps = request(port, "/api/tasks?taskname=backup_tasks.dump")
        assert status == 200 and list(dumps) == [ids["dump"]]
        status, result = request(port, f"/api/task/result/{ids['verify']}")
        assert status == 200 and result["state"] == "SUCCESS" and result["result"]["ok"] is True
    assert PASSWORD not in (tmp_path / "flower.log").read_text()


def test_flower_takes_its_credentials_from_the_environment(broker: str, tmp_path: Path) -> None:
    """What docker-compose does: FLOWER_BASIC_AUTH in the environment, so no password on a command line."""
    env = celery_env(broker, tmp_path / "backups", FLOWER_BASIC_AUTH=f"{USER}:{PASSWORD}")
    port = free_port()
    with running_flower(env, port, tmp_path / "flower.log") as flower:
        assert request(port, "/api/workers", auth=None)[0] == 401
        assert request(port, "/api/workers", auth=(USER, "nope"))[0] == 401
        assert request(port, "/api/workers")[0] == 200
        cmdline = Path(f"/proc/{flower.pid}/cmdline").read_bytes()
        assert PASSWORD.encode() not in cmdline
