"""The WAL archive: wal-push / wal-fetch semantics, damage detection, permissions, start-up cost, expiry."""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backup_tasks.catalog.manifest import Manifest
from backup_tasks.catalog.retention import wal_expiry
from backup_tasks.errors import WalConflict, WalCorrupt, WalGap, WalMissing
from backup_tasks.postgres.servercmd import archive_command
from backup_tasks.storage.base import PARTIAL_MARK
from backup_tasks.wal.archive import WalArchive
from backup_tasks.wal.layout import DIR_MODE, FILE_MODE, object_key
from tests.support.paths import PYTHON, ROOT
from tests.support.pitr import PitrEnv, reachable_dir, run_cli
from tests.support.wal import SEGMENT, fake_segment

IS_ROOT = os.geteuid() == 0


# --- a directory the postgres OS user can reach, with a backup directory and its WAL archive --------

@pytest.fixture
def pitr_env() -> Iterator[PitrEnv]:
    base = reachable_dir("bt-test-wal-")
    try:
        yield PitrEnv(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --- wal-push / wal-fetch ---------------------------------------------------------------------------

def test_push_then_fetch_round_trips_compressed_and_checksummed(archive: WalArchive, tmp_path: Path) -> None:
    source = fake_segment(tmp_path / "pg_wal")
    result = archive.push(source)
    assert result.status == "archived"
    stored = archive.path_for(SEGMENT)
    assert stored == archive.root / object_key(SEGMENT) == archive.root / SEGMENT[:16] / f"{SEGMENT}.zst"
    assert stored.stat().st_size < source.stat().st_size / 2, "segments are stored compressed"
    assert stat.S_IMODE(stored.stat().st_mode) == FILE_MODE
    assert stat.S_IMODE(stored.parent.stat().st_mode) == DIR_MODE
    assert not [p for p in stored.parent.iterdir() if p.name != stored.name], "no temporary file left"
    restored = tmp_path / "RECOVERYXLOG"
    assert archive.fetch(SEGMENT, restored) == source.stat().st_size
    assert restored.read_bytes() == source.read_bytes()
    # zstd itself can read an archived file (the checksum trailer is a skippable frame)
    if shutil.which("zstd"):
        plain = subprocess.run(["zstd", "-dc", str(stored)], capture_output=True, check=True).stdout
        assert plain == source.read_bytes()


def test_same_segment_twice_succeeds_different_content_fails_loudly(archive: WalArchive, tmp_path: Path) -> None:
    source = fake_segment(tmp_path / "pg_wal")
    archive.push(source)
    before = archive.path_for(SEGMENT).read_bytes()
    again = archive.push(source)
    assert again.status == "already-archived"
    other = fake_segment(tmp_path / "other", seed=2)
    with pytest.raises(WalConflict, match="DIFFERENT content"):
        archive.push(other)
    assert archive.path_for(SEGMENT).read_bytes() == before, "the archived copy is untouched"
    # and through the CLI, as archive_command would run it
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ok = run_cli("wal-push", "--archive-dir", str(archive.root), str(source), env=env)
    assert ok.returncode == 0, ok.stderr
    clash = run_cli("wal-push", "--archive-dir", str(archive.root), str(other), env=env)
    assert clash.returncode == 1
    assert "DIFFERENT content" in clash.stderr


def test_corrupt_or_truncated_segment_is_refused_on_fetch(archive: WalArchive, tmp_path: Path) -> None:
    archive.push(fake_segment(tmp_path / "pg_wal"))
    stored = archive.path_for(SEGMENT)
    pristine = stored.read_bytes()
    damaged = bytearray(pristine)
    damaged[len(damaged) // 3] ^= 0x55
    stored.write_bytes(bytes(damaged))
    destination = tmp_path / "pg_wal_restore" / "RECOVERYXLOG"
    destination.parent.mkdir()
    with pytest.raises(WalCorrupt):
        archive.fetch(SEGMENT, destination)
    assert not list(destination.parent.iterdir()), "nothing is left where PostgreSQL would read it"
    fetch = run_cli("wal-fetch", "--archive-dir", str(archive.root), SEGMENT, str(destination), env=dict(os.environ))
    assert fetch.returncode == 200, "damage must stop recovery (exit > 125), not end it quietly"
    assert "damaged" in fetch.stderr
    stored.write_bytes(pristine[: len(pristine) - 100])
    with pytest.raises(WalCorrupt, match="trailer"):
        archive.fetch(SEGMENT, destination)


def test_missing_segment_is_end_of_archive_but_a_gap_is_fatal(archive: WalArchive, tmp_path: Path) -> None:
    for number in (1, 2, 4):
        archive.push(fake_segment(tmp_path / "pg_wal", f"0000000100000000000000{number:02X}", seed=number))
    destination = tmp_path / "RECOVERYXLOG"
    with pytest.raises(WalGap, match="000000010000000000000003"):
        archive.fetch("000000010000000000000003", destination)
    with pytest.raises(WalMissing):
        archive.fetch("000000010000000000000005", destination)
    with pytest.raises(WalMissing):  # another timeline's segment: not a gap of timeline 1
        archive.fetch("000000020000000000000003", destination)
    env = dict(os.environ)
    assert run_cli("wal-fetch", "--archive-dir", str(archive.root), "000000010000000000000005", str(destination),
                   env=env).returncode == 1
    gap = run_cli("wal-fetch", "--archive-dir", str(archive.root), "000000010000000000000003", str(destination),
                  env=env)
    assert gap.returncode == 200
    assert "missing" in gap.stderr


def test_history_and_backup_files_are_archived(archive: WalArchive, tmp_path: Path) -> None:
    history = tmp_path / "pg_wal" / "00000002.history"
    history.parent.mkdir()
    history.write_text("1\t0/3000000\tno recovery target specified\n")
    backup_label = tmp_path / "pg_wal" / f"{SEGMENT}.00000028.backup"
    backup_label.write_text("START WAL LOCATION: 0/3000028\n")
    archive.push(history)
    archive.push(backup_label)
    assert archive.read_text("00000002.history").startswith("1\t0/3000000")
    assert "00000002.history" in archive.history_names()
    assert f"{SEGMENT}.00000028.backup" in archive.names()
    junk = tmp_path / "pg_wal" / "postgresql.conf"
    junk.write_text("x")
    result = run_cli("wal-push", "--archive-dir", str(archive.root), str(junk), env=dict(os.environ))
    assert result.returncode == 1
    assert "not a WAL file name" in result.stderr


def test_wal_push_stays_light(archive: WalArchive, tmp_path: Path) -> None:
    """PostgreSQL starts wal-push once per segment: no Celery, Redis, kombu or Sentry's Celery integration."""
    source = fake_segment(tmp_path / "pg_wal")
    probe = ("import sys\nfrom backup_tasks.cli import main\nrc = main(sys.argv[1:])\n"
             "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('celery', 'kombu', 'redis', 'psycopg', "
             "'sentry_sdk', 'billiard'))\nprint('HEAVY=' + ','.join(heavy))\nsys.exit(rc)\n")
    result = subprocess.run([PYTHON, "-c", probe, "wal-push", "--archive-dir", str(archive.root), str(source)],
                            capture_output=True, text=True, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr
    assert "HEAVY=\n" in result.stdout, result.stdout
    script = Path(PYTHON).parent / "backup-tasks"
    command = [str(script)] if script.exists() else [PYTHON, "-m", "backup_tasks.cli"]
    timings = []
    for _ in range(5):
        began = time.perf_counter()
        subprocess.run([*command, "--version"], capture_output=True, check=True)
        timings.append(time.perf_counter() - began)
    print(f"backup-tasks start-up: best {min(timings) * 1000:.0f} ms")
    assert min(timings) < 1.0


@pytest.mark.skipif(not IS_ROOT, reason="needs root to act as both users")
def test_archive_is_shared_by_root_and_the_postgres_user(pitr_env: PitrEnv) -> None:
    """Root creates a subdirectory, postgres archives into it, root reads and deletes: nobody is locked out."""
    archive = pitr_env.archive
    pg_wal = reachable_dir("bt-test-pgwal-")
    try:
        first = fake_segment(pg_wal, "000000010000000000000010", seed=10)
        second = fake_segment(pg_wal, "000000010000000000000011", seed=11)
        shutil.chown(pg_wal, "postgres")
        for path in (first, second):
            os.chmod(path, 0o644)
        archive.push(first)  # as root: creates the subdirectory
        as_postgres = subprocess.run(["runuser", "-u", "postgres", "--", *pitr_env.command, "wal-push",
                                      "--archive-dir", str(archive.root), str(second)],
                                     capture_output=True, text=True, check=False, cwd="/")
        assert as_postgres.returncode == 0, as_postgres.stderr
        pushed = archive.path_for("000000010000000000000011")
        assert pushed.stat().st_gid == archive.root.stat().st_gid, "setgid: the group follows the archive"
        fetched = pg_wal / "restored"
        fetch = subprocess.run(["runuser", "-u", "postgres", "--", *pitr_env.command, "wal-fetch", "--archive-dir",
                                str(archive.root), "000000010000000000000010", str(fetched)],
                               capture_output=True, text=True, check=False, cwd="/")
        assert fetch.returncode == 0, fetch.stderr
        assert fetched.read_bytes() == first.read_bytes(), "postgres reads what root archived"
        archive.delete("000000010000000000000011")
        assert not pushed.exists()
    finally:
        shutil.rmtree(pg_wal, ignore_errors=True)


# --- expiry (pure) ----------------------------------------------------------------------------------

def snapshot_manifest(backup_id: str, start_segment: str | None, started_at: str) -> Manifest:
    return Manifest(id=backup_id, kind="snapshot", database="aitrapp", server="h:5432", server_version="15.4",
                    started_at=started_at, finished_at=started_at, path=f"{backup_id}.base.tar.zst", size_bytes=1,
                    sha256="0" * 64, compression="zstd", start_segment=start_segment)


def test_wal_expiry_keeps_everything_a_kept_snapshot_needs() -> None:
    archived = ["000000010000000000000004", "000000010000000000000005", "000000010000000000000005.00000028.backup",
                "000000010000000000000006", "00000002.history", "000000020000000000000007",
                "000000010000000000000007.partial", "000000010000000100000000"]
    kept = [snapshot_manifest("b", "000000010000000000000006", "2026-11-22T03:00:00Z"),
            snapshot_manifest("c", "000000020000000000000007", "2026-11-29T03:00:00Z")]
    expiry = wal_expiry(kept, archived)
    assert expiry.keep_from == "000000010000000000000006"
    assert sorted(expiry.delete) == ["000000010000000000000004", "000000010000000000000005",
                                     "000000010000000000000005.00000028.backup"]
    assert "b" in expiry.reason
    assert wal_expiry([], archived).delete == [], "no snapshot kept: no basis for expiring WAL"
    unknown = [snapshot_manifest("a", None, "2026-11-15T03:00:00Z"), *kept]
    assert wal_expiry(unknown, archived).delete == [], "a snapshot whose start is unknown blocks expiry"


def test_restore_command_tools_are_self_contained(pitr_env: PitrEnv) -> None:
    command = archive_command(pitr_env.command, pitr_env.archive.root)
    assert command.endswith(f"wal-push --archive-dir {shlex.quote(str(pitr_env.archive.root))} %p")
    assert Path(shlex.split(command)[0]).is_absolute()



# --- the fast path: light, and one command line -------------------------------------------------------

HEAVY = ("boto3", "botocore", "celery", "kombu", "redis", "psycopg", "sentry_sdk", "argparse", "backup_tasks.settings",
         "backup_tasks.storage.s3")


def test_the_fast_path_with_a_local_archive_imports_nothing_heavy(archive: WalArchive, tmp_path: Path) -> None:
    """archive_command and restore_command, once per segment: no boto3, Celery, Redis, psycopg, Sentry or argparse."""
    source = fake_segment(tmp_path / "pg_wal")
    probe = ("import sys\nfrom backup_tasks.entry import main\nrc = main(sys.argv[1:])\n"
             f"heavy = sorted(m for m in sys.modules if any(m == h or m.startswith(h + '.') for h in {HEAVY!r}))\n"
             "print('HEAVY=' + ','.join(heavy))\nsys.exit(rc)\n")
    for argv in (["wal-push", "--archive-dir", str(archive.root), str(source)],
                 ["wal-fetch", "--archive-dir", str(archive.root), SEGMENT, str(tmp_path / "RECOVERYXLOG")],
                 ["wal-fetch", "--archive-dir", str(archive.root), "000000010000000000000009", str(tmp_path / "x")]):
        result = subprocess.run([PYTHON, "-c", probe, *argv], capture_output=True, text=True, cwd=ROOT, check=False)
        assert result.returncode == (1 if argv[3].endswith("09") else 0), result.stderr
        assert "HEAVY=\n" in result.stdout, (argv[0], result.stdout)
    assert (tmp_path / "RECOVERYXLOG").read_bytes() == source.read_bytes()


def test_the_command_line_of_wal_fetch_is_defined_once(tmp_path: Path) -> None:
    """The fast path's ``parse``, ``restore_command_for`` and the full CLI read the same options and rules."""
    from datetime import UTC, datetime

    from backup_tasks.cli.main import build_parser
    from backup_tasks.wal.command import FETCH_OPTIONS, OPTIONS, FetchRequest, parse, restore_command_for

    as_of = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)
    line = restore_command_for(["/usr/bin/backup-tasks"], "s3://b/prod/wal", "/etc/key", depth=3, as_of=as_of)
    argv = shlex.split(line.replace("%f", SEGMENT).replace("%p", "pg_wal/RECOVERYXLOG"))[1:]
    call = parse(argv)
    assert call is not None and FetchRequest.of(call) == FetchRequest(
        SEGMENT, Path("pg_wal/RECOVERYXLOG"), archive_url="s3://b/prod/wal", identity_file="/etc/key", prefetch=3,
        as_of=as_of)
    assert parse(["wal-fetch", "--archive-dir", "/a", "--json", SEGMENT, "x"]) is None  # the full CLI's business
    assert parse(["wal-fetch", SEGMENT, "x"]) is None  # no archive given: settings from the environment
    assert parse(["wal-push", "--archive-dir", "/a", "--level", "3", "p"]) is not None
    mixed = FetchRequest(SEGMENT, Path("x"), archive_dir=Path("/a"), archive_url="s3://b/wal")
    assert mixed.problem() is not None and "without --archive-dir" in str(mixed.problem())
    # The CLI registers exactly these options for both commands.
    subcommands = next(a for a in build_parser()._actions if a.dest == "command").choices  # type: ignore[union-attr]
    for command, options in OPTIONS.items():
        flags = {flag for action in subcommands[command]._actions for flag in action.option_strings}
        assert {o.flag for o in options} <= flags and flags - {o.flag for o in options} <= {
            "-h", "--help", "--json", "-v", "--verbose"}, command
    assert {o.flag for o in FETCH_OPTIONS} >= {"--archive-dir", "--archive-url", "--prefetch", "--as-of"}


def test_prune_clears_what_killed_pushers_left_old_and_new(archive: WalArchive, tmp_path: Path) -> None:
    """A killed wal-push leaves a partial object (today) or an ``.incoming-`` file (before): both go, live ones stay."""
    assert archive.root is not None
    archive.push(fake_segment(tmp_path / "pg_wal"))
    directory = archive.root / SEGMENT[:16]
    old = directory / f".{SEGMENT}.zst.incoming-0123456789ab"
    recent = directory / ".000000010000000000000004.zst.incoming-0123456789ab"
    dead = directory / f".000000010000000000000005.zst{PARTIAL_MARK}0123456789ab"
    for path in (old, recent, dead):
        path.write_bytes(b"half")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    live = archive.primary.writer(object_key("000000010000000000000006"))
    live.write(b"being written")
    try:
        removed = archive.clear_incoming(time.time() - 3600)
        assert sorted(removed) == sorted([old.name, dead.name])
        assert recent.exists() and not old.exists() and not dead.exists()
        assert [p for p in directory.iterdir() if PARTIAL_MARK in p.name], "a live writer's partial is kept"
    finally:
        live.abort()
    assert archive.segment_names() == [SEGMENT]
