"""Weekly snapshots against a real archiving server: taken, proven, verified by recovery, pruned safely."""

from __future__ import annotations

import hashlib
import json
import stat
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from backup_tasks.catalog import manifest as catalog
from backup_tasks.catalog.prune import prune
from backup_tasks.errors import BackupError
from backup_tasks.logical.dump import run_dump
from backup_tasks.physical.snapshot import take_snapshot
from backup_tasks.physical.verify import verify_snapshot
from backup_tasks.postgres.cluster import ThrowawayCluster, free_port
from backup_tasks.postgres.connect import connect
from backup_tasks.postgres.servercmd import installed_command, runnable_by_server
from backup_tasks.settings import Settings
from backup_tasks.storage.locations import open_storage
from backup_tasks.wal.coverage import coverage
from backup_tasks.wal.restore_points import create_restore_point, restore_point_for_day, restore_point_name
from tests.support.pitr import PitrEnv, cli_env, run_cli, switch_and_wait, trading_cluster

pytestmark = pytest.mark.slow

DAY = "2026-11-27"


@dataclass
class Source:
    env: PitrEnv
    cluster: ThrowawayCluster
    settings: Settings


@pytest.fixture(scope="module")
def source() -> Iterator[Source]:
    """A throwaway cluster archiving through wal-push, with a small trading database."""
    with trading_cluster("bt-test-snapshot-") as (env, cluster):
        yield Source(env, cluster, env.for_cluster(cluster, "aitrapp"))


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_snapshot_is_proven_and_cataloged(source: Source) -> None:
    result = run_cli("snapshot", "--json", env=cli_env(source.settings))
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    manifest = catalog.load(open_storage(source.settings.backup_dir), document["id"])
    assert manifest.kind == "snapshot" and manifest.state == "complete"
    assert manifest.snapshot["pg_verifybackup"] == "ok"
    assert manifest.snapshot["compress"].startswith("server-zstd")
    with connect(source.cluster.conninfo()) as conn:
        sysid = str(conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()[0])
        version = str(conn.execute("SHOW server_version").fetchone()[0]).split()[0]
    assert manifest.system_identifier == sysid and manifest.server_version == version
    assert manifest.timeline == 1 and manifest.wal_segment_size == 16 << 20
    assert manifest.start_lsn and manifest.stop_lsn and manifest.start_segment and manifest.restorable_from
    roles = {info["role"] for info in manifest.files.values()}
    assert {"base", "wal", "backup_manifest"} <= roles
    backup_dir = Path(source.settings.backup_dir)
    for key, info in manifest.files.items():
        stored = backup_dir / key
        assert stored.stat().st_size == info["size"] and sha256_of(stored) == info["sha256"], key
        assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert manifest.size_bytes == sum(info["size"] for info in manifest.files.values())
    assert manifest.sha256 == manifest.files[manifest.path]["sha256"]
    listing = json.loads(run_cli("list", "--json", env=cli_env(source.settings)).stdout)
    assert manifest.id in [b["id"] for b in listing["backups"]]
    assert manifest.id in [r["backup_id"] for r in listing["restorable"]]


def test_verify_snapshot_recovers_to_the_end_and_matches_the_dump_at_a_restore_point(source: Source) -> None:
    settings = source.settings
    conninfo = source.cluster.conninfo("aitrapp")
    point = create_restore_point(settings, restore_point_name(DAY), trading_day=DAY)
    dump, _skipped = run_dump(settings, trading_day=DAY)
    with connect(conninfo) as conn:  # after the close: more rows, so "the end" differs from the restore point
        conn.execute("INSERT INTO audit_logs (ts, action, level, category, message) "
                     "SELECT now(), 'PAUSE', 'INFO', 'test', 'after close ' || g FROM generate_series(1, 25) g")
    switch_and_wait(conninfo, source.env.archive)
    result = run_cli("verify", "--snapshot", "--json", env=cli_env(settings), timeout=600)
    assert result.returncode == 0, result.stderr + result.stdout
    document = json.loads(result.stdout)
    assert document["ok"] is True, document["problems"]
    for step in ("sha256", "pg_verifybackup", "recovery", "restore-point-row-counts", "end-of-archive",
                 "row-counts", "amcheck"):
        assert step in document["checked"], step
    assert document["details"]["restore_point"]["name"] == point.name
    assert document["details"]["restore_point"]["dump"] == dump.id
    assert document["tables_compared"] >= 6 and document["indexes_checked"] > 0
    recorded = catalog.load(open_storage(settings.backup_dir), document["backup_id"])
    assert recorded.verification is not None and recorded.verification.ok
    assert recorded.restorable_until is not None and recorded.restorable_until > recorded.restorable_from


def test_damaged_snapshot_fails_verification(source: Source) -> None:
    storage = open_storage(source.settings.backup_dir)
    newest = catalog.newest(storage, kind="snapshot")
    base = Path(source.settings.backup_dir) / newest.path
    original = base.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0x01
    try:
        base.write_bytes(bytes(damaged))
        result = run_cli("verify", newest.id, "--json", env=cli_env(source.settings), timeout=600)
        assert result.returncode == 1
        document = json.loads(result.stdout)
        assert document["ok"] is False
        assert any(newest.path in problem for problem in document["problems"]), document["problems"]
    finally:
        base.write_bytes(original)


def test_client_side_compression_for_servers_before_15(source: Source) -> None:
    manifest = take_snapshot(replace(source.settings, snapshot_compress="client-zstd:level=1"))
    assert manifest.snapshot["compress"] == "client-zstd:level=1"
    assert manifest.snapshot["pg_verifybackup"] == "ok"
    assert all((Path(source.settings.backup_dir) / key).exists() for key in manifest.files)


def test_failed_snapshot_leaves_nothing_behind(source: Source) -> None:
    backup_dir = Path(source.settings.backup_dir)
    before = sorted(p.name for p in backup_dir.iterdir())
    unreachable = replace(source.settings, database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/aitrapp")
    with pytest.raises(BackupError, match="cannot reach"):
        take_snapshot(unreachable)
    assert sorted(p.name for p in backup_dir.iterdir()) == before


def test_prune_keeps_every_segment_a_kept_snapshot_needs(source: Source) -> None:
    settings = replace(source.settings, keep_weekly=1)
    conninfo = source.cluster.conninfo("aitrapp")
    switch_and_wait(conninfo, source.env.archive)
    newest = take_snapshot(settings)
    switch_and_wait(conninfo, source.env.archive)
    # Retention never drops the newest verified snapshot: prove the new one, so the old ones may go.
    assert verify_snapshot(settings, newest.id).ok
    storage = open_storage(settings.backup_dir)
    older = [m for m in catalog.catalog(storage, kind="snapshot") if m.id != newest.id]
    assert older, "the module took an earlier snapshot"
    archive = source.env.archive
    before = set(archive.names())
    assert any(n[8:24] < str(newest.start_segment)[8:24] for n in before), "there is WAL older than the newest"

    dry = prune(settings, dry_run=True)
    assert dry.wal_deleted and set(archive.names()) == before, "dry run deletes nothing"
    report = prune(settings)
    assert sorted(report.wal_deleted) == sorted(dry.wal_deleted)
    assert {m.id for m in older} <= set(report.deleted)
    for old in older:
        for key in old.files:
            assert not (Path(settings.backup_dir) / key).exists(), key
    remaining = set(archive.names())
    assert all(n[8:24] >= str(newest.start_segment)[8:24] for n in remaining if not n.endswith(".history"))
    reach = coverage(archive, str(newest.start_segment), int(newest.wal_segment_size))
    assert reach.gap is None and reach.segments >= 2, "from the kept snapshot's start on, nothing is missing"
    assert newest.start_segment in remaining


def test_check_confirms_archiving_and_prints_the_configuration(source: Source) -> None:
    result = run_cli("check", "--json", env=cli_env(source.settings))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["arrived"] is True and report["segment"]
    assert source.env.archive.exists(report["segment"])
    # From a checkout postgres cannot enter (a 0700 parent), archiving works through a portable copy
    # (the source's archive_command): the printed lines naming this install are then only a warning.
    runnable = runnable_by_server(installed_command())
    assert report["command_runnable_by_server"] is runnable
    assert runnable or any("cannot run" in warning for warning in report["warnings"]), report["warnings"]
    conf = "\n".join(report["postgresql_conf"])
    assert "wal_level = replica" in conf and "archive_mode = on" in conf and "archive_timeout" in conf
    assert f"wal-push --archive-dir {source.env.archive.root} %p" in conf


def test_check_fails_clearly_when_the_server_does_not_archive(source: Source) -> None:
    with ThrowawayCluster() as plain:  # wal_level minimal, archive_mode off
        settings = replace(source.settings, database_url=plain.url("postgres"))
        result = run_cli("check", "--json", "--timeout", "5", env=cli_env(settings))
        assert restore_point_for_day(settings, DAY) is None, "no PITR configured: the post-close mark is skipped"
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False
    problems = " ".join(report["problems"])
    assert "archive_mode is off" in problems and "wal_level is minimal" in problems
