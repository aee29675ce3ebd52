"""Locks that stop their holder when lost, and never fall back silently to a lock that excludes only this host."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis

from backup_tasks.errors import LockBusy, LockLost, LockServerUnavailable
from backup_tasks.locks import _scoped, claim, hold
from backup_tasks.settings import Settings
from tests.support.s3 import free_port


class TcpProxy:
    """127.0.0.1:<port> forwarded to Redis, until ``stop()``: a lock server that stops answering."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.running = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while self.running:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass

    def stop(self) -> None:
        """Stop forwarding without closing: renewals hang until their socket timeout, as with a dead host."""
        self.running = False
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked in the other thread
        except OSError:
            pass
        self.listener.close()
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture
def lock_settings(redis_url: str, tmp_path: Path) -> Settings:
    return Settings(backup_dir=str(tmp_path / "backups"), broker_url=redis_url, lock_url=redis_url)


@pytest.fixture
def proxy(redis_url: str) -> Iterator[TcpProxy]:
    db = redis.Redis.from_url(redis_url).connection_pool.connection_kwargs
    server = TcpProxy((db.get("host", "127.0.0.1"), int(db.get("port", 6379))))
    yield server
    server.stop()


def test_a_lease_taken_over_by_another_run_is_lost_and_the_fence_says_so(lock_settings: Settings,
                                                                          redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    with hold(lock_settings, "dump:test/db", what="a dump", ttl=30) as lease:
        lease.confirm()  # ours: no error
        # The lock expired while this holder stalled, and another run took it.
        client.set(_scoped(lock_settings, "lock", "dump:test/db"), b'{"token": "someone else"}')
        with pytest.raises(LockLost, match="no longer held by this run"):
            lease.confirm()
        assert lease.lost is not None
        with pytest.raises(LockLost):  # and it stays lost
            lease.confirm()


@pytest.mark.slow
def test_the_heartbeat_notices_a_lost_lock_without_being_asked(lock_settings: Settings, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    with hold(lock_settings, "dump:test/heartbeat", what="a dump", ttl=3) as lease:
        client.delete(_scoped(lock_settings, "lock", "dump:test/heartbeat"))  # expired
        deadline = time.monotonic() + 5
        while lease.lost is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert lease.lost is not None, "a renewal that returns 0 must mark the lease lost"


@pytest.mark.slow
def test_a_lock_server_that_stops_answering_loses_the_lease_after_the_expiry(lock_settings: Settings,
                                                                            proxy: TcpProxy, redis_url: str) -> None:
    db = redis_url.rsplit("/", 1)[-1]
    settings = replace(lock_settings, lock_url=f"redis://127.0.0.1:{proxy.port}/{db}")
    with hold(settings, "dump:test/silent", what="a dump", ttl=2) as lease:
        lease.confirm()
        proxy.stop()
        deadline = time.monotonic() + 15
        while lease.lost is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert lease.lost is not None and "not confirmed" in lease.lost
        with pytest.raises(LockLost):
            lease.confirm()


def test_an_unreachable_lock_server_is_a_retryable_error_unless_single_host(tmp_path: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    settings = Settings(backup_dir=str(tmp_path), broker_url=dead, lock_url=dead)
    with pytest.raises(LockServerUnavailable, match="BACKUP_SINGLE_HOST") as caught, \
            hold(settings, "dump:x/y", what="a dump"):
        pass
    assert caught.value.retryable
    with pytest.raises(LockServerUnavailable):
        claim(settings, "post-close:x", "v", ttl=60)
    single = replace(settings, single_host=True)
    with hold(single, "dump:x/y", what="a dump") as lease:  # a file lock: this host only, as declared
        lease.confirm()
        with pytest.raises(LockBusy), hold(single, "dump:x/y", what="a dump"):
            pass


def test_single_host_is_read_from_the_environment(tmp_path: Path) -> None:
    assert Settings.from_env({"BACKUP_SINGLE_HOST": "1"}).single_host is True
    assert Settings.from_env({}).single_host is False
