"""Mutual exclusion per database and operation: a Redis lock with expiry, or a file lock.

Workers on several hosts share Redis, so the Redis lock is the real one: ``SET NX PX`` with a
token, renewed by a heartbeat thread while the holder lives, so a killed holder's lock lapses
within ``ttl`` seconds. A holder that stalls past the expiry may find its lock gone (or taken):
the ``Lease`` it holds then says so, and ``lease.confirm()`` before every commit stops it before it
publishes anything. Without a Redis URL (the demo, a CLI on a box without Redis) an ``flock`` on a
file in the temp directory serves the same purpose on one machine; the kernel drops it when the
holder dies. An unreachable Redis falls back to that only where BACKUP_SINGLE_HOST says this is the
only host; elsewhere it is a retryable ``LockServerUnavailable``.
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from backup_tasks.conninfo import redact_url
from backup_tasks.errors import ConfigError, LockBusy, LockLost, LockServerUnavailable
from backup_tasks.settings import Settings
from backup_tasks.storage.base import ObjectWriter, Storage

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


class Lease:
    """What a lock holder keeps: ``confirm()`` right before anything is committed (the fence).

    A lease is lost when a renewal finds the lock no longer ours (it expired while we stalled and
    may now belong to another run) or when the lock server has not confirmed it for longer than
    its expiry (it may have lapsed without our knowing). A lost lease never comes back: the holder
    must stop and commit nothing.
    """

    def __init__(self, name: str, *, renew: Callable[[], bool] | None = None, ttl: float = DEFAULT_TTL) -> None:
        self.name = name
        self.ttl = ttl
        self._renew = renew
        self._confirmed_at = time.monotonic()
        self._lost: str | None = None
        self._mutex = threading.Lock()

    @property
    def lost(self) -> str | None:
        """Why the lease was lost, or None while it holds."""
        if self._lost is None and self._renew is not None and time.monotonic() - self._confirmed_at > self.ttl:
            self._lost = f"the lock server has not confirmed the lock for more than {self.ttl:.0f}s"
        return self._lost

    def renew(self) -> bool:
        """Extend the lock now; False (and the lease lost) when it is no longer ours. Never raises."""
        if self._renew is None:  # a file lock: the kernel holds it for as long as this process lives
            return True
        with self._mutex:
            if self.lost is not None:
                return False
            try:
                ours = self._renew()
            except Exception as exc:  # the server did not answer: only time tells whether it lapsed
                log.warning("could not renew lock %s: %s", self.name, exc)
                return self.lost is None
            if not ours:
                self._lost = "the lock expired and is no longer held by this run (another run may hold it)"
                return False
            self._confirmed_at = time.monotonic()
            return True

    def confirm(self) -> None:
        """The fence: raise ``LockLost`` unless the lock is still ours, confirmed by the server just now."""
        if not self.renew():
            raise LockLost(f"stopped before committing anything: {self.lost} ({self.name.rsplit(':', 1)[-1]})")

    def fence(self, storage: Storage) -> FencedStorage:
        """``storage`` whose every commit first confirms this lease (reads and deletes pass through)."""
        return FencedStorage(storage, self)


class FencedWriter:
    """An object writer whose ``commit`` happens only while the lease still holds."""

    def __init__(self, inner: ObjectWriter, lease: Lease) -> None:
        self.inner = inner
        self.lease = lease

    def write(self, data: bytes) -> None:
        self.inner.write(data)

    def commit(self) -> None:
        try:
            self.lease.confirm()
        except BaseException:
            self.inner.abort()
            raise
        self.inner.commit()

    def abort(self) -> None:
        self.inner.abort()


class FencedStorage:
    """A storage seen through a lease: writer commits, ``put_bytes`` and ``put_new`` confirm it first.

    Deletes are not fenced: cleaning up after a failure (a lost lock included) must still work.
    """

    def __init__(self, inner: Storage, lease: Lease) -> None:
        self.inner = inner
        self.lease = lease
        self.location = inner.location

    def writer(self, key: str) -> FencedWriter:
        return FencedWriter(self.inner.writer(key), self.lease)

    def put_bytes(self, key: str, data: bytes) -> None:
        self.lease.confirm()
        self.inner.put_bytes(key, data)

    def put_new(self, key: str, data: bytes) -> bool:
        self.lease.confirm()
        return self.inner.put_new(key, data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)  # reads, listing, deletes, members: as the storage itself


@contextmanager
def redis_lock(url: str, key: str, *, ttl: int = DEFAULT_TTL, busy_message: str) -> Iterator[Lease]:
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
    lease = Lease(key, renew=lambda: bool(client.eval(_RENEW, 1, key, value, ttl * 1000)), ttl=ttl)
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(ttl / 3):
            if not lease.renew():
                log.error("lock %s lost: %s", key, lease.lost)
                return

    thread = threading.Thread(target=heartbeat, name="lock-heartbeat", daemon=True)
    thread.start()
    try:
        yield lease
    finally:
        stop.set()
        thread.join(timeout=5)
        try:
            client.eval(_RELEASE, 1, key, value)
        except Exception as exc:  # the lock lapses by itself within ttl
            log.warning("could not release lock %s: %s", key, exc)
        finally:
            client.close()


@contextmanager
def file_lock(name: str, *, busy_message: str) -> Iterator[Lease]:
    path = _local_path(name, ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockBusy(busy_message) from None
        yield Lease(name)
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


def _lock_server(settings: Settings) -> str | None:
    """The Redis URL to lock on, or None for file locks; ``LockServerUnavailable`` when Redis is down.

    A file lock excludes only this host, so it replaces an unreachable Redis only where the deployment
    is declared single-host (BACKUP_SINGLE_HOST): elsewhere a second worker host could run the same
    dump at the same time, and waiting (a retry) is the safe answer.
    """
    url = settings.effective_lock_url
    if not url or _redis_reachable(url):
        return url
    if settings.single_host:
        log.warning("lock server unreachable; using a local file lock (BACKUP_SINGLE_HOST: this is the only host)")
        return None
    raise LockServerUnavailable(f"the lock server {redact_url(url)} (BACKUP_LOCK_URL, else CELERY_BROKER_URL) "
                                f"cannot be reached; nothing was done. Start Redis, or set BACKUP_SINGLE_HOST=1 if "
                                f"this is the only host that runs backups")


@contextmanager
def hold(settings: Settings, name: str, *, what: str, ttl: int = DEFAULT_TTL) -> Iterator[Lease]:
    """Hold the lock ``name`` or raise ``LockBusy`` at once saying ``what`` is already running.

    Yields the ``Lease``: call ``lease.confirm()`` right before committing anything.
    """
    scoped = _scoped(settings, "lock", name)
    busy = f"{what} is already running; this run did nothing"
    url = _lock_server(settings)
    lock = redis_lock(url, scoped, ttl=ttl, busy_message=busy) if url else file_lock(scoped, busy_message=busy)
    with lock as lease:
        yield lease


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
    url = _lock_server(settings)
    if url:
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
    url = _lock_server(settings)
    if url:
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
