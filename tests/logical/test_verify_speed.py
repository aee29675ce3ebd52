"""Verify close to the restore floor: the cached initdb template and the parallel checks stay correct."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from backup_tasks.conninfo import ConnInfo
from backup_tasks.logical.dump import run_dump
from backup_tasks.logical.pgrestore import pg_restore_into
from backup_tasks.logical.verify import check_restored, verify_backup
from backup_tasks.postgres import template as template_module
from backup_tasks.postgres.cluster import ThrowawayCluster
from backup_tasks.postgres.connect import connect
from backup_tasks.postgres.queries import amcheck_indexes, count_rows, run_parallel
from backup_tasks.postgres.template import MANIFEST_NAME, TEMPLATE_CACHE_ENV, TemplateCache
from backup_tasks.settings import Settings
from backup_tasks.storage.locations import open_storage

pytestmark = pytest.mark.slow  # throwaway clusters


@pytest.fixture
def initdb_runs(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every data directory initdb ran for (timing-free evidence that the cache was or was not used)."""
    runs: list[Path] = []
    real = ThrowawayCluster._initdb

    def counting(self: ThrowawayCluster) -> None:
        runs.append(self.data_dir)
        real(self)

    monkeypatch.setattr(ThrowawayCluster, "_initdb", counting)
    return runs


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private template cache, also the one verify_backup uses (``BACKUP_TASKS_INITDB_CACHE``)."""
    path = tmp_path / "initdb-cache"
    monkeypatch.setenv(TEMPLATE_CACHE_ENV, str(path))
    return path


def entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if not p.name.startswith("."))


def answers(cluster: ThrowawayCluster) -> bool:
    with connect(cluster.conninfo()) as conn:
        return conn.execute("SELECT count(*) FROM pg_database").fetchone()[0] == 3


def test_the_second_cluster_is_copied_from_the_cached_template(cache_dir: Path, initdb_runs: list[Path]) -> None:
    with ThrowawayCluster(template_cache=cache_dir) as first:
        assert first.from_template is None and answers(first)
    assert len(initdb_runs) == 1
    [entry] = entries(cache_dir)
    assert (entry / MANIFEST_NAME).is_file() and (entry / "data" / "PG_VERSION").is_file()
    with ThrowawayCluster(template_cache=cache_dir) as second:
        assert second.from_template == entry.name and answers(second)
    assert len(initdb_runs) == 1  # no initdb the second time
    assert [p.name for p in cache_dir.iterdir()] == [entry.name]  # no build or discarded leftovers


def test_verify_uses_the_template_from_the_second_run_on(
        trading_db: ConnInfo, settings_for: Callable[..., Settings], cache_dir: Path,
        initdb_runs: list[Path]) -> None:
    settings = settings_for(trading_db)
    run_dump(settings)
    first, second = verify_backup(settings), verify_backup(settings)
    assert first.ok and second.ok, (first.problems, second.problems)
    assert len(initdb_runs) == 1 and len(entries(cache_dir)) == 1
    assert (second.tables_compared, second.indexes_checked) == (first.tables_compared, first.indexes_checked)


def damage_flip(entry: Path) -> None:
    target = entry / "data" / "global" / "pg_control"
    data = bytearray(target.read_bytes())
    data[40] ^= 0xFF
    target.write_bytes(bytes(data))


def damage_truncate(entry: Path) -> None:
    victim = next(p for p in sorted((entry / "data" / "base").rglob("*")) if p.is_file() and p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[:100])


def damage_extra_file(entry: Path) -> None:
    (entry / "data" / "base" / "stray").write_bytes(b"x")


def damage_missing_file(entry: Path) -> None:
    (entry / "data" / "PG_VERSION").unlink()


def damage_partial(entry: Path) -> None:
    (entry / MANIFEST_NAME).unlink()  # as if the copy was interrupted before the manifest


def damage_bad_manifest(entry: Path) -> None:
    (entry / MANIFEST_NAME).write_text("{not json")


def damage_unstartable(entry: Path) -> None:
    """A template whose files match its manifest but cannot start (the manifest rewritten to agree)."""
    control = entry / "data" / "global" / "pg_control"
    zeros = b"\0" * control.stat().st_size
    control.write_bytes(zeros)
    manifest = json.loads((entry / MANIFEST_NAME).read_text())
    mode = manifest["files"]["global/pg_control"][0]
    manifest["files"]["global/pg_control"] = [mode, len(zeros), hashlib.sha256(zeros).hexdigest()]
    (entry / MANIFEST_NAME).write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage", [damage_flip, damage_truncate, damage_extra_file, damage_missing_file,
                                    damage_partial, damage_bad_manifest, damage_unstartable])
def test_a_damaged_or_partial_template_is_detected_and_rebuilt(
        damage: Callable[[Path], None], cache_dir: Path, initdb_runs: list[Path]) -> None:
    with ThrowawayCluster(template_cache=cache_dir):
        pass
    [entry] = entries(cache_dir)
    damage(entry)
    with ThrowawayCluster(template_cache=cache_dir) as cluster:  # never a failure because of the cache
        assert cluster.from_template is None and answers(cluster)
    assert len(initdb_runs) == 2
    [rebuilt] = entries(cache_dir)  # same key, a fresh entry
    assert rebuilt.name == entry.name
    with ThrowawayCluster(template_cache=cache_dir) as cluster:
        assert cluster.from_template == entry.name and answers(cluster)
    assert len(initdb_runs) == 2


def test_an_entry_taken_away_while_it_is_copied_means_initdb(
        cache_dir: Path, initdb_runs: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    with ThrowawayCluster(template_cache=cache_dir):
        pass
    [entry] = entries(cache_dir)
    real = template_module._copy_hashed
    calls = 0

    def racing(source: Path, dest: Path, mode: int) -> tuple[int, str]:
        nonlocal calls
        calls += 1
        if calls == 5:  # another verify discards the entry mid-copy
            TemplateCache(cache_dir).discard(entry.name)
        return real(source, dest, mode)

    monkeypatch.setattr(template_module, "_copy_hashed", racing)
    with ThrowawayCluster(template_cache=cache_dir) as cluster:
        assert cluster.from_template is None and answers(cluster)
    assert len(initdb_runs) == 2


def test_a_cache_directory_others_could_write_is_not_used(tmp_path: Path, initdb_runs: list[Path]) -> None:
    cache = tmp_path / "shared"
    cache.mkdir(mode=0o777)
    cache.chmod(0o777)
    for _ in range(2):
        with ThrowawayCluster(template_cache=cache) as cluster:
            assert cluster.from_template is None and answers(cluster)
    assert len(initdb_runs) == 2 and list(cache.iterdir()) == []


def test_concurrent_clusters_share_the_cache_without_clashing(cache_dir: Path, initdb_runs: list[Path]) -> None:
    def start_many(n: int) -> list[str | None]:
        outcomes: list[str | BaseException | None] = [None] * n

        def one(i: int) -> None:
            try:
                with ThrowawayCluster(template_cache=cache_dir) as cluster:
                    assert answers(cluster)
                    outcomes[i] = cluster.from_template
            except BaseException as exc:  # reported below, with the others' outcomes
                outcomes[i] = exc

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not [o for o in outcomes if isinstance(o, BaseException)], outcomes
        return outcomes  # type: ignore[return-value]

    start_many(3)  # all miss at once: every one builds, one publishes, nobody fails
    assert len(entries(cache_dir)) == 1
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".build-")]
    runs_before = len(initdb_runs)
    assert all(start_many(3))  # all hit at once
    assert len(initdb_runs) == runs_before


def test_concurrent_verifies_succeed(trading_db: ConnInfo, settings_for: Callable[..., Settings],
                                     cache_dir: Path) -> None:
    settings = settings_for(trading_db)
    run_dump(settings)
    results: list[object] = []

    def one() -> None:
        results.append(verify_backup(settings))

    threads = [threading.Thread(target=one) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and all(r.ok for r in results), results  # type: ignore[attr-defined]


@pytest.fixture
def restored_tricky(tricky_db: ConnInfo, settings_for: Callable[..., Settings]) -> Iterator[tuple[ConnInfo, dict]]:
    """The tricky database dumped and restored into a throwaway cluster, with the dump's row counts."""
    settings = settings_for(tricky_db)
    manifest, _ = run_dump(settings)
    with ThrowawayCluster() as cluster:
        target = cluster.conninfo()
        pg_restore_into(open_storage(settings.backup_dir), manifest, target, min_major=0, settings=settings,
                        extra_args=("--no-owner", "--no-privileges"))
        yield target, manifest.tables


def test_parallel_checks_give_the_serial_results(restored_tricky: tuple[ConnInfo, dict]) -> None:
    target, expected = restored_tricky
    with connect(target) as conn:
        serial_counts = count_rows(conn)
        serial_indexes, serial_problems = amcheck_indexes(conn)
    _version, count_problems, indexes_checked, index_problems = check_restored(target, expected)
    assert serial_counts == expected and count_problems == []
    assert indexes_checked == serial_indexes >= 3 and index_problems == serial_problems == []


def break_index(target: ConnInfo, table: str, index: str) -> None:
    """``table`` (id int PRIMARY KEY, v text, index on v) with rows in the heap that ``index`` lacks."""
    with connect(target) as conn:
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
        conn.execute(f"CREATE INDEX {table}_v ON {table} (v)")
        conn.execute(f"INSERT INTO {table} SELECT g, 'v' || g FROM generate_series(1, 2000) g")
        # Rows written while the index is not ready are in the heap but not in the index: exactly
        # what heapallindexed exists to find.
        conn.execute("UPDATE pg_index SET indisready = false WHERE indexrelid = %s::regclass", (index,))
    with connect(target) as conn:
        conn.execute(f"INSERT INTO {table} SELECT g, 'v' || g FROM generate_series(2001, 2100) g")
        conn.execute("UPDATE pg_index SET indisready = true WHERE indexrelid = %s::regclass", (index,))


def test_parallel_amcheck_names_a_broken_index(restored_tricky: tuple[ConnInfo, dict]) -> None:
    target, expected = restored_tricky
    break_index(target, "broken", "broken_pkey")  # the index each table's rows are checked against
    break_index(target, "broken2", "broken2_v")  # a secondary index: only BACKUP_VERIFY_HEAP_CHECK=all reads it
    expected = {**expected, "public.broken": 2100, "public.broken2": 2100}
    for heap_check, broken in (("one", ["broken_pkey"]), ("all", ["broken_pkey", "broken2_v"])):
        with connect(target) as conn:
            serial_indexes, serial_problems = amcheck_indexes(conn, heap_check=heap_check)  # type: ignore[arg-type]
        _version, _counts, indexes_checked, problems = check_restored(target, expected,
                                                                      heap_check=heap_check)  # type: ignore[arg-type]
        assert indexes_checked == serial_indexes and sorted(problems) == sorted(serial_problems)
        assert sorted(p.split(":")[0] for p in problems) == sorted(f"index {name}" for name in broken)
        assert all("lacks matching index tuple" in p for p in problems)


def test_run_parallel_raises_a_failing_job_and_keeps_problems_in_order(
        restored_tricky: tuple[ConnInfo, dict]) -> None:
    from backup_tasks.postgres.queries import Job

    target, _ = restored_tricky
    jobs = [Job(float(i), f"j{i}", lambda _conn, i=i: f"problem {i}" if i % 2 else None) for i in range(6)]
    assert run_parallel(target, jobs, connections=2) == ["problem 1", "problem 3", "problem 5"]

    def explode(conn: psycopg.Connection) -> str | None:
        conn.execute("SELECT 1/0")
        return None

    with pytest.raises(psycopg.errors.DivisionByZero):
        run_parallel(target, [*jobs, Job(100.0, "boom", explode)], connections=2)
