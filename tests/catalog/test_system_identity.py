"""One system per catalog: a backup of another PostgreSQL system is refused (exit 2, naming both identifiers), and
prune never deletes another system's backups, even in a BACKUP_COPY_TO prefix two deployments share."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from backup_tasks.catalog import manifest as catalog
from backup_tasks.catalog.manifest import Manifest
from backup_tasks.catalog.prune import prune
from backup_tasks.clock import isoformat, utcnow
from backup_tasks.conninfo import ConnInfo
from backup_tasks.errors import SystemMismatch
from backup_tasks.logical.dump import run_dump
from backup_tasks.postgres.cluster import ThrowawayCluster
from backup_tasks.postgres.connect import connect
from backup_tasks.postgres.queries import system_identifier
from backup_tasks.settings import Settings
from backup_tasks.storage.base import Storage
from backup_tasks.storage.local import LocalStorage
from backup_tasks.wal.system import IDENTITY_KEY, claim
from tests.support.pitr import cli_env, run_cli
from tests.support.postgres import url_of


@pytest.fixture(scope="module")
def other_cluster() -> Iterator[ThrowawayCluster]:
    with ThrowawayCluster() as cluster:
        yield cluster


def recorded(directory: Path) -> str:
    return str(json.loads((directory / IDENTITY_KEY).read_text())["system_identifier"])


@pytest.mark.slow
def test_a_catalog_of_one_system_refuses_a_dump_of_another_and_so_does_a_shared_copy(
        trading_db: ConnInfo, other_cluster: ThrowawayCluster, tmp_path: Path) -> None:
    ours, shared, fresh = tmp_path / "ours", tmp_path / "shared-copy", tmp_path / "theirs"
    settings = Settings(database_url=url_of(trading_db), backup_dir=str(ours), copy_to=str(shared),
                        broker_url="memory://", lock_url=None)
    first, _ = run_dump(settings)
    with connect(trading_db) as conn:
        our_system = system_identifier(conn)
    with connect(other_cluster.conninfo()) as conn:
        their_system = system_identifier(conn)
    assert first.system_identifier == our_system and our_system != their_system
    assert recorded(ours) == recorded(shared) == our_system, "the first backup records the system everywhere"
    before = sorted(p.name for p in ours.iterdir())

    # Another cluster pointed at this catalog: refused before anything is dumped, both identifiers named.
    theirs = Settings(database_url=other_cluster.url(), backup_dir=str(ours), broker_url="memory://", lock_url=None)
    result = run_cli("dump", env=cli_env(theirs))
    assert result.returncode == 2, result.stderr
    assert our_system in result.stderr and their_system in result.stderr and "BACKUP_DIR" in result.stderr
    assert sorted(p.name for p in ours.iterdir()) == before, "nothing written, nothing changed"

    # Another deployment with a BACKUP_DIR of its own but this one's BACKUP_COPY_TO prefix: the copy refuses.
    sharing = Settings(database_url=other_cluster.url(), backup_dir=str(fresh), copy_to=str(shared),
                       broker_url="memory://", lock_url=None)
    with pytest.raises(SystemMismatch, match=f"(?s){their_system}.*{our_system}") as caught:
        run_dump(sharing)
    assert str(shared) in str(caught.value) and caught.value.exit_code == 2
    assert not fresh.exists() or not list(fresh.iterdir()), "the refused deployment recorded nothing, kept nothing"
    assert [m.id for m in catalog.catalog(LocalStorage(shared), every_system=True)] == [first.id]


# --- prune: a copy prefix shared by two deployments ----------------------------------------------------------

SYSTEM_A, SYSTEM_B = "7300000000000000001", "7300000000000000002"


def store(storages: list[Storage], system: str | None, days_ago: float, *, minute: int) -> Manifest:
    """A dump of ``aitrapp`` (both deployments call their database so) taken ``days_ago``, in every one of
    ``storages``: its data object, then its manifest."""
    started = (utcnow() - timedelta(days=days_ago)).replace(minute=minute, second=0, microsecond=0)
    backup_id = f"aitrapp-dump-{started:%Y%m%dT%H%M%SZ}"
    manifest = Manifest(id=backup_id, kind="dump", database="aitrapp", server="db:5432", server_version="15.4",
                        started_at=isoformat(started), finished_at=isoformat(started + timedelta(minutes=3)),
                        path=f"{backup_id}.dump.zst", size_bytes=4, sha256="0" * 64, compression="zstd",
                        system_identifier=system)
    for storage in storages:
        storage.put_bytes(manifest.path, b"dump")
        catalog.save_new(storage, manifest)
    return manifest


def test_two_deployments_sharing_a_copy_prefix_never_prune_each_other(tmp_path: Path) -> None:
    """Each deployment's prune plans its own backups only: the other's, in the shared prefix, are left alone
    (reported), whatever their age, and its own old ones (legacy ones without an identifier too) go."""
    a_dir, b_dir, shared = tmp_path / "a", tmp_path / "b", tmp_path / "shared"
    a, b, copy = LocalStorage(a_dir), LocalStorage(b_dir), LocalStorage(shared)
    remedy = "test"
    claim(a, SYSTEM_A, incoming="test", what="a", remedy=remedy)
    claim(b, SYSTEM_B, incoming="test", what="b", remedy=remedy)
    claim(copy, SYSTEM_A, incoming="test", what="the shared copy", remedy=remedy)  # A's first backup got there first
    legacy = store([a, copy], None, 20, minute=1)  # written before backups carried their system
    a_dumps = [store([a, copy], SYSTEM_A, days, minute=2) for days in (12, 10, 3, 1)]
    b_dumps = [store([b, copy], SYSTEM_B, days, minute=3) for days in (11, 9, 2, 0.5)]
    settings = Settings(backup_dir=str(a_dir), copy_to=str(shared), broker_url="memory://", lock_url=None,
                        keep_daily_days=7)

    report = prune(settings)
    assert sorted(report.deleted) == sorted([legacy.id, a_dumps[0].id, a_dumps[1].id])
    assert sorted(report.other_systems) == sorted(m.id for m in b_dumps)
    assert {d.backup_id for d in report.decisions}.isdisjoint(report.other_systems), "never even planned"
    in_copy = {m.id for m in catalog.catalog(copy, every_system=True)}
    assert in_copy == {m.id for m in [*a_dumps[2:], *b_dumps]}, "every backup of B is still in the shared copy"
    assert [m.id for m in catalog.catalog(settings.locations())] == [m.id for m in a_dumps[2:]], \
        "A's list, health and restores see A's backups only"

    # And B's prune, the other way round: its old backups go, A's stay.
    report = prune(Settings(backup_dir=str(b_dir), copy_to=str(shared), broker_url="memory://", lock_url=None,
                            keep_daily_days=7))
    assert sorted(report.deleted) == sorted(m.id for m in b_dumps[:2])
    assert sorted(report.other_systems) == sorted(m.id for m in a_dumps[2:])
    assert {m.id for m in catalog.catalog(copy, every_system=True)} == {m.id for m in [*a_dumps[2:], *b_dumps[2:]]}
    assert {m.id for m in catalog.catalog(a)} == {m.id for m in a_dumps[2:]}
