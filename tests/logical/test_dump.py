"""The daily dump: every kind of object, exact counts from the dump's own snapshot, and nothing
that looks like a backup when anything goes wrong."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from backup_tasks.catalog import manifest as catalog
from backup_tasks.catalog.ids import backup_id_for, later_backup_id
from backup_tasks.conninfo import ConnInfo
from backup_tasks.errors import AuthenticationFailed, LockBusy, SourceUnavailable, StorageFull, ToolMissing
from backup_tasks.locks import hold
from backup_tasks.logical.dump import dump_lock_name, run_dump
from backup_tasks.postgres.connect import connect
from backup_tasks.postgres.sampledata import generate
from backup_tasks.postgres.tools import find_tool
from backup_tasks.settings import Settings
from backup_tasks.storage.locations import open_storage
from tests.support.paths import BACKUP_TASKS
from tests.support.postgres import PASSWORD_SERVER_PASSWORD, url_of
from tests.support.processes import worker_env
from tests.support.require import unavailable

TRICKY_COUNTS = {
    '"Trading Desk"."MixedCase Table"': 150,
    "public.measurements": 500,
    "public.empty_table": 0,
    "public.scratch_cache": 40,
}


def entries(directory: Path) -> list[str]:
    return sorted(os.listdir(directory)) if directory.exists() else []


def test_dump_of_tricky_objects_has_exact_counts_and_a_complete_manifest(
        tricky_db: ConnInfo, settings_for: Callable[..., Settings]) -> None:
    settings = settings_for(tricky_db)
    manifest, skipped = run_dump(settings)
    assert not skipped
    for name, count in TRICKY_COUNTS.items():
        assert manifest.tables[name] == count, name
    # each leaf partition is counted on its own, and the parent counts them all
    assert manifest.tables["public.measurements_2025"] + manifest.tables["public.measurements_2026"] == 500
    assert manifest.kind == "dump" and manifest.database == tricky_db.dbname
    assert manifest.server_version.startswith("15") and manifest.compression == "zstd"
    assert manifest.verification is None and manifest.state == "complete"
    stored = Path(settings.backup_dir) / manifest.path
    data = stored.read_bytes()
    assert len(data) == manifest.size_bytes and hashlib.sha256(data).hexdigest() == manifest.sha256
    assert data[:4] == b"\x28\xb5\x2f\xfd"  # zstd frame magic
    for path in (stored, Path(settings.backup_dir) / manifest.key):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert catalog.load(open_storage(settings.backup_dir), manifest.id) == manifest


def test_standard_pg_restore_reads_it_and_restores_a_single_table(
        tricky_db: ConnInfo, settings_for: Callable[..., Settings], make_database: Callable[..., ConnInfo],
        tmp_path: Path) -> None:
    settings = settings_for(tricky_db)
    manifest, _ = run_dump(settings)
    archive = tmp_path / "plain.dump"
    with open(Path(settings.backup_dir) / manifest.path, "rb") as src, open(archive, "wb") as dst:
        zstandard.ZstdDecompressor().copy_stream(src, dst)
    pg_restore = str(find_tool("pg_restore").path)
    listing = subprocess.run([pg_restore, "-l", str(archive)], capture_output=True, text=True, check=True).stdout
    for needle in ("TABLE DATA public measurements_2025", 'TYPE public Mood', "MATERIALIZED VIEW DATA",
                   "SEQUENCE SET public ticket_seq", 'TABLE DATA Trading Desk MixedCase Table'):
        assert needle in listing, needle
    target = make_database()
    env = {**os.environ, **target.libpq_env()}
    subprocess.run([pg_restore, "--no-owner", "-d", target.dbname, "-t", "scratch_cache", str(archive)],
                   env=env, check=True, capture_output=True)
    with connect(target) as conn:
        rows = conn.execute("SELECT count(*) FROM scratch_cache").fetchone()[0]
        others = conn.execute("SELECT count(*) FROM pg_class WHERE relname = 'measurements'").fetchone()[0]
    assert (rows, others) == (40, 0)


@pytest.mark.parametrize("scheme", ["postgresql+psycopg2", "postgres", "postgresql+psycopg"])
def test_every_url_form_dumps(scheme: str, trading_db: ConnInfo, tmp_path: Path) -> None:
    settings = Settings(database_url=url_of(trading_db, scheme=scheme), backup_dir=str(tmp_path), lock_url=None,
                        broker_url="memory://")
    manifest, _ = run_dump(settings)
    assert manifest.tables["public.signals"] == 300 and manifest.size_bytes > 1000


def test_gzip_option(trading_db: ConnInfo, settings_for: Callable[..., Settings]) -> None:
    manifest, _ = run_dump(settings_for(trading_db, compression="gzip"))
    path = Path(settings_for(trading_db).backup_dir) / manifest.path
    assert manifest.path.endswith(".dump.gz") and path.read_bytes()[:2] == b"\x1f\x8b"


@pytest.mark.slow
def test_row_counts_come_from_the_dump_snapshot_under_concurrent_writes(
        make_database: Callable[..., ConnInfo], settings_for: Callable[..., Settings]) -> None:
    """A writer inserts throughout the dump; verify then demands exact equality with the restored rows."""
    from backup_tasks.logical.verify import verify_backup

    source = make_database()
    generate(source, signals=4000)
    stop = threading.Event()
    inserted = [0]

    def writer() -> None:
        with connect(source) as conn:
            while not stop.is_set():
                conn.execute("INSERT INTO audit_logs (ts, action, message) VALUES (now(), 'PAUSE', 'concurrent')")
                inserted[0] += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.2)
        settings = settings_for(source)
        manifest, _ = run_dump(settings)
        time.sleep(0.2)
    finally:
        stop.set()
        thread.join()
    assert inserted[0] > 10
    with connect(source) as conn:
        now_rows = conn.execute("SELECT count(*) FROM audit_logs").fetchone()[0]
    assert manifest.tables["public.audit_logs"] < now_rows  # the writer kept going after the snapshot
    result = verify_backup(settings, manifest.id)
    assert result.ok, result.problems


def test_trading_day_is_recorded_and_a_second_run_for_it_skips(
        trading_db: ConnInfo, settings_for: Callable[..., Settings]) -> None:
    settings = settings_for(trading_db)
    first, skipped_first = run_dump(settings, trading_day="2026-11-27")
    second, skipped_second = run_dump(settings, trading_day="2026-11-27")
    assert (skipped_first, skipped_second) == (False, True)
    assert second.id == first.id and first.trading_day == "2026-11-27"
    assert len(catalog.catalog(open_storage(settings.backup_dir))) == 1


@pytest.mark.slow
def test_two_days_wanting_one_id_get_two_backups(trading_db: ConnInfo,
                                                settings_for: Callable[..., Settings]) -> None:
    """Two trading days signalled in the same second want the same id (ids have one-second resolution)."""
    settings = settings_for(trading_db)
    wanted = backup_id_for(trading_db.dbname, "dump", "2026-01-05T10:00:59Z")
    first, _ = run_dump(settings, trading_day="2026-01-05", backup_id=wanted)
    second, skipped = run_dump(settings, trading_day="2026-01-06", backup_id=wanted)
    assert not skipped and first.id == wanted
    assert second.id == backup_id_for(trading_db.dbname, "dump", "2026-01-05T10:01:00Z")
    assert {m.trading_day for m in catalog.catalog(settings.locations(), kind="dump")} == {"2026-01-05", "2026-01-06"}
    assert later_backup_id("aitrapp-dump-by-hand") is None


@pytest.mark.slow
def test_wrong_password_fails_clearly_and_leaves_nothing(password_server: ConnInfo, tmp_path: Path) -> None:
    backup_dir = tmp_path / "backups"
    backup_dir.mkdir()
    url = url_of(password_server).replace(PASSWORD_SERVER_PASSWORD, "wrong-pw-123")
    settings = Settings(database_url=url, backup_dir=str(backup_dir), lock_url=None, broker_url="memory://")
    with pytest.raises(AuthenticationFailed) as caught:
        run_dump(settings)
    assert "wrong-pw-123" not in str(caught.value) and not caught.value.retryable
    assert entries(backup_dir) == []


def test_server_down_is_retryable_and_leaves_nothing(tmp_path: Path) -> None:
    from backup_tasks.postgres.cluster import free_port

    settings = Settings(database_url=f"postgresql://u:pw@127.0.0.1:{free_port()}/aitrapp",
                        backup_dir=str(tmp_path / "b"), lock_url=None, broker_url="memory://")
    with pytest.raises(SourceUnavailable) as caught:
        run_dump(settings)
    assert caught.value.retryable and "cannot reach" in str(caught.value)
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_password_never_on_a_command_line_nor_in_the_manifest(password_server: ConnInfo, tmp_path: Path) -> None:
    with connect(password_server) as conn:
        if conn.execute("SELECT to_regclass('public.signals')").fetchone()[0] is None:
            conn.close()
            generate(password_server, signals=8000)
    settings = Settings(database_url=url_of(password_server), backup_dir=str(tmp_path), lock_url=None,
                        broker_url="memory://")
    seen: list[bytes] = []
    done = threading.Event()

    def spy() -> None:
        while not done.is_set():
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    try:
                        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                    except OSError:
                        continue
                    if b"pg_dump" in cmdline:
                        seen.append(cmdline)

    thread = threading.Thread(target=spy)
    thread.start()
    try:
        manifest, _ = run_dump(settings)
    finally:
        done.set()
        thread.join()
    assert seen, "pg_dump was never observed running"
    assert not any(PASSWORD_SERVER_PASSWORD.encode() in c for c in seen)
    assert PASSWORD_SERVER_PASSWORD not in (Path(tmp_path) / manifest.key).read_text()


def test_a_second_dump_of_the_same_database_is_refused_while_one_runs(
        trading_db: ConnInfo, settings_for: Callable[..., Settings]) -> None:
    settings = settings_for(trading_db)
    with hold(settings, dump_lock_name(trading_db), what="test holder"), pytest.raises(LockBusy) as caught:
        run_dump(settings)
    assert "already running" in str(caught.value) and caught.value.retryable
    run_dump(settings)  # released: works again


@pytest.mark.slow
def test_disk_full_removes_the_partial_file(make_database: Callable[..., ConnInfo], tmp_path: Path) -> None:
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a tiny tmpfs")
    source = make_database()
    generate(source, signals=6000)
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mountpoint)],
                      capture_output=True, check=False).returncode != 0:
        unavailable("cannot mount a tmpfs here", "run the tests as root on a machine that allows mounts")
    try:
        settings = Settings(database_url=url_of(source), backup_dir=str(mountpoint), lock_url=None,
                            broker_url="memory://")
        with pytest.raises(StorageFull) as caught:
            run_dump(settings)
        assert "no space left" in str(caught.value)
        assert entries(mountpoint) == []
        result = subprocess.run([BACKUP_TASKS, "dump"], env=worker_env(DATABASE_URL=url_of(source),
                                BACKUP_DIR=str(mountpoint), BACKUP_LOCK_URL="redis://127.0.0.1:1/0",
                                BACKUP_SINGLE_HOST="1"),
                                capture_output=True, text=True, check=False)
        assert result.returncode == 1 and "no space left" in result.stderr and "Traceback" not in result.stderr
        assert entries(mountpoint) == []
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False)


@pytest.mark.slow
def test_a_killed_dump_leaves_nothing_that_looks_like_a_backup(
        make_database: Callable[..., ConnInfo], tmp_path: Path, redis_url: str) -> None:
    """SIGKILL mid-dump: only a hidden partial file remains, and the next run clears it and its stale lock."""
    source = make_database()
    generate(source, signals=40000)
    backup_dir = tmp_path / "backups"
    env = worker_env(DATABASE_URL=url_of(source), BACKUP_DIR=str(backup_dir), BACKUP_COMPRESSION_LEVEL="19",
                     BACKUP_LOCK_URL=redis_url)
    proc = subprocess.Popen([BACKUP_TASKS, "dump"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(".partial-" in e for e in entries(backup_dir)):
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    left = entries(backup_dir)
    assert left and all(".partial-" in e and e.startswith(".") for e in left), left
    settings = Settings.from_env(env)
    assert catalog.catalog(open_storage(settings.backup_dir)) == []
    listing = subprocess.run([BACKUP_TASKS, "list", "--json"], env=env, capture_output=True, text=True, check=True)
    assert '"backups": []' in listing.stdout
    # the next run clears what the killed one left, and succeeds
    result = subprocess.run([BACKUP_TASKS, "dump", "--json"], env={**env, "BACKUP_COMPRESSION_LEVEL": "1"},
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert not any(".partial-" in e for e in entries(backup_dir))
    assert len([e for e in entries(backup_dir) if e.endswith(".manifest.json")]) == 1


def test_missing_or_too_old_client_tools_are_named(tmp_path: Path) -> None:
    with pytest.raises(ToolMissing, match="postgresql-client-99"):
        find_tool("pg_dump", min_major=99)
    with pytest.raises(ToolMissing, match="not found"):
        find_tool("pg_dump_does_not_exist", bin_dir=tmp_path)
