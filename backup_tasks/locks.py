"""Mutual exclusion per database and operation: a Redis lock with expiry, or a file lock.

Workers on several hosts share Redis, so the Redis lock is the real one: ``SET NX PX`` with a
token, renewed by a heartbeat thread while the holder lives, so a killed holder's lock lapses
within ``ttl`` seconds. Without a Redis URL (the demo, a CLI on a box without Redis) an ``flock``
on a file in the temp directory serves the same purpose on one machine; the kernel drops it
when the holder dies.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from backup_tasks.errors import ConfigError, LockBusy
from backup_tasks.settings import Settings

log = logging.getLogger(__name__)


DEFAULT_TTL = 120  # seconds: how long a killed holder blocks others
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
_RENEW = ("if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) "
          "else return 0 end")


def _holder_description() -> dict[str, object]:
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": since}


def _holder_is_dead(raw: bytes) -> bool:
    """True only for a holder on this host whose process no longer exists."""
    try:
        info = json.loads(raw)
        if info.get("host") != socket.gethostname():
            return False
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return True
    except (ValueError, KeyError, TypeError, PermissionError):
        return False
    return False


def _describe_holder(raw: bytes) -> str:
    try:
        info = json.loads(raw)
        return f" (held by pid {info['pid']} on {info['host']} since {info['since']})"
    except (ValueError, KeyError, TypeError):
        return ""


@contextmanager
def redis_lock(url: str, key: str, *, ttl: int = DEFAULT_TTL, busy_message: str) -> Iterator[None]:
    import redis  # imported here: wal-push and the plain CLI paths must not pay for it

    client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10)
    token = uuid.uuid4().hex
    value = json.dumps({"token": token, **_holder_description()})
    if not client.set(key, value, nx=True, px=ttl * 1000):
        holder = client.get(key)
        if holder and _holder_is_dead(holder):
            # A killed run on this machine: take its lock over now rather than wait for the expiry.
            client.eval(_RELEASE, 1, key, holder)
            log.warning("took over the lock of a dead process: %s", holder.decode(errors="replace"))
            if client.set(key, value, nx=True, px=ttl * 1000):
                holder = None
        if holder is not None:
            client.close()
            raise LockBusy(busy_message + _describe_holder(holder))
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(ttl / 3):
            try:
                client.eval(_RENEW, 1, key, value, ttl * 1000)
            except Exception:
                log.warning("could not renew lock %s", key)

    thread = threading.Thread(target=heartbeat, name="lock-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        try:
            client.eval(_RELEASE, 1, key, value)
        finally:
            client.close()


@contextmanager
def file_lock(name: str, *, busy_message: str) -> Iterator[None]:
    path = _local_path(name, ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockBusy(busy_message) from None
        yield
    finally:
        os.close(fd)


def _redis_reachable(url: str) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    except ValueError as exc:
        raise ConfigError(f"the lock server URL (BACKUP_LOCK_URL, else CELERY_BROKER_URL) is not a valid Redis "
                          f"URL: {exc}") from None
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


@contextmanager
def hold(settings: Settings, name: str, *, what: str, ttl: int = DEFAULT_TTL) -> Iterator[None]:
    """Hold the lock ``name`` or raise ``LockBusy`` at once saying ``what`` is already running."""
    scoped = _scoped(settings, "lock", name)
    busy = f"{what} is already running; this run did nothing"
    url = settings.effective_lock_url
    if url and _redis_reachable(url):
        with redis_lock(url, scoped, ttl=ttl, busy_message=busy):
            yield
        return
    if url:
        log.warning("lock server unreachable; using a local file lock (exclusive on this machine only)")
    with file_lock(scoped, busy_message=busy):
        yield


def _scoped(settings: Settings, kind: str, name: str) -> str:
    """Names are scoped by the backup location, so two catalogs never block each other."""
    return f"backup-tasks:{kind}:{hashlib.sha256(settings.backup_dir.encode()).hexdigest()[:12]}:{name}"


def _local_path(scoped: str, suffix: str) -> Path:
    directory = Path(tempfile.gettempdir()) / f"backup-tasks-locks-{os.getuid()}"
    directory.mkdir(mode=0o700, exist_ok=True)
    return directory / (hashlib.sha256(scoped.encode()).hexdigest()[:32] + suffix)


def claim(settings: Settings, name: str, value: str, *, ttl: int) -> str | None:
    """Record ``value`` under ``name`` unless a live claim exists; return the existing claim's value.

    Unlike a lock, a claim outlives the process that made it (until ``ttl`` or ``release_claim``):
    it marks work handed over to other tasks, such as a post-close workflow in flight.
    """
    scoped = _scoped(settings, "claim", name)
    url = settings.effective_lock_url
    if url and _redis_reachable(url):
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10)
        try:
            if client.set(scoped, value, nx=True, ex=ttl):
                return None
            existing = client.get(scoped)
            return existing.decode() if existing else None
        finally:
            client.close()
    path = _local_path(scoped, ".claim")
    with file_lock(scoped + ":guard", busy_message="claim busy"):
        if path.exists() and time.time() - path.stat().st_mtime < ttl:
            return path.read_text()
        path.write_text(value)
        return None


_RELEASE_CONTAINING = ("local v = redis.call('get', KEYS[1]) if v and string.find(v, ARGV[1], 1, true) then "
                       "return redis.call('del', KEYS[1]) else return 0 end")


def release_claim(settings: Settings, name: str, token: str) -> None:
    """Drop the claim ``name`` if its value contains ``token`` (a claim made by someone else stays)."""
    scoped = _scoped(settings, "claim", name)
    url = settings.effective_lock_url
    if url and _redis_reachable(url):
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10)
        try:
            client.eval(_RELEASE_CONTAINING, 1, scoped, token)
        finally:
            client.close()
        return
    path = _local_path(scoped, ".claim")
    with file_lock(scoped + ":guard", busy_message="claim busy"):
        if path.exists() and token in path.read_text():
            path.unlink()
