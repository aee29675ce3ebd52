"""Redis and real worker processes (a pytest plugin: ``redis_url`` is available by name everywhere).

Redis, in order of preference: ``BACKUP_TASKS_TEST_REDIS_URL``; testcontainers where a Docker engine
answers; the local server, on a DB number of its own (``BACKUP_TASKS_TEST_REDIS_DB``, else the first
of 13, 12, ... 1 that no other live test session holds), flushed before and after. Two test sessions
on one machine (CI beside a developer's run) must not share a DB: each would flush the other's
queued tasks, claims and results mid-test. Worker, beat and Flower processes run from the project root in a
session of their own, so a test can stop them with their children.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.paths import CELERY, ROOT
from tests.support.postgres import docker_available
from tests.support.require import unavailable


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:

    if os.environ.get("BACKUP_TASKS_TEST_REDIS_URL"):
        url = os.environ["BACKUP_TASKS_TEST_REDIS_URL"]
    elif docker_available():
        from testcontainers.redis import RedisContainer

        with RedisContainer() as container:
            host, port = container.get_container_host_ip(), container.get_exposed_port(6379)
            yield f"redis://{host}:{port}/0"
        return
    else:
        with _leased_db() as db:
            yield from _flushed(f"redis://127.0.0.1:6379/{db}")
        return
    yield from _flushed(url)


def _flushed(url: str) -> Iterator[str]:
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.RedisError as exc:
        unavailable(f"no Redis at {url}: {exc}", "apt-get install redis-server, then scripts/services.sh starts it")
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


#: DB 0 holds the leases: ``backup-tasks-test:db:<n>`` names the session using DB ``n``.
LEASE_KEY = "backup-tasks-test:db:{}"
LEASE_SECONDS = 3 * 3600  # longer than any suite; a killed session's DB is free again after it


@contextlib.contextmanager
def _leased_db() -> Iterator[int]:
    """A DB number of the local Redis that no other live test session uses, held until the session ends."""
    import redis

    pinned = os.environ.get("BACKUP_TASKS_TEST_REDIS_DB")
    if pinned:
        yield int(pinned)
        return
    client = redis.Redis(host="127.0.0.1", port=6379, db=0, socket_connect_timeout=5)
    owner = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        db = next((n for n in range(13, 0, -1)
                   if client.set(LEASE_KEY.format(n), owner, nx=True, ex=LEASE_SECONDS)), None)
    except redis.RedisError as exc:
        unavailable(f"no Redis at 127.0.0.1:6379: {exc}",
                    "apt-get install redis-server, then scripts/services.sh starts it")
    if db is None:
        unavailable("every Redis DB from 1 to 13 is leased by another test session",
                    f"wait for them, or delete the {LEASE_KEY.format('*')} keys in DB 0 of stale ones")
    try:
        yield db
    finally:
        with contextlib.suppress(redis.RedisError):
            if client.get(LEASE_KEY.format(db)) == owner.encode():
                client.delete(LEASE_KEY.format(db))
        client.close()


def worker_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "BACKUP_", "SENTRY_"))}
    env.pop("DATABASE_URL", None)
    env.update(extra)
    return env


@contextlib.contextmanager
def running_worker(env: dict[str, str], *, concurrency: int = 2, log_path: Path | None = None,
                   hostname: str | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """A real ``celery -A backup_tasks worker -Q backups`` process, from the project root, until the block ends."""
    name = hostname or f"bt-test-{uuid.uuid4().hex[:6]}@%h"
    log_file = open(log_path or os.devnull, "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [CELERY, "-A", "backup_tasks", "worker", "-Q", "backups", "--loglevel=INFO", f"--concurrency={concurrency}",
         "--pool=prefork", "-n", name, "--without-mingle", "--without-gossip"],
        cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_for_worker(env, proc, log_path)
        yield proc
    finally:
        stop_process(proc, timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # pool children, if any survived
        log_file.close()


def stop_process(proc: subprocess.Popen[bytes], *, timeout: float) -> None:
    """SIGTERM, then SIGKILL of its whole process group after ``timeout`` (started with start_new_session)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for_worker(env: dict[str, str], proc: subprocess.Popen[bytes], log_path: Path | None,
                    timeout: float = 60) -> None:
    from celery import Celery

    probe = Celery(broker=env["CELERY_BROKER_URL"], backend=env.get("CELERY_RESULT_BACKEND"))
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                detail = log_path.read_text()[-3000:] if log_path else ""
                raise RuntimeError(f"celery worker exited with {proc.returncode}: {detail}")
            if probe.control.ping(timeout=1.0):
                return
            time.sleep(0.3)
        raise RuntimeError("celery worker did not answer a ping within 60 s")
    finally:
        probe.close()


def client_app(broker: str, backend: str) -> object:
    """A Celery app that knows nothing of backup_tasks: what the trading app would have."""
    from celery import Celery

    app = Celery("trading_app_client", broker=broker, backend=backend)
    app.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")
    return app


def wait_until(predicate: Callable[[], object], *, timeout: float = 30.0, interval: float = 0.1,
               what: str = "the condition") -> object:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def celery_env(redis: str, backup_dir: Path, database_url: str | None = None, **extra: str) -> dict[str, str]:
    """Environment of a worker, beat or client process: broker and results on the test Redis DB."""
    env = worker_env(CELERY_BROKER_URL=redis, CELERY_RESULT_BACKEND=redis, BACKUP_DIR=str(backup_dir), **extra)
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    return env


def process_children(pid: int) -> list[tuple[int, str]]:
    """(pid, command name) of the direct children of ``pid``, read from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        parent = int(stat[stat.rindex(")") + 2:].split()[1])
        if parent == pid:
            found.append((int(entry), name))
    return found
