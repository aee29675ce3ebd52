"""The post-close workflow on a real worker: a real ``celery -A backup_tasks worker -Q backups`` process
consuming from the real Redis, messages sent by name from a Celery app that knows nothing of this
package (as the trading app would), the ``enqueue post-close`` CLI, the dump lock, and workers killed
in the middle of a dump.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from celery import Celery

from backup_tasks.catalog import manifest as catalog
from backup_tasks.catalog.manifest import Manifest
from backup_tasks.catalog.tradingday import session_day
from backup_tasks.clock import utcnow
from backup_tasks.conninfo import ConnInfo
from backup_tasks.locks import hold
from backup_tasks.logical.dump import dump_lock_name
from backup_tasks.postgres.connect import connect
from backup_tasks.settings import Settings
from backup_tasks.storage.base import PARTIAL_MARK
from backup_tasks.storage.locations import open_storage
from backup_tasks.wal.system import IDENTITY_KEY
from backup_tasks.worker.config import QUEUE, SHORT_HARD_LIMIT, build_config, visibility_timeout
from tests.support.paths import BACKUP_TASKS
from tests.support.postgres import url_of
from tests.support.processes import celery_env, client_app, process_children, running_worker, wait_until

POST_CLOSE = "backup_tasks.post_close"


# --- helpers --------------------------------------------------------------------------------------

@pytest.fixture
def broker(redis_url: str) -> Iterator[str]:
    """The test Redis DB, emptied after the test (a killed worker leaves messages and keys behind)."""
    yield redis_url
    redis.Redis.from_url(redis_url).flushdb()


@pytest.fixture
def client(broker: str) -> Iterator[Celery]:
    app = client_app(broker, broker)
    yield app  # type: ignore[misc]
    app.close()  # type: ignore[attr-defined]


def dumps_in(backup_dir: Path, day: str | None = None) -> list[Manifest]:
    found = catalog.catalog(open_storage(str(backup_dir)), kind="dump")
    return [m for m in found if day is None or m.trading_day == day]


def backup_like_files(backup_dir: Path) -> list[str]:
    """Every file a user (or `list`, `verify`, `restore`) could take for a backup: all but in-progress partials."""
    if not backup_dir.exists():
        return []
    return sorted(p.name for p in backup_dir.rglob("*")
                  if p.is_file() and PARTIAL_MARK not in p.name and p.name != IDENTITY_KEY)  # the catalog's system


def partial_files(backup_dir: Path) -> list[str]:
    return sorted(p.name for p in backup_dir.rglob("*") if PARTIAL_MARK in p.name) if backup_dir.exists() else []


def finished(result: Any, timeout: float = 90) -> Any:
    wait_until(lambda: result.state in ("SUCCESS", "FAILURE"), timeout=timeout, interval=0.1,
               what=f"task {result.id} to finish (state {result.state})")
    return result


def workflow_results(client: Celery, started: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
    return {name: finished(client.AsyncResult(task_id), timeout) for name, task_id in started["tasks"].items()}


def pool_child_running_pg_dump(worker_pid: int) -> int | None:
    for child, _name in process_children(worker_pid):
        if any(name == "pg_dump" for _pid, name in process_children(child)):
            return child
    return None


class TableLock:
    """Holds ACCESS EXCLUSIVE on a table, so a dump that started blocks on it: a dump stopped mid-way on demand."""

    def __init__(self, conninfo: ConnInfo, table: str) -> None:
        self.conninfo, self.table = conninfo, table
        self.conn: psycopg.Connection | None = None

    def __enter__(self) -> TableLock:
        self.conn = connect(self.conninfo, autocommit=False)
        self.conn.execute(f"LOCK TABLE {self.table} IN ACCESS EXCLUSIVE MODE")
        return self

    def dump_is_waiting(self) -> bool:
        with connect(self.conninfo) as conn:
            rows = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock' "
                                "AND application_name = 'backup-tasks'", (self.conninfo.dbname,)).fetchone()
        return bool(rows and rows[0])

    def release(self) -> None:
        if self.conn is not None:
            self.conn.rollback()
            self.conn.close()
            self.conn = None

    def __exit__(self, *_: object) -> None:
        self.release()


def run_cli(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BACKUP_TASKS, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False)


# --- configuration (fast) ---------------------------------------------------------------------------

def test_every_task_has_soft_and_hard_limits_below_the_visibility_timeout() -> None:
    from backup_tasks.worker.app import app

    visibility = app.conf.broker_transport_options["visibility_timeout"]
    names = sorted(name for name in app.tasks if name.startswith("backup_tasks."))
    assert {"backup_tasks.post_close", "backup_tasks.dump", "backup_tasks.verify", "backup_tasks.prune"} <= set(names)
    for name in names:
        task = app.tasks[name]
        assert task.soft_time_limit and task.time_limit, f"{name} has no time limit"
        assert task.soft_time_limit < task.time_limit < visibility, (name, task.soft_time_limit, task.time_limit)


@pytest.mark.parametrize("env", [{}, {"BACKUP_TASK_SOFT_TIME_LIMIT": "80000", "BACKUP_TASK_TIME_LIMIT": "86400"},
                                 {"BACKUP_TASK_SOFT_TIME_LIMIT": "20", "BACKUP_TASK_TIME_LIMIT": "30"}])
def test_visibility_timeout_follows_the_longest_hard_limit(env: dict[str, str]) -> None:
    config = build_config(env)
    visibility = config["broker_transport_options"]["visibility_timeout"]
    assert visibility == visibility_timeout(Settings.from_env(env))
    assert config["task_soft_time_limit"] < config["task_time_limit"]
    assert visibility > max(config["task_time_limit"], SHORT_HARD_LIMIT)
    assert config["result_backend_transport_options"]["visibility_timeout"] == visibility


def test_celery_config_is_json_only_late_ack_on_the_backups_queue() -> None:
    config = build_config({})
    assert config["task_serializer"] == config["result_serializer"] == "json"
    assert config["accept_content"] == config["result_accept_content"] == ["json"]
    assert config["task_acks_late"] and config["task_reject_on_worker_lost"]
    assert config["worker_prefetch_multiplier"] == 1
    assert config["task_default_queue"] == QUEUE == "backups"
    assert config["task_routes"] == {"backup_tasks.*": {"queue": "backups"}}
    assert config["worker_send_task_events"] and config["task_send_sent_event"]
    assert config["result_backend"] == config["broker_url"] == "redis://127.0.0.1:6379/0"


def test_enqueue_rejects_a_bad_day_before_touching_the_broker() -> None:
    env = celery_env("redis://127.0.0.1:1/0", Path("/nonexistent"))
    result = run_cli(env, "enqueue", "post-close", "--day", "27/11/2026", "--json")
    assert result.returncode == 2
    assert "ISO date" in json.loads(result.stdout)["error"]
    assert "Traceback" not in result.stderr


# --- the workflow on a real worker -------------------------------------------------------------------

@pytest.mark.slow
def test_post_close_sent_by_name_runs_dump_verify_prune_once_per_day(
        broker: str, client: Celery, trading_db: ConnInfo, tmp_path: Path) -> None:
    backup_dir = tmp_path / "backups"
    env = celery_env(broker, backup_dir, url_of(trading_db, scheme="postgresql+psycopg2"))
    assert POST_CLOSE not in client.tasks  # the sender knows the name only, like the trading app
    day = session_day(utcnow(), Settings())
    hostname = f"bt-workflow-{os.getpid()}@localhost"
    with running_worker(env, log_path=tmp_path / "worker.log", hostname=hostname) as worker:
        # The worker really runs with our settings (not a default it fell back to).
        conf = client.control.inspect(timeout=15, destination=[hostname], limit=1).conf()[hostname]
        assert conf["task_acks_late"] is True and conf["task_reject_on_worker_lost"] is True
        assert conf["broker_transport_options"]["visibility_timeout"] > conf["task_time_limit"]
        assert conf["accept_content"] == ["json"] and conf["timezone"] == "Asia/Kolkata"

        started = client.send_task(POST_CLOSE, args=[day], queue=QUEUE).get(timeout=60)
        assert started["status"] == "started" and started["trading_day"] == day
        assert set(started["tasks"]) == {"dump", "verify", "prune"}
        steps = workflow_results(client, started)
        assert {name: r.state for name, r in steps.items()} == dict.fromkeys(steps, "SUCCESS")
        assert steps["dump"].result["backup_id"] == started["backup_id"]
        assert steps["verify"].result["ok"] is True
        assert steps["prune"].result["deleted"] == []
        (backup,) = dumps_in(backup_dir)
        assert backup.id == started["backup_id"] and backup.trading_day == day
        assert backup.verification is not None and backup.verification.ok
        assert set(backup.tables) >= {"public.signals", "public.orders", "public.audit_logs"}
        assert (backup_dir / backup.path).stat().st_mode & 0o777 == 0o600

        # The same signal again (a retried hook, the app restarting): nothing new, and it says so.
        again = client.send_task(POST_CLOSE, args=[day], queue=QUEUE).get(timeout=60)
        assert again["status"] == "skipped" and again["backup_id"] == backup.id
        assert again["reason"] == "already backed up" and again["verified"] is True
        # Beat's daily run for the same session skips the same way.
        daily = client.send_task("backup_tasks.daily", queue=QUEUE).get(timeout=60)
        assert daily["status"] == "skipped" and daily["backup_id"] == backup.id

        # Two signals for another day at the same moment (two app instances): one dump.
        other_day = "2026-01-05"
        pair = [client.send_task(POST_CLOSE, args=[other_day], queue=QUEUE) for _ in range(2)]
        outcomes = [r.get(timeout=60) for r in pair]
        assert sorted(o["status"] for o in outcomes) == ["skipped", "started"]
        first = next(o for o in outcomes if o["status"] == "started")
        second = next(o for o in outcomes if o["status"] == "skipped")
        assert second["backup_id"] == first["backup_id"]
        assert all(r.state == "SUCCESS" for r in workflow_results(client, first).values())
        assert [m.id for m in dumps_in(backup_dir, other_day)] == [first["backup_id"]]

        # The CLI for shell and cron users: --wait follows the workflow and reports each step.
        cli_day = "2026-01-06"
        waited = run_cli(env, "enqueue", "post-close", "--day", cli_day, "--wait", "--json")
        assert waited.returncode == 0, waited.stdout + waited.stderr
        document = json.loads(waited.stdout)
        assert document["ok"] is True and document["status"] == "complete" and document["trading_day"] == cli_day
        assert client.AsyncResult(document["task_id"]).result["status"] == "started"
        assert {name: step["state"] for name, step in document["steps"].items()} == \
            {"dump": "SUCCESS", "verify": "SUCCESS", "prune": "SUCCESS"}
        assert document["steps"]["verify"]["result"]["ok"] is True
        assert len(dumps_in(backup_dir, cli_day)) == 1
        # Again, human output: the day is done, exit 0, nothing new.
        repeat = run_cli(env, "enqueue", "post-close", "--day", cli_day, "--wait")
        assert repeat.returncode == 0, repeat.stdout + repeat.stderr
        task_id, *rest = repeat.stdout.splitlines()
        assert client.AsyncResult(task_id).result["status"] == "skipped"
        assert "already backed up" in "\n".join(rest)
        assert len(dumps_in(backup_dir, cli_day)) == 1
        # Without --wait: exit 0 as soon as the broker has it; the day defaults to today on the exchange.
        sent = run_cli(env, "enqueue", "post-close", "--json")
        assert sent.returncode == 0, sent.stderr
        message = json.loads(sent.stdout)
        from zoneinfo import ZoneInfo

        assert message["trading_day"] == datetime.now(ZoneInfo("Asia/Kolkata")).date().isoformat()
        outcome = client.AsyncResult(message["task_id"]).get(timeout=60)
        if outcome["status"] == "started":  # let it finish before the worker stops
            workflow_results(client, outcome)
        assert worker.poll() is None
    assert len(dumps_in(backup_dir)) == len({m.trading_day for m in dumps_in(backup_dir)})


@pytest.mark.slow
def test_worker_starts_with_a_broken_database_url_and_each_task_fails_clearly(
        broker: str, client: Celery, tmp_path: Path) -> None:
    secret = "Hunter2-not-for-logs"
    env = celery_env(broker, tmp_path / "backups", f"postgresql+psycopg2://trader:{secret}@127.0.0.1:5432")
    log_path = tmp_path / "worker.log"
    with running_worker(env, log_path=log_path) as worker:
        for name, args in ((POST_CLOSE, ["2026-11-27"]), ("backup_tasks.dump", []), ("backup_tasks.health", [])):
            result = finished(client.send_task(name, args=args, queue=QUEUE), timeout=30)
            assert result.state == "FAILURE", name
            assert type(result.result).__name__ == "ConfigError"
            assert "DATABASE_URL names no database" in str(result.result)
            assert result.retries == 0  # a configuration error is not retried
            assert secret not in str(result.result) + (result.traceback or "")
        bad_day = finished(client.send_task(POST_CLOSE, args=["27/11/2026"], queue=QUEUE), timeout=30)
        assert bad_day.state == "FAILURE" and "ISO date" in str(bad_day.result)
        assert worker.poll() is None and client.control.ping(timeout=2)
    assert secret not in log_path.read_text()
    assert backup_like_files(tmp_path / "backups") == []


@pytest.mark.slow
def test_a_second_dump_of_the_same_database_waits_for_the_lock_and_retries(
        broker: str, client: Celery, trading_db: ConnInfo, tmp_path: Path) -> None:
    backup_dir = tmp_path / "backups"
    env = celery_env(broker, backup_dir, url_of(trading_db), BACKUP_RETRY_BACKOFF="1", BACKUP_MAX_RETRIES="30")
    # The same lock a running dump holds (Redis, scoped by the backup location), held by this test.
    settings = Settings(database_url=url_of(trading_db), backup_dir=str(backup_dir), broker_url=broker)
    with running_worker(env, log_path=tmp_path / "worker.log"):
        with hold(settings, dump_lock_name(trading_db), what=f"a dump of {trading_db.dbname}"):
            result = client.send_task("backup_tasks.dump", queue=QUEUE)
            wait_until(lambda: result.state == "RETRY", timeout=30, what="the dump to be retried")
            message = str(result.info)
            assert f"a dump of {trading_db.dbname} is already running" in message
            assert f"held by pid {os.getpid()} on {socket.gethostname()}" in message
            time.sleep(2.5)  # it keeps retrying, and never dumps while the lock is held
            assert dumps_in(backup_dir) == [] and result.state == "RETRY"
        finished(result, timeout=30)
        assert result.state == "SUCCESS" and result.retries >= 1
        assert [m.id for m in dumps_in(backup_dir)] == [result.result["backup_id"]]


@pytest.mark.slow
def test_pool_process_killed_mid_dump_leaves_no_backup_and_the_task_is_redelivered(
        broker: str, client: Celery, trading_db: ConnInfo, tmp_path: Path) -> None:
    backup_dir = tmp_path / "backups"
    env = celery_env(broker, backup_dir, url_of(trading_db))
    log_path = tmp_path / "worker.log"
    with running_worker(env, log_path=log_path) as worker, TableLock(trading_db, "signals") as table_lock:
        started = client.send_task(POST_CLOSE, args=["2026-11-27"], queue=QUEUE).get(timeout=30)
        dump_result = client.AsyncResult(started["tasks"]["dump"])
        wait_until(table_lock.dump_is_waiting, timeout=30, what="pg_dump to block on the locked table")
        assert dump_result.state == "PROGRESS" and dump_result.info["phase"] == "dumping"
        assert partial_files(backup_dir) and backup_like_files(backup_dir) == []
        victim = wait_until(lambda: pool_child_running_pg_dump(worker.pid), timeout=10, what="the pool process")
        os.kill(int(victim), signal.SIGKILL)  # type: ignore[arg-type]
        # task_reject_on_worker_lost: the message goes back to the queue at once and another pool
        # process takes it (it is not marked failed, and not lost).
        wait_until(lambda: log_path.read_text().count(f"backup_tasks.dump[{dump_result.id}] received") == 2,
                   timeout=30, what="the dump to be delivered again")
        assert "WorkerLostError" in log_path.read_text()
        assert backup_like_files(backup_dir) == []
        table_lock.release()
        steps = workflow_results(client, started)
        assert {name: r.state for name, r in steps.items()} == dict.fromkeys(steps, "SUCCESS")
    (backup,) = dumps_in(backup_dir)
    assert backup.id == started["backup_id"] and backup.verification is not None and backup.verification.ok
    # The killed attempt's partial file was cleared by the run that succeeded.
    assert partial_files(backup_dir) == []
    assert backup_like_files(backup_dir) == sorted([*backup.stored_keys, backup.key])  # data, verdict, manifest


@pytest.mark.slow
def test_whole_worker_killed_mid_dump_is_redelivered_after_the_visibility_timeout(
        broker: str, client: Celery, trading_db: ConnInfo, tmp_path: Path) -> None:
    backup_dir = tmp_path / "backups"
    env = celery_env(broker, backup_dir, url_of(trading_db))
    with TableLock(trading_db, "signals") as table_lock:
        with running_worker(env, log_path=tmp_path / "worker-1.log") as worker:
            # The dump alone: with the 2-second visibility timeout below, a longer task (verify) would be
            # delivered again while still running, which is exactly why production uses hours.
            result = client.send_task("backup_tasks.dump", kwargs={"trading_day": "2026-11-27"}, queue=QUEUE)
            wait_until(table_lock.dump_is_waiting, timeout=30, what="pg_dump to block on the locked table")
            os.killpg(worker.pid, signal.SIGKILL)  # the worker, its pool and pg_dump: nothing runs any cleanup
            worker.wait()
        assert backup_like_files(backup_dir) == [] and partial_files(backup_dir)
    # The message is not lost: it waits, unacknowledged, in Redis...
    unacked = redis.Redis.from_url(broker).hvals("unacked")
    assert [json.loads(raw)[0]["headers"]["id"] for raw in unacked] == [result.id]
    # ...until a worker finds it older than the visibility timeout (hours in production; 2 s here via
    # a celeryconfig override, the documented way to change Celery settings) and delivers it again.
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "quick_redelivery_config.py").write_text(
        "from backup_tasks.celeryconf import build_config\n"
        "globals().update(build_config())\n"
        "broker_transport_options = {**broker_transport_options, 'visibility_timeout': 2,\n"
        "                            'unacked_restore_interval': 1, 'unacked_restore_throttle': 1}\n")
    time.sleep(2.5)
    quick = dict(env, CELERY_CONFIG_MODULE="quick_redelivery_config", PYTHONPATH=str(config_dir))
    log_path = tmp_path / "worker-2.log"
    with running_worker(quick, log_path=log_path):
        assert finished(result, timeout=60).state == "SUCCESS"
    log = log_path.read_text()
    assert log.count(f"backup_tasks.dump[{result.id}] received") == 1
    assert "took over the lock of a dead process" in log  # the killed holder did not block it for the lock TTL
    assert "removed 1 partial file(s) left by an interrupted run" in log
    (backup,) = dumps_in(backup_dir)
    assert backup.id == result.result["backup_id"] and backup.trading_day == "2026-11-27"
    assert partial_files(backup_dir) == []


# --- the client side: no broker ----------------------------------------------------------------------

class BlackHole:
    """A TCP port that accepts connections and never answers (a broker behind a dead NAT or firewall)."""

    def __enter__(self) -> int:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        return int(self.sock.getsockname()[1])

    def __exit__(self, *_: object) -> None:
        self.sock.close()


@pytest.mark.slow
def test_enqueue_fails_clearly_and_quickly_when_the_broker_is_unreachable(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    with BlackHole() as silent_port:
        # All at once: each one's own time is what counts, and the test takes one bounded wait.
        runs = []
        for port in (closed_port, silent_port):
            env = celery_env(f"redis://:Br0kerPw-123@127.0.0.1:{port}/0", tmp_path)
            for extra in ([], ["--json"], ["--wait"]):
                argv = [BACKUP_TASKS, "enqueue", "post-close", "--day", "2026-11-27", *extra]
                runs.append((extra, time.monotonic(), subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                                                       stderr=subprocess.PIPE, text=True)))
        for extra, began, proc in runs:
            stdout, stderr = proc.communicate(timeout=60)
            elapsed = time.monotonic() - began
            assert proc.returncode == 1, stdout + stderr
            assert elapsed < 20, f"took {elapsed:.1f}s"
            assert "cannot reach the Celery broker" in stderr and "nothing was sent" in stderr
            assert "Br0kerPw-123" not in stdout + stderr
            assert "Traceback" not in stderr
            if "--json" in extra:
                assert json.loads(stdout)["error_type"] == "BrokerUnavailable"


@pytest.mark.slow
def test_enqueue_wait_reports_a_failed_workflow(broker: str, password_server: ConnInfo, tmp_path: Path) -> None:
    wrong = url_of(password_server).replace(f":{password_server.password}@", ":Wr0ng-pw-42@")
    env = celery_env(broker, tmp_path / "backups", wrong)
    with running_worker(env, log_path=tmp_path / "worker.log"):
        result = run_cli(env, "enqueue", "post-close", "--day", "2026-11-27", "--wait", "--json", "--timeout", "60")
    assert result.returncode == 1, result.stdout + result.stderr
    document = json.loads(result.stdout)
    assert document["ok"] is False and document["status"] == "failed"
    assert document["steps"]["dump"]["state"] == "FAILURE"
    assert document["steps"]["dump"]["error_type"] == "AuthenticationFailed"
    assert "authentication failed" in document["steps"]["dump"]["error"]
    # The chain does not run verify or prune after a failed dump; Celery marks them failed too.
    assert document["steps"]["verify"]["state"] == document["steps"]["prune"]["state"] == "FAILURE"
    assert "Wr0ng-pw-42" not in result.stdout + result.stderr
    assert backup_like_files(tmp_path / "backups") == []


@pytest.mark.slow
def test_send_post_close_helper_with_a_broker_url(broker: str, tmp_path: Path, trading_db: ConnInfo) -> None:
    from backup_tasks import enqueue
    from backup_tasks.worker import client as workflow_client

    env = celery_env(broker, tmp_path / "backups", url_of(trading_db))
    with running_worker(env, log_path=tmp_path / "worker.log"):
        sent = enqueue.send_post_close(broker, "2026-02-02")
        outcome = workflow_client.follow(workflow_client.client_app(broker, broker), sent.id, "2026-02-02",
                                         timeout=120)
    assert outcome.ok and outcome.status == "complete"
    assert [m.trading_day for m in dumps_in(tmp_path / "backups")] == ["2026-02-02"]
