"""A dump that fails at any step leaves no child process, no open snapshot, and nothing published."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis

from backup_tasks.catalog import manifest as catalog
from backup_tasks.conninfo import ConnInfo
from backup_tasks.errors import LockLost, StorageError, StorageFull
from backup_tasks.locks import _scoped
from backup_tasks.logical.dump import dump_lock_name, run_dump
from backup_tasks.postgres.connect import connect
from backup_tasks.settings import Settings
from backup_tasks.storage.base import PARTIAL_MARK
from backup_tasks.storage.local import LocalStorage
from tests.support.postgres import url_of
from tests.support.processes import process_children


def pg_dump_children() -> list[int]:
    """pg_dump processes started by this test process."""
    return [pid for pid, name in process_children(os.getpid()) if name == "pg_dump"]


def sessions_on(db: ConnInfo, admin: ConnInfo) -> list[tuple[str, str, bool]]:
    """(application_name, state, holds a snapshot) of every other session on the database."""
    with connect(admin) as conn:
        rows = conn.execute("SELECT application_name, coalesce(state, ''), backend_xmin IS NOT NULL "
                            "FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                            (db.dbname,)).fetchall()
    return [(str(a), str(s), bool(x)) for a, s, x in rows]


def settle(db: ConnInfo, admin: ConnInfo, timeout: float = 10) -> list[tuple[str, str, bool]]:
    deadline = time.monotonic() + timeout
    while (found := sessions_on(db, admin)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return found


class FailingStorage(LocalStorage):
    """A location that refuses the dump: at ``writer()`` (disk full at open) or after ``fail_after`` writes."""

    def __init__(self, root: Path, *, at_open: bool = False, fail_after: int | None = None) -> None:
        super().__init__(root)
        self.at_open, self.fail_after = at_open, fail_after

    def writer(self, key: str) -> Any:
        if self.at_open:
            raise StorageFull(f"no space left on device while creating {key} (injected)")
        inner = super().writer(key)
        if self.fail_after is None:
            return inner
        storage = self

        class Failing:
            writes = 0

            def write(self, data: bytes) -> None:
                self.writes += 1
                if self.writes > (storage.fail_after or 0):
                    raise StorageError("the bucket went away (injected)")
                inner.write(data)

            def commit(self) -> None:
                inner.commit()

            def abort(self) -> None:
                inner.abort()

        return Failing()


@pytest.fixture
def big_db(make_database: Any) -> ConnInfo:
    """Enough rows that pg_dump is still streaming when the writer fails."""
    db = make_database()
    with connect(db) as conn:
        conn.execute("CREATE TABLE ticks AS SELECT g AS id, md5(g::text) AS payload FROM generate_series(1, 400000) g")
    return db


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["at_open", "mid_stream"])
def test_a_failing_location_leaves_no_pg_dump_and_no_open_snapshot(big_db: ConnInfo, pg_admin: ConnInfo,
                                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    fault: str) -> None:
    root = tmp_path / "backups"
    failing = FailingStorage(root, at_open=fault == "at_open", fail_after=2 if fault == "mid_stream" else None)
    monkeypatch.setattr(Settings, "locations", lambda *_args, **_kw: failing)
    settings = Settings(database_url=url_of(big_db), backup_dir=str(root), broker_url="memory://", lock_url=None)
    started = time.monotonic()
    with pytest.raises(StorageError):
        run_dump(settings)
    assert time.monotonic() - started < 30
    assert pg_dump_children() == [], "pg_dump was left running"
    assert settle(big_db, pg_admin) == [], "a session (pg_dump, or the snapshot's transaction) was left open"
    assert not root.exists() or [p.name for p in root.iterdir() if PARTIAL_MARK not in p.name] == []


def test_a_dump_that_loses_its_lock_publishes_nothing(trading_db: ConnInfo, redis_url: str, tmp_path: Path) -> None:
    root = tmp_path / "backups"
    settings = Settings(database_url=url_of(trading_db), backup_dir=str(root), broker_url=redis_url,
                        lock_url=redis_url)
    key = _scoped(settings, "lock", dump_lock_name(trading_db))
    client = redis.Redis.from_url(redis_url)

    def stall_past_the_expiry(phase: str, **_info: object) -> None:
        if phase == "counting rows":  # the data is streamed; nothing is committed yet
            client.set(key, b'{"token": "the next run"}')  # our lock lapsed and another run took it

    with pytest.raises(LockLost, match="before committing"):
        run_dump(settings, progress=stall_past_the_expiry)
    storage = LocalStorage(root)
    assert catalog.catalog(storage) == []
    assert [p.name for p in root.iterdir()] == [] if root.exists() else True
    client.delete(key)
    assert run_dump(replace(settings))[0].state == "complete"  # the lock is free again: the next run works
