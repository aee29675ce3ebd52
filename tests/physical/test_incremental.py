"""Incremental snapshots on PostgreSQL 18 (the PyPI wheel): a chain taken, verified, restored; broken links; fallbacks.

The 18 cluster archives through ``wal-push`` with ``summarize_wal = on`` and ``track_commit_timestamp``
(so a restore can aim at a commit's exact time). Its build has no zstd: snapshots are compressed here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from backup_tasks.catalog import manifest as catalog
from backup_tasks.catalog.manifest import Manifest
from backup_tasks.physical import snapshot as snapshot_module
from backup_tasks.physical.chain import (
    ChainCache,
    chain_ids,
    chain_problem,
    choose_parent,
    incremental_of,
    manifests_key,
    prepare_base,
)
from backup_tasks.physical.snapshot import SHM, take_snapshot
from backup_tasks.physical.verify import verify_snapshot
from backup_tasks.postgres.cluster import SERVER_USER, ThrowawayCluster, as_server_user
from backup_tasks.postgres.connect import connect
from backup_tasks.postgres.sampledata import generate
from backup_tasks.postgres.servercmd import archive_command
from backup_tasks.settings import Settings
from backup_tasks.storage.locations import open_storage
from tests.support.pitr import PitrEnv, cli_env, reachable_dir, run_cli, switch_and_wait

pytestmark = pytest.mark.slow


@dataclass
class Chain18:
    env: PitrEnv
    cluster: ThrowawayCluster
    settings: Settings
    bin_dir: Path
    full: Manifest
    first: Manifest  # incremental on the full
    second: Manifest  # incremental on the first
    target: str  # the commit timestamp of marks 1..50 (inside the second incremental's range)
    signals_at_target: int  # sum of signals.id * quantity-ish fingerprint at the target

    def cli(self, *args: str, timeout: float = 600) -> dict[str, Any]:
        result = run_cli(*args, "--json", env=cli_env(self.settings, PG_BIN_DIR=str(self.bin_dir)), timeout=timeout)
        assert result.returncode == 0, result.stderr + result.stdout
        return dict(json.loads(result.stdout))


def fingerprint(conn: psycopg.Connection) -> str:
    """Every row of the table the days change, as one hash: equal only when each row is the same."""
    return str(conn.execute("SELECT md5(string_agg(t::text, ',' ORDER BY id)) FROM signals t").fetchone()[0])


def change_a_day(conninfo: Any, day: int) -> None:
    """About 2 % of the signals change, as a trading day would change them."""
    with connect(conninfo) as conn:
        conn.execute("UPDATE signals SET ts = ts + interval '1 second' WHERE id %% 50 = %s",
                     (day % 50,))


@pytest.fixture(scope="module")
def chain18(pg18_bin: Path) -> Iterator[Chain18]:
    env = PitrEnv(reachable_dir("bt-test-incr-"))
    command = archive_command(env.command, env.archive.root)
    try:
        with ThrowawayCluster(exact_major=18, bin_dir=pg18_bin, settings={
                "wal_level": "replica", "max_wal_senders": "4", "archive_mode": "on", "summarize_wal": "on",
                "archive_command": shlex.quote(command), "archive_timeout": "0",
                "track_commit_timestamp": "on"}) as cluster:
            with connect(cluster.conninfo()) as conn:
                conn.execute("CREATE DATABASE aitrapp")
            conninfo = cluster.conninfo("aitrapp")
            generate(conninfo, signals=2000)
            settings = env.for_cluster(cluster, "aitrapp", pg_bin_dir=(pg18_bin,))
            full = take_snapshot(settings, incremental=True)  # nothing to build on yet: full, and it says why
            change_a_day(conninfo, 1)
            first = take_snapshot(settings, incremental=True)
            change_a_day(conninfo, 2)
            second = take_snapshot(settings, incremental=True)
            with connect(conninfo) as conn:
                conn.execute("CREATE TABLE marks (id int PRIMARY KEY)")
                conn.execute("INSERT INTO marks SELECT generate_series(1, 50)")
                target = str(conn.execute("SELECT pg_xact_commit_timestamp(xmin)::text FROM marks WHERE id = 1")
                             .fetchone()[0])
                at_target = fingerprint(conn)
                time.sleep(0.01)  # the next commit's timestamp is strictly later
                conn.execute("INSERT INTO marks SELECT generate_series(51, 80)")
            change_a_day(conninfo, 3)
            switch_and_wait(conninfo, env.archive)
            yield Chain18(env, cluster, settings, pg18_bin, full, first, second, target, at_target)  # type: ignore[arg-type]
            forget_cache(full)
    finally:
        shutil.rmtree(env.base, ignore_errors=True)


def caches_of(snapshot: Manifest) -> list[ChainCache]:
    """The chain caches a snapshot of this database and system may have used (RAM, then TMPDIR)."""
    return [ChainCache.beside(Path(area) / "staging", database=snapshot.database,
                              system_identifier=snapshot.system_identifier or "")
            for area in (SHM, tempfile.gettempdir())]


def forget_cache(snapshot: Manifest) -> None:
    for cache in caches_of(snapshot):
        cache.keep_only(None)


def cached_entries(snapshot: Manifest) -> list[Path]:
    return [p for cache in caches_of(snapshot) if cache.root.is_dir() for p in cache.root.iterdir()
            if p.name.startswith(f"{cache.owner}.")]


def test_a_chain_is_a_full_and_incrementals_each_naming_its_parent(chain18: Chain18) -> None:
    full, first, second = chain18.full, chain18.first, chain18.second
    assert incremental_of(full) is None
    assert full.snapshot["incremental_reason"] == "no complete snapshot of this PostgreSQL 18 system to build on yet"
    assert (incremental_of(first).parent, chain_ids(first)) == (full.id, [full.id, first.id])  # type: ignore[union-attr]
    assert (incremental_of(second).parent, chain_ids(second)) == (first.id, [full.id, first.id, second.id])  # type: ignore[union-attr]
    for snap in (first, second):
        assert snap.kind == "snapshot" and snap.snapshot["pg_combinebackup"] == "ok"
        assert {v["role"] for v in snap.files.values()} == {"base", "wal", "backup_manifest"}  # type: ignore[union-attr]
        base = next(v["size"] for v in snap.files.values() if v["role"] == "base")  # type: ignore[union-attr]
        full_base = next(v["size"] for v in full.files.values() if v["role"] == "base")  # type: ignore[union-attr]
        assert base < full_base / 2, (base, full_base)
    stored = catalog.load(open_storage(chain18.settings.backup_dir), second.id)
    assert chain_ids(stored) == [full.id, first.id, second.id]


def test_each_incremental_was_checked_against_the_cached_chain_and_the_cache_holds_a_skeleton(
        chain18: Chain18) -> None:
    """The full left its skeleton in the cache; each incremental's check read the cached skeleton with itself (not the
    whole chain from storage) and left the next, keyed by its chain: relation files at their length with no data in
    them, nothing of the database's contents (no pg_xact, no WAL, no configuration)."""
    assert [s.snapshot["chain_checked_from"] for s in (chain18.first, chain18.second)] == ["cache", "cache"]  # type: ignore[index]
    [entry] = cached_entries(chain18.second)
    cache = next(c for c in caches_of(chain18.second) if c.root == entry.parent)
    assert cache.lookup(manifests_key([chain18.full, chain18.first, chain18.second])) == entry
    assert sorted(p.name for p in entry.iterdir()) == ["backup_label", "base", "global", "pg_tblspc"]
    relation_files = [p for p in (entry / "base").rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in relation_files) > 10 << 20  # the sample data's tables, at their length
    assert sum(p.stat().st_blocks for p in relation_files) == 0  # and nothing in them
    assert b"INCREMENTAL FROM" not in (entry / "backup_label").read_bytes()


def test_verify_of_the_newest_incremental_combines_its_chain_and_recovers(chain18: Chain18) -> None:
    verdict = verify_snapshot(chain18.settings, chain18.second.id)
    assert verdict.ok, verdict.problems
    assert {"sha256", "pg_combinebackup", "pg_verifybackup", "recovery", "end-of-archive", "row-counts",
            "amcheck"} <= set(verdict.checked)
    assert verdict.details["backup_id"] == chain18.second.id  # type: ignore[index]


@pytest.fixture
def restored18(chain18: Chain18) -> Iterator[list[Path]]:
    dirs: list[Path] = []
    yield dirs
    for data_dir in dirs:
        if (data_dir / "postmaster.pid").exists():
            subprocess.run([*as_server_user(), str(chain18.bin_dir / "pg_ctl"), "-D", str(data_dir), "-m",
                            "immediate", "stop"], capture_output=True, check=False, cwd="/")
        shutil.rmtree(data_dir, ignore_errors=True)


def test_restore_pitr_from_the_chain_reaches_exactly_a_commit_inside_the_newest_incremental(
        chain18: Chain18, restored18: list[Path]) -> None:
    data_dir = chain18.env.base / f"restored-{random.randrange(1 << 30)}"
    restored18.append(data_dir)
    report = chain18.cli("restore-pitr", "--data-dir", str(data_dir), "--target-time", chain18.target, "--start")
    assert report["ok"] and report["outcome"]["finished"], report
    assert report["snapshot_id"] == chain18.second.id, "the newest snapshot covering the target: the incremental"
    assert report["chain"] == [chain18.full.id, chain18.first.id, chain18.second.id]
    assert "recovery stopping before commit" in report["outcome"]["stop_reason"]
    assert not (data_dir / "backup_manifest").exists()
    assert not [p.name for p in data_dir.parent.iterdir() if "backup-tasks-chain" in p.name], "scratch left behind"
    assert re.search(r"in place \(\d+ blocks written", " ".join(report["notes"])), report["notes"]
    with psycopg.connect(host="127.0.0.1", port=report["port"], user=SERVER_USER, dbname="aitrapp") as conn:
        assert [r[0] for r in conn.execute("SELECT id FROM marks ORDER BY id")] == list(range(1, 51))
        assert fingerprint(conn) == chain18.signals_at_target, "both days' changes, not the third's"


def test_restore_pitr_with_snapshot_id_of_the_first_incremental_restores_its_shorter_chain(
        chain18: Chain18, restored18: list[Path]) -> None:
    data_dir = chain18.env.base / f"restored-{random.randrange(1 << 30)}"
    restored18.append(data_dir)
    report = chain18.cli("restore-pitr", "--data-dir", str(data_dir), "--snapshot", chain18.first.id, "--start")
    assert report["ok"], report
    assert report["chain"] == [chain18.full.id, chain18.first.id]
    with psycopg.connect(host="127.0.0.1", port=report["port"], user=SERVER_USER, dbname="aitrapp") as conn:
        assert [r[0] for r in conn.execute("SELECT id FROM marks ORDER BY id")] == list(range(1, 81))


def copy_of_catalog(chain18: Chain18, name: str) -> Settings:
    """A copy of the backup directory (the WAL archive stays shared, read only): a test may damage the copy."""
    copy = chain18.env.base / name
    shutil.copytree(chain18.env.backup_dir, copy, ignore=shutil.ignore_patterns("wal"))
    return dataclasses.replace(chain18.settings, backup_dir=str(copy),
                               wal_archive_dir=str(chain18.env.archive.root))


def test_verify_names_a_corrupt_ancestor_as_the_broken_link(chain18: Chain18) -> None:
    settings = copy_of_catalog(chain18, "corrupt-ancestor")
    key = next(k for k, v in chain18.first.files.items() if v["role"] == "base")  # type: ignore[union-attr]
    path = Path(settings.backup_dir) / key
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    verdict = verify_snapshot(settings, chain18.second.id)
    assert not verdict.ok
    assert len(verdict.problems) == 1 and verdict.problems[0].startswith(
        f"the chain of snapshot {chain18.second.id} is broken at its ancestor {chain18.first.id}: {key} "), \
        verdict.problems
    recorded = catalog.load(open_storage(settings.backup_dir), chain18.second.id)
    assert recorded.verification is not None and not recorded.verification.ok


def test_verify_names_a_missing_ancestor_and_planning_input_says_so(chain18: Chain18) -> None:
    settings = copy_of_catalog(chain18, "missing-ancestor")
    (Path(settings.backup_dir) / catalog.manifest_key(chain18.full.id)).unlink()
    verdict = verify_snapshot(settings, chain18.second.id)
    assert not verdict.ok
    assert verdict.problems == [f"the chain of snapshot {chain18.second.id} is broken at its ancestor "
                                f"{chain18.full.id}: its manifest is missing from {settings.backup_dir}; restore "
                                f"from another chain (a full snapshot, `backup-tasks snapshot`, starts a new one)"]
    known = {m.id: m for m in catalog.catalog(open_storage(settings.backup_dir), kind="snapshot")}
    assert chain_problem(known[chain18.second.id], known) == \
        f"its chain is broken: ancestor {chain18.full.id} is not in the catalog"


def test_a_parent_the_server_refuses_makes_the_snapshot_full_with_pg_basebackups_reason(
        chain18: Chain18, monkeypatch: pytest.MonkeyPatch) -> None:
    """The path of every refusal by pg_basebackup (a summary gap, another system's or timeline's manifest): here
    the parent's backup_manifest names another system (its checksum made right), which the server refuses."""
    def tampered(*args: Any, **kwargs: Any) -> Any:
        base, reason = prepare_base(*args, **kwargs)
        assert base is not None, reason
        text = base.manifest_path.read_text()
        text = re.sub(r'"System-Identifier": \d+', '"System-Identifier": 42', text)
        body = text[: text.index('"Manifest-Checksum"')]
        base.manifest_path.write_text(body + f'"Manifest-Checksum": "{hashlib.sha256(body.encode()).hexdigest()}"}}\n')
        return base, reason

    monkeypatch.setattr(snapshot_module, "prepare_base", tampered)
    settings = copy_of_catalog(chain18, "refused")
    taken = take_snapshot(settings, incremental=True)
    assert incremental_of(taken) is None
    reason = taken.snapshot["incremental_reason"]  # type: ignore[index]
    assert reason.startswith(f"the chain of {chain18.second.id} cannot be used: pg_basebackup refused the "
                             f"incremental: "), reason
    assert "system identifier in backup manifest is 42, but database system identifier is" in reason, reason
    assert taken.snapshot["pg_verifybackup"] == "ok"  # type: ignore[index]
    stored = {p.name for p in Path(settings.backup_dir).iterdir() if p.name.startswith(taken.id)}
    assert stored == {*taken.files, catalog.manifest_key(taken.id)}, "nothing of the refused attempt"  # type: ignore[misc]


def test_choose_parent_skips_another_timeline_and_a_failed_newest() -> None:
    def snap(backup_id: str, timeline: int = 1, ok: bool | None = None, chain: list[str] | None = None) -> Manifest:
        m = Manifest(id=backup_id, kind="snapshot", database="db", server="h", server_version="18.1",
                     started_at=backup_id, finished_at=backup_id, path="p", size_bytes=1, sha256="x",
                     compression="zstd", system_identifier="7", timeline=timeline,
                     parent=chain[-2] if chain else None, chain=chain)
        if ok is not None:
            m.verification = catalog.Verification(ok=ok, verified_at="t", duration_seconds=0, method="m", checked=[])
        return m

    full, incr = snap("2026-01-01"), snap("2026-01-02", chain=["2026-01-01", "2026-01-02"])
    pick = choose_parent([full, incr], system_identifier="7", timeline=1, major=18, database="db")
    assert (pick.parent.id, pick.chain) == (incr.id, (full.id, incr.id))  # type: ignore[union-attr]
    assert choose_parent([full, incr], system_identifier="7", timeline=2, major=18, database="db").reason == (
        "the server is on timeline 2, the newest snapshot 2026-01-02 on timeline 1: a new chain starts after a "
        "timeline change")
    failed_root = snap("2026-01-01", ok=False)
    assert choose_parent([failed_root, incr], system_identifier="7", timeline=1, major=18, database="db").reason == (
        "the newest snapshot 2026-01-02: its chain is broken: ancestor 2026-01-01 failed its latest verification")
    assert choose_parent([full], system_identifier="7", timeline=1, major=17, database="db").parent is None


def test_postgres_15_takes_a_full_snapshot_and_says_why() -> None:
    env = PitrEnv(reachable_dir("bt-test-incr15-"))
    try:
        with env.archiving_cluster() as cluster:
            settings = env.for_cluster(cluster)
            with connect(cluster.conninfo()) as conn:
                conn.execute("CREATE TABLE t AS SELECT g FROM generate_series(1, 100) g")
            first = take_snapshot(settings, incremental=True)
            second = take_snapshot(settings, incremental=True)
        for taken in (first, second):
            assert taken.server_version.startswith("15.") and incremental_of(taken) is None
            assert taken.snapshot["incremental_reason"] == \
                "PostgreSQL 15 has no incremental backups (PostgreSQL 17 and later)"  # type: ignore[index]
            assert taken.snapshot["pg_verifybackup"] == "ok"  # type: ignore[index]
    finally:
        shutil.rmtree(env.base, ignore_errors=True)


def test_planning_falls_back_to_the_newest_intact_chain_when_an_ancestor_failed(chain18: Chain18) -> None:
    """The first incremental's latest verification failed: the second (built on it) is not chosen either, and the
    full (the newest intact chain, its range reaching the target through the WAL) is; the skip is named."""
    from backup_tasks.physical.plan import plan_restore, time_target
    from backup_tasks.physical.verify import record_result

    settings = copy_of_catalog(chain18, "failed-ancestor")
    storage = open_storage(settings.backup_dir)
    record_result(storage, chain18.first.id, verification=catalog.Verification(
        ok=False, verified_at="2026-12-06T00:00:00Z", duration_seconds=1, method="throwaway-cluster",
        checked=["sha256"], problems=["damaged on purpose"]))
    planned = plan_restore(settings, time_target(chain18.target, settings), storage=storage)
    assert planned.snapshot.id == chain18.full.id
    skipped = {s.backup_id: s.reason for s in planned.skipped}
    assert set(skipped) == {chain18.first.id, chain18.second.id}, skipped
    assert f"ancestor {chain18.first.id} failed its latest verification" in skipped[chain18.second.id]


def test_a_damaged_cache_is_not_trusted_the_chain_comes_from_storage(chain18: Chain18) -> None:
    """A relation file the next incremental builds on is gone from the cached skeleton: pg_combinebackup's dry run
    rejects the cached chain, the check reads the chain from storage instead, and the new skeleton takes its place."""
    settings = copy_of_catalog(chain18, "damaged-cache")
    third = take_snapshot(settings, incremental=True)  # its chain's skeleton is the cache's entry now
    [entry] = cached_entries(third)
    assert entry.name.endswith(manifests_key([chain18.full, chain18.first, chain18.second, third])[:32])
    largest = max((p for p in (entry / "base").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    largest.unlink()
    fourth = take_snapshot(settings, incremental=True)
    assert chain_ids(fourth) == [chain18.full.id, chain18.first.id, chain18.second.id, third.id, fourth.id]
    assert fourth.snapshot["chain_checked_from"] == "storage"  # type: ignore[index]
    assert fourth.snapshot["pg_combinebackup"] == "ok"  # type: ignore[index]
    [replaced] = cached_entries(fourth)
    assert replaced.name.endswith(manifests_key([chain18.full, chain18.first, chain18.second, third, fourth])[:32])
    assert (replaced / largest.relative_to(entry)).stat().st_size > 0


def test_an_encrypted_incremental_is_checked_against_the_cache_and_its_chain_restores(
        chain18: Chain18, restored18: list[Path], tmp_path: Path) -> None:
    """The cache keeps no data, so backups encrypted at rest use it too: an encrypted incremental's check reads the
    cached skeleton, and its chain (plaintext ancestors, the encrypted newest member) restores every committed row."""
    from backup_tasks.physical.plan import latest_target
    from backup_tasks.physical.restore import restore_pitr
    from tests.support.crypto import write_identity_file

    plain = copy_of_catalog(chain18, "encrypted-newest")
    third = take_snapshot(plain, incremental=True)  # leaves its chain's skeleton in the cache, whatever ran before
    public = write_identity_file(tmp_path / "identity.txt")
    settings = dataclasses.replace(plain, encrypt_recipients=(public,), decrypt_identity_file=tmp_path / "identity.txt")
    fourth = take_snapshot(settings, incremental=True)
    assert fourth.encryption and chain_ids(fourth) == [*chain_ids(third), fourth.id]
    assert fourth.snapshot["chain_checked_from"] == "cache"  # type: ignore[index]
    data_dir = chain18.env.base / f"restored-{random.randrange(1 << 30)}"
    restored18.append(data_dir)
    report = restore_pitr(settings, latest_target(), data_dir, start=True)
    assert report.ok and report.chain == chain_ids(fourth), report.notes
    with psycopg.connect(host="127.0.0.1", port=report.port, user=SERVER_USER, dbname="aitrapp") as conn:
        assert [r[0] for r in conn.execute("SELECT id FROM marks ORDER BY id")] == list(range(1, 81))


def test_the_chain_cache_serves_encrypted_backups_too(tmp_path: Path) -> None:
    """The cache keeps no data (a skeleton), so backups encrypted at rest use it as plaintext ones do."""
    from backup_tasks.physical.snapshot import SourceFacts, chain_cache

    facts = SourceFacts(version="18.6", major=18, system_identifier="7", segment_size=16 << 20, superuser="postgres",
                        wal_level="replica", archive_mode="on", archive_command="x", data_directory=None,
                        tablespaces=[], summarize_wal="on")
    settings = Settings(database_url="postgresql://u@h/aitrapp", backup_dir=str(tmp_path / "backups"),
                        encrypt_recipients=("age1example",))
    assert chain_cache(settings, tmp_path / "staging", facts, "aitrapp") is not None
    assert chain_cache(settings, tmp_path / "staging", dataclasses.replace(facts, summarize_wal="off"),
                       "aitrapp") is None
    assert chain_cache(dataclasses.replace(settings, chain_cache=False), tmp_path / "staging", facts,
                       "aitrapp") is None
