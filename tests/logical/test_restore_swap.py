"""``restore --replace`` never loses both databases, wherever it is interrupted."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from backup_tasks.conninfo import ConnInfo
from backup_tasks.errors import RestoreFailed
from backup_tasks.logical import restore as restoring
from backup_tasks.logical.dump import run_dump
from backup_tasks.logical.restore import restore_backup
from backup_tasks.postgres.connect import connect
from backup_tasks.settings import Settings
from tests.support.postgres import url_of

OLD_ROWS = 7


@pytest.fixture
def backup_and_target(trading_db: ConnInfo, make_database: Callable[..., ConnInfo],
                      tmp_path: Path) -> tuple[Settings, str, ConnInfo]:
    settings = Settings(database_url=url_of(trading_db), backup_dir=str(tmp_path / "backups"),
                        broker_url="memory://", lock_url=None)
    manifest, _ = run_dump(settings)
    target = make_database()
    with connect(target) as conn:
        conn.execute(f"CREATE TABLE precious AS SELECT g FROM generate_series(1, {OLD_ROWS}) g")
    return settings, manifest.id, target


def databases_like(admin: ConnInfo, target: ConnInfo) -> list[str]:
    with connect(admin) as conn:
        rows = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s ORDER BY 1",
                            (target.dbname[:40] + "%",)).fetchall()
    return [r[0] for r in rows]


def holds_old_data(db: ConnInfo) -> bool:
    with connect(db) as conn:
        try:
            return conn.execute("SELECT count(*) FROM precious").fetchone()[0] == OLD_ROWS
        except psycopg.errors.UndefinedTable:
            return False


def interrupt_rename(monkeypatch: pytest.MonkeyPatch, *, calls: set[int], error: BaseException) -> None:
    real = restoring.rename_database
    seen = [0]

    def rename(admin: Any, old: str, new: str) -> None:
        seen[0] += 1
        if seen[0] in calls:
            raise error
        real(admin, old, new)

    monkeypatch.setattr(restoring, "rename_database", rename)


def test_interrupted_while_swapping_in_the_target_keeps_its_old_data(
        backup_and_target: tuple[Settings, str, ConnInfo], pg_admin: ConnInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    settings, backup_id, target = backup_and_target
    interrupt_rename(monkeypatch, calls={2}, error=KeyboardInterrupt())  # 1: target aside, 2: restored copy in
    with pytest.raises(KeyboardInterrupt):
        restore_backup(settings, backup_id, url_of(target), replace=True)
    assert holds_old_data(target)
    assert databases_like(pg_admin, target) == [target.dbname]  # no staging, no aside copy left


def test_when_even_the_way_back_fails_the_message_names_the_old_copy(
        backup_and_target: tuple[Settings, str, ConnInfo], pg_admin: ConnInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    settings, backup_id, target = backup_and_target
    interrupt_rename(monkeypatch, calls={2, 3}, error=psycopg.OperationalError("server closed the connection"))
    with pytest.raises(RestoreFailed) as caught:
        restore_backup(settings, backup_id, url_of(target), replace=True)
    kept = [name for name in databases_like(pg_admin, target) if "__replaced_" in name]
    assert len(kept) == 1 and repr(kept[0]) in str(caught.value)
    assert holds_old_data(target.with_dbname(kept[0]))
    with connect(pg_admin) as conn:
        for name in databases_like(pg_admin, target):
            if name != target.dbname:
                conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def test_interrupted_while_dropping_the_old_copy_the_target_has_the_new_data_and_the_message_says_where(
        backup_and_target: tuple[Settings, str, ConnInfo], pg_admin: ConnInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    settings, backup_id, target = backup_and_target
    real_drop = restoring.drop_database

    def drop(admin: Any, name: str, *, force: bool = False) -> None:
        if "__replaced_" in name:
            raise KeyboardInterrupt
        real_drop(admin, name, force=force)

    monkeypatch.setattr(restoring, "drop_database", drop)
    with pytest.raises(RestoreFailed, match="kept as") as caught:
        restore_backup(settings, backup_id, url_of(target), replace=True)
    assert not holds_old_data(target)  # the restored data is under the target's name
    kept = [name for name in databases_like(pg_admin, target) if "__replaced_" in name]
    assert len(kept) == 1 and repr(kept[0]) in str(caught.value) and holds_old_data(target.with_dbname(kept[0]))
    with connect(pg_admin) as conn:
        conn.execute(f'DROP DATABASE "{kept[0]}" WITH (FORCE)')


def test_a_replace_without_faults_leaves_only_the_restored_target(
        backup_and_target: tuple[Settings, str, ConnInfo], pg_admin: ConnInfo) -> None:
    settings, backup_id, target = backup_and_target
    result = restore_backup(settings, backup_id, url_of(target), replace=True)
    assert result.ok and result.replaced and result.notes == []
    assert databases_like(pg_admin, target) == [target.dbname] and not holds_old_data(target)
