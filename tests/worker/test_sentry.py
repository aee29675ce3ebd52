"""Sentry, checked on what the SDK really sends: a real HTTP server on 127.0.0.1 plays the Sentry ingest
endpoint (``SENTRY_DSN`` points at it), and real worker and beat processes report to it.

Failures become exactly one error event each, tagged, with no secret anywhere in the bytes received;
transient errors are retried before that one event, permanent ones are not retried at all; beat
tasks send Sentry Crons check-ins, so a run that never happens alerts too.
"""

from __future__ import annotations

import gzip
import json
import shelve
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from backup_tasks.catalog.tradingday import session_day
from backup_tasks.clock import utcnow
from backup_tasks.conninfo import ConnInfo
from backup_tasks.errors import (
    AuthenticationFailed,
    BackupCorrupt,
    ConfigError,
    DatabaseMissing,
    HealthCheckFailed,
    LockBusy,
    SourceUnavailable,
    StorageFull,
    ToolMissing,
    VerificationFailed,
)
from backup_tasks.logical.dump import run_dump
from backup_tasks.postgres.cluster import free_port
from backup_tasks.settings import Settings
from backup_tasks.worker.config import QUEUE, beat_schedule, build_config, schedule_settings
from tests.support.paths import CELERY, ROOT
from tests.support.postgres import url_of
from tests.support.processes import celery_env, client_app, running_worker, stop_process, wait_until

WRONG_DB_PASSWORD = "S3cretPw-xyz"
BROKER_PASSWORD = "Br0ker-Pw-789"
CANARY = "canary-env-value-5f1e"  # an unrelated environment variable: no environment dump may carry it


# --- a Sentry ingest endpoint -----------------------------------------------------------------------

@dataclass
class Received:
    path: str
    headers: dict[str, str]
    raw: bytes
    body: bytes
    items: list[tuple[dict[str, Any], bytes]] = field(default_factory=list)


def parse_envelope(body: bytes) -> list[tuple[dict[str, Any], bytes]]:
    """Items of a Sentry envelope: a header line, then (item header line, payload) pairs."""
    _header, _, rest = body.partition(b"\n")
    items = []
    while rest.strip():
        item_line, _, rest = rest.partition(b"\n")
        item_header = json.loads(item_line)
        length = item_header.get("length")
        if length is None:
            payload, _, rest = rest.partition(b"\n")
        else:
            payload, rest = rest[:length], rest[length:].removeprefix(b"\n")
        items.append((item_header, payload))
    return items


class SentryIngest:
    """Records every request; answers like Sentry does."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.lock = threading.Lock()
        ingest = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                encoding = self.headers.get("Content-Encoding", "")
                body = gzip.decompress(raw) if encoding == "gzip" else \
                    zlib.decompress(raw) if encoding == "deflate" else raw
                record = Received(self.path, dict(self.headers.items()), raw, body)
                if self.path.endswith("/envelope/"):
                    record.items = parse_envelope(body)
                with ingest.lock:
                    ingest.received.append(record)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def dsn(self) -> str:
        return f"http://publickey@127.0.0.1:{self.server.server_address[1]}/1"

    def items(self, kind: str) -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(payload) for record in self.received for header, payload in record.items
                    if header.get("type") == kind]

    def error_events(self) -> list[dict[str, Any]]:
        return [e for e in self.items("event") if e.get("level", "error") in ("error", "fatal")]

    def everything(self) -> bytes:
        """Every byte received, as sent (compressed) and decoded, with paths and headers."""
        with self.lock:
            return b"\n".join(r.path.encode() + json.dumps(r.headers).encode() + r.raw + r.body
                              for r in self.received)

    def clear(self) -> None:
        with self.lock:
            self.received.clear()

    def __enter__(self) -> SentryIngest:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def sentry() -> Iterator[SentryIngest]:
    with SentryIngest() as ingest:
        yield ingest


@pytest.fixture(scope="module")
def password_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A throwaway Redis that demands a password (the configuration goes in on stdin, not argv)."""
    port = free_port()
    directory = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(["redis-server", "-"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=directory)
    assert proc.stdin is not None
    proc.stdin.write(f"port {port}\nbind 127.0.0.1\nrequirepass {BROKER_PASSWORD}\nsave \"\"\nappendonly no\n"
                     f"dir {directory}\n".encode())
    proc.stdin.close()
    url = f"redis://:{BROKER_PASSWORD}@127.0.0.1:{port}/0"
    try:
        wait_until(lambda: _redis_answers(url), timeout=10, what="the password-protected Redis")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def finished(result: Any, timeout: float = 60) -> Any:
    wait_until(lambda: result.state in ("SUCCESS", "FAILURE"), timeout=timeout, what=f"task {result.id}")
    return result


def tags_of(event: dict[str, Any]) -> dict[str, str]:
    tags = event.get("tags") or {}
    return dict(tags) if isinstance(tags, dict) else {k: v for k, v in tags}


def exception_type(event: dict[str, Any]) -> str:
    return str(event["exception"]["values"][-1]["type"])


# --- fast: what the tasks and the SDK are configured to do ---------------------------------------------

def test_retry_policy_follows_the_error_types() -> None:
    from backup_tasks.worker import tasks

    for task in (tasks.dump, tasks.verify, tasks.prune, tasks.post_close, tasks.daily, tasks.health):
        retried = task.autoretry_for
        for transient in (SourceUnavailable, LockBusy):
            assert issubclass(transient, retried), (task.name, transient)
        for permanent in (AuthenticationFailed, ToolMissing, StorageFull, ConfigError, DatabaseMissing,
                          BackupCorrupt, VerificationFailed, HealthCheckFailed):
            assert not issubclass(permanent, retried), (task.name, permanent)
        assert task.retry_backoff and task.retry_jitter and task.max_retries


def test_retry_policy_settings() -> None:
    from backup_tasks.worker.config import retry_policy

    assert retry_policy({}).backoff == 30 and retry_policy({}).max_retries == 5
    custom = retry_policy({"BACKUP_RETRY_BACKOFF": "5", "BACKUP_MAX_RETRIES": "2"})
    assert (custom.backoff, custom.max_retries) == (5, 2)
    assert retry_policy({"BACKUP_MAX_RETRIES": "many"}) == retry_policy({})  # logged; the worker still starts


@pytest.mark.slow
def test_sentry_init_options(tmp_path: Path) -> None:
    """Initialised in a child process (never in the test process), reading the settings from the environment."""
    script = """
import json, logging, sentry_sdk
from backup_tasks.worker.sentry import init_sentry
from backup_tasks.worker.config import schedule_settings
from sentry_sdk.integrations.celery import CeleryIntegration
from sentry_sdk.integrations.logging import LoggingIntegration
assert init_sentry(schedule_settings())
options = sentry_sdk.get_client().options
celery = sentry_sdk.get_client().get_integration(CeleryIntegration)
logging_integration = sentry_sdk.get_client().get_integration(LoggingIntegration)
print(json.dumps({"dsn": options["dsn"], "environment": options["environment"], "pii": options["send_default_pii"],
    "locals": options["include_local_variables"], "before_send": options["before_send"] is not None,
    "traces": options["traces_sample_rate"], "monitor_beat_tasks": celery.monitor_beat_tasks,
    "propagate_traces": celery.propagate_traces,
    "log_event_level": logging_integration._handler is not None}))
"""
    env = celery_env("redis://127.0.0.1:6379/0", tmp_path, SENTRY_DSN="http://publickey@127.0.0.1:9/1",
                     SENTRY_ENVIRONMENT="staging", DATABASE_URL="mysql://broken")
    out = subprocess.run([str(Path(CELERY).parent / "python"), "-c", script], env=env, cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    options = json.loads(out.strip().splitlines()[-1])
    assert options["dsn"] == "http://publickey@127.0.0.1:9/1" and options["environment"] == "staging"
    assert options["pii"] is False and options["locals"] is False and options["before_send"] is True
    assert options["traces"] == 0.0
    assert options["monitor_beat_tasks"] is True
    # Error-level log lines must not become events of their own (a failed task is one event).
    assert options["log_event_level"] is False
    # Without SENTRY_DSN nothing is initialised.
    off = subprocess.run([str(Path(CELERY).parent / "python"), "-c",
                          "from backup_tasks.worker.sentry import init_sentry; "
                          "from backup_tasks.settings import Settings;"
                          "print(init_sentry(Settings()))"], env=celery_env("redis://x", tmp_path),
                         capture_output=True, text=True, check=True).stdout
    assert off.strip() == "False"


def test_crons_monitor_config_for_the_beat_entries() -> None:
    """What the Celery integration derives from our schedule: the crontab, in the exchange's timezone."""
    from sentry_sdk.integrations.celery.beat import _get_monitor_config

    env = {"BACKUP_DAILY_AT": "02:15"}
    app = Celery("crons-test", set_as_current=False)
    app.conf.update(build_config(env))
    entries = beat_schedule(schedule_settings(env))
    for name, expected in (("daily-backup", "15 2 * * *"), ("backup-health", "0 9 * * *")):
        schedule = entries[name]["schedule"]
        schedule.app = app
        config = _get_monitor_config(schedule, app, name)
        assert config == {"schedule": {"type": "crontab", "value": expected}, "timezone": "Asia/Kolkata"}


def test_scrubbing_removes_passwords_from_any_url_form() -> None:
    from backup_tasks.worker.sentry import scrub_event

    event = {"message": "failed: postgresql+psycopg2://trader:pw-one@db:5432/aitrapp",
             "extra": {"urls": ["redis://:pw-two@redis:6379/0", "postgres://u:pw-three@h/d?sslmode=require"],
                       "dsn": "host=db password=pw-four user=x"}}
    text = json.dumps(scrub_event(event))
    for secret in ("pw-one", "pw-two", "pw-three", "pw-four"):
        assert secret not in text
    assert "trader:***@db" in text


def test_secret_values_from_the_environment_are_scrubbed_even_bare(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's Celery settings leave DATABASE_URL out, so its password is collected separately."""
    from backup_tasks.worker import sentry as alerts

    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg2://trader:p%40ss-w0rd@db:5432/aitrapp")
    monkeypatch.setenv("FLOWER_BASIC_AUTH", "ops:fl0wer-pw")
    monkeypatch.setenv("PGPASSWORD", "pg-env-pw")
    monkeypatch.setattr(alerts, "_secrets", alerts._env_secrets())
    event = {"message": "login with p@ss-w0rd (p%40ss-w0rd) failed", "extra": {"x": ["fl0wer-pw", "pg-env-pw"]}}
    text = json.dumps(alerts.scrub_event(event))
    for secret in ("p@ss-w0rd", "p%40ss-w0rd", "fl0wer-pw", "pg-env-pw"):
        assert secret not in text


# --- slow: real worker and beat processes reporting to the endpoint ------------------------------------

@pytest.mark.slow
def test_a_failed_backup_is_one_tagged_event_without_secrets(
        sentry: SentryIngest, password_redis: str, password_server: ConnInfo, tmp_path: Path) -> None:
    """Wrong database password (a server that checks it), broker with a password: one event per failure."""
    database_url = (f"postgresql+psycopg2://{password_server.user}:{WRONG_DB_PASSWORD}@127.0.0.1:"
                    f"{password_server.port}/{password_server.dbname}")
    env = celery_env(password_redis, tmp_path / "backups", database_url, SENTRY_DSN=sentry.dsn,
                     SENTRY_ENVIRONMENT="test-env", BT_TEST_CANARY=CANARY)
    client = client_app(password_redis, password_redis)
    log_path = tmp_path / "worker.log"
    with running_worker(env, log_path=log_path):
        started = client.send_task("backup_tasks.post_close", args=["2026-11-27"], queue=QUEUE).get(timeout=30)
        dump = finished(client.AsyncResult(started["tasks"]["dump"]))
        assert dump.state == "FAILURE" and type(dump.result).__name__ == "AuthenticationFailed"
        assert dump.retries == 0  # permanent: reported at once, never retried
        wait_until(lambda: sentry.error_events(), timeout=20, what="the Sentry event")
        time.sleep(3)  # room for a duplicate (a second event from a log line) to show up
        (event,) = sentry.error_events()
        assert exception_type(event) == "AuthenticationFailed"
        assert "authentication failed" in event["exception"]["values"][-1]["value"]
        tags = tags_of(event)
        assert tags["backup.kind"] == "dump"
        assert tags["backup.database"] == password_server.dbname
        assert tags["backup.id"] == started["backup_id"]
        assert tags["celery.task"] == "backup_tasks.dump"
        assert event["extra"]["celery-job"]["task_name"] == "backup_tasks.dump"
        assert event["environment"] == "test-env"

        # A health failure (no backup at all) is reported too: one more event, tagged.
        health = finished(client.send_task("backup_tasks.health", queue=QUEUE))
        assert health.state == "FAILURE" and "no backup found" in str(health.result)
        wait_until(lambda: len(sentry.error_events()) >= 2, timeout=20, what="the health event")
        time.sleep(2)
        _auth_event, second = sentry.error_events()
        assert exception_type(second) == "HealthCheckFailed"
        assert tags_of(second)["backup.kind"] == "dump" and tags_of(second)["celery.task"] == "backup_tasks.health"
        assert tags_of(second)["backup.database"] == password_server.dbname
    client.close()
    received = sentry.everything()
    assert received
    for secret in (WRONG_DB_PASSWORD, BROKER_PASSWORD, CANARY, password_server.password or "unset"):
        assert secret.encode() not in received, f"{secret} was sent to Sentry"
    assert b"PGPASSWORD" not in received
    log = log_path.read_text()
    assert WRONG_DB_PASSWORD not in log and BROKER_PASSWORD not in log


@pytest.mark.slow
def test_transient_failures_retry_with_backoff_then_report_once(
        sentry: SentryIngest, password_redis: str, tmp_path: Path) -> None:
    unused_port = free_port()  # nothing listens: "connection refused", the server is down
    env = celery_env(password_redis, tmp_path / "backups",
                     f"postgresql://trader:{WRONG_DB_PASSWORD}@127.0.0.1:{unused_port}/aitrapp",
                     SENTRY_DSN=sentry.dsn, BACKUP_RETRY_BACKOFF="1", BACKUP_MAX_RETRIES="2")
    client = client_app(password_redis, password_redis)
    log_path = tmp_path / "worker.log"
    with running_worker(env, log_path=log_path):
        result = client.send_task("backup_tasks.dump", queue=QUEUE)
        finished(result, timeout=60)
        assert result.state == "FAILURE" and type(result.result).__name__ == "SourceUnavailable"
        assert result.retries == 2
        wait_until(lambda: sentry.error_events(), timeout=20, what="the Sentry event")
        time.sleep(2)
        # Three attempts, one event: the retries themselves are not reported.
        (event,) = sentry.error_events()
        assert exception_type(event) == "SourceUnavailable" and tags_of(event)["backup.database"] == "aitrapp"
    client.close()
    retries = [line for line in log_path.read_text().splitlines() if f"[{result.id}] retry: Retry in" in line]
    assert len(retries) == 2 and all("SourceUnavailable" in line for line in retries), retries
    assert WRONG_DB_PASSWORD.encode() not in sentry.everything()


def _start_beat(env: dict[str, str], schedule: Path, log_path: Path) -> subprocess.Popen[bytes]:
    log = open(log_path, "ab")  # noqa: SIM115 - closed with the process below
    proc = subprocess.Popen([CELERY, "-A", "backup_tasks", "beat", "-s", str(schedule), "--loglevel=INFO"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    return proc


@pytest.mark.slow
def test_beat_catches_a_missed_daily_run_skips_a_done_day_and_checks_in_with_sentry_crons(
        sentry: SentryIngest, redis_url: str, trading_db: ConnInfo, tmp_path: Path) -> None:
    backup_dir = tmp_path / "backups"
    env = celery_env(redis_url, backup_dir, url_of(trading_db), SENTRY_DSN=sentry.dsn)
    # Today's session is already backed up (the post-close hook ran).
    day = session_day(utcnow(), Settings())
    settings = Settings(database_url=url_of(trading_db), backup_dir=str(backup_dir), broker_url=redis_url)
    existing, _ = run_dump(settings, trading_day=day)
    schedule = tmp_path / "celerybeat-schedule"
    beat_log = tmp_path / "beat.log"
    client = client_app(redis_url, redis_url)
    try:
        with running_worker(env, log_path=tmp_path / "worker.log"):
            # Beat's first start records "last run: now" for each entry, so nothing is due yet.
            beat = _start_beat(env, schedule, beat_log)
            try:
                wait_until(lambda: "beat: Starting" in beat_log.read_text(), timeout=30, what="beat to start")
                time.sleep(1.5)
            finally:
                stop_process(beat, timeout=20)
            assert sentry.items("check_in") == []
            # Beat was then down for two days: its schedule file says the daily run last happened then.
            with shelve.open(str(schedule), writeback=True) as store:
                store["entries"]["daily-backup"].last_run_at = utcnow() - timedelta(days=2)
            beat = _start_beat(env, schedule, beat_log)
            try:
                checkins = wait_until(lambda: [c for c in sentry.items("check_in") if c["status"] == "ok"],
                                      timeout=30, what="the Crons check-in of the daily run")
            finally:
                stop_process(beat, timeout=20)
        daily = _results_named(redis_url, "backup_tasks.daily")
    finally:
        client.close()
        redis.Redis.from_url(redis_url).flushdb()
    statuses = [(c["monitor_slug"], c["status"]) for c in sentry.items("check_in")]
    assert ("daily-backup", "in_progress") in statuses  # from beat, when it sent the task
    assert ("daily-backup", "ok") in statuses  # from the worker, when the task succeeded
    assert all(slug == "daily-backup" for slug, _status in statuses)  # health was not due
    (ok,) = checkins
    assert ok["monitor_config"] == {"schedule": {"type": "crontab", "value": "0 2 * * *"}, "timezone": "Asia/Kolkata"}
    in_progress = next(c for c in sentry.items("check_in") if c["status"] == "in_progress")
    assert in_progress["check_in_id"] == ok["check_in_id"]
    # The run itself found the day done and skipped: no second dump.
    (result,) = daily
    assert result["status"] == "skipped" and result["backup_id"] == existing.id
    assert result["trading_day"] == day
    assert sentry.error_events() == []


def _results_named(url: str, task_name: str) -> list[dict[str, Any]]:
    client = redis.Redis.from_url(url)
    found = []
    for key in client.scan_iter("celery-task-meta-*"):
        raw = client.get(key)
        meta = json.loads(raw) if raw else {}
        if meta.get("name") == task_name:
            found.append(meta["result"])
    return found
