"""Unlogged and temporary tables through snapshots, ``verify --snapshot`` and the PITR drill.

No physical recovery brings an unlogged table's rows back (crash recovery and PITR reset it to its
init fork), and a server still in recovery (paused at a restore point) refuses to read one at all.
A dump copies their rows all the same. So a recovered copy is compared with a dump on what recovery
can read: unlogged tables (an unlogged partition too, taken out of its parent's count) are named and
expected empty, never counted; another session's temporary table is in no count at all.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime

import psycopg
import pytest

from backup_tasks.catalog import manifest as catalog
from backup_tasks.catalog.compare import compare_counts, expected_after_recovery
from backup_tasks.cli.main import main
from backup_tasks.logical.dump import run_dump
from backup_tasks.physical import drill as drill_module
from backup_tasks.physical import verify as physical_verify
from backup_tasks.physical.drill import pitr_drill
from backup_tasks.physical.snapshot import take_snapshot
from backup_tasks.postgres.cluster import ThrowawayCluster
from backup_tasks.postgres.connect import connect
from backup_tasks.postgres.queries import count_rows, partition_leaves, unlogged_tables
from backup_tasks.settings import Settings
from backup_tasks.storage.locations import open_storage
from backup_tasks.wal.restore_points import create_restore_point, restore_point_name
from tests.support.pitr import PitrEnv, cli_env, run_cli, switch_and_wait, trading_cluster

DAY = "2026-11-27"

#: The unlogged tables of the source: a plain table, a partition of a logged partitioned table and an
#: inheritance child of a logged table.
UNLOGGED = ["public.fills_h2", "public.quotes_live", "public.scratch_cache"]

EXTRAS = """
CREATE UNLOGGED TABLE scratch_cache (k int PRIMARY KEY, v text NOT NULL);
INSERT INTO scratch_cache SELECT g, 'v' || g FROM generate_series(1, 40) g;
CREATE TABLE fills (day date NOT NULL, qty int NOT NULL) PARTITION BY RANGE (day);
CREATE TABLE fills_h1 PARTITION OF fills FOR VALUES FROM ('2026-01-01') TO ('2026-07-01');
CREATE UNLOGGED TABLE fills_h2 PARTITION OF fills FOR VALUES FROM ('2026-07-01') TO ('2027-01-01');
INSERT INTO fills SELECT date '2026-01-01' + g * 3, g FROM generate_series(0, 99) g;
CREATE TABLE quotes (sym text NOT NULL);
CREATE UNLOGGED TABLE quotes_live () INHERITS (quotes);
INSERT INTO quotes VALUES ('A'), ('B');
INSERT INTO quotes_live SELECT 'L' || g FROM generate_series(1, 7) g;
"""


@dataclass
class Source:
    env: PitrEnv
    cluster: ThrowawayCluster
    settings: Settings
    session: psycopg.Connection  # holds a temporary table for the whole module


@pytest.fixture(scope="module")
def source() -> Iterator[Source]:
    """A cluster archiving through wal-push: the trading schema, unlogged tables, a session's temporary table."""
    with trading_cluster("bt-test-unlogged-", signals=200) as (env, cluster):
        conninfo = cluster.conninfo("aitrapp")
        with connect(conninfo) as conn:
            conn.execute(EXTRAS)
        # A live session's temporary table is in the catalog every snapshot copies: never counted.
        with connect(conninfo) as session:
            session.execute("CREATE TEMP TABLE session_scratch AS SELECT g FROM generate_series(1, 5) g")
            yield Source(env, cluster, env.for_cluster(cluster, "aitrapp"), session)


def readable_counts(source: Source) -> dict[str, int]:
    """The source's row counts as a recovery of this moment shows them: no unlogged table, fills without fills_h2."""
    with connect(source.cluster.conninfo("aitrapp")) as conn:
        return count_rows(conn, skip=unlogged_tables(conn))


def more_rows(source: Source) -> None:
    with connect(source.cluster.conninfo("aitrapp")) as conn:
        conn.execute("INSERT INTO scratch_cache SELECT m + g, 'late' FROM (SELECT max(k) AS m FROM scratch_cache) s, "
                     "generate_series(1, 20) g")
        conn.execute("INSERT INTO quotes VALUES ('C')")


# --- pure: what a recovery must show, given the dump's counts --------------------------------------------

def test_expected_after_recovery_leaves_out_unlogged_tables_and_their_rows_in_a_parent() -> None:
    dumped = {"public.t": 5, "public.u": 40, "public.p": 30, "public.p1": 10, "public.p2": 20, "public.q": 0}
    expected = expected_after_recovery(dumped, unlogged=["public.u", "public.p2"],
                                       partitions={"public.p": ["public.p1", "public.p2"]})
    assert expected == {"public.t": 5, "public.p": 10, "public.p1": 10, "public.q": 0}
    assert compare_counts(expected, {"public.t": 5, "public.p": 10, "public.p1": 10, "public.q": 0}) == []
    # An unlogged table the recovered catalog has but the dump's list lacks is not read either.
    assert expected_after_recovery(dumped, unlogged=[], partitions={}) == dumped


# --- against a real archiving server ---------------------------------------------------------------------

@pytest.mark.slow
def test_recovered_counts_leave_out_the_catalogs_and_the_dumps_unlogged_tables(source: Source) -> None:
    """What verify reads of a copy: the catalog's unlogged tables and those the dump's manifest lists."""
    with connect(source.cluster.conninfo("aitrapp")) as conn:
        everything = count_rows(conn)
        readable = count_rows(conn, recovered=True)
        dump = replace(catalog_dump(everything), unlogged_tables=["public.quotes"])  # as dump.py records it
        recovered = physical_verify.read_recovered(conn, dump)
        # A dump whose unlogged table is gone from the copy (dropped after it, say): named, not counted.
        dropped = replace(dump, tables={**dump.tables, "public.gone": 3}, unlogged_tables=["public.gone"])
        without = physical_verify.read_recovered(conn, dropped)
    assert set(everything) - set(readable) == set(UNLOGGED)
    assert readable["public.fills"] == everything["public.fills_h1"] < everything["public.fills"]
    assert recovered.unlogged == sorted([*UNLOGGED, "public.quotes"])
    assert set(recovered.counts) == set(readable) - {"public.quotes"}
    assert recovered.partitions == {"public.fills": ["public.fills_h1", "public.fills_h2"]}
    assert recovered.against(dump) == []  # the dump of this very moment matches
    assert without.unlogged == sorted([*UNLOGGED, "public.gone"])
    assert without.against(dropped) == [
        "table public.gone (unlogged: expected empty) is missing from the restored database"]


def catalog_dump(tables: dict[str, int]) -> catalog.Manifest:
    return catalog.Manifest(id="aitrapp-dump-20261127T100000Z", kind="dump", database="aitrapp", server="h:5432",
                            server_version="15", started_at="2026-11-27T10:00:00Z",
                            finished_at="2026-11-27T10:00:01Z", path="x.dump.zst", size_bytes=1, sha256="0" * 64,
                            compression="zstd", tables=dict(tables))


@pytest.mark.slow
def test_the_snapshot_manifest_names_the_unlogged_tables(source: Source) -> None:
    with connect(source.cluster.conninfo("aitrapp")) as conn:
        assert unlogged_tables(conn) == UNLOGGED
        assert partition_leaves(conn) == {"public.fills": ["public.fills_h1", "public.fills_h2"]}
        counted = count_rows(conn)
    assert "session_scratch" not in " ".join(counted), "another session's temporary table is never counted"
    assert counted["public.scratch_cache"] == 40 and counted["public.fills"] == 100
    snapshot = take_snapshot(source.settings)
    assert snapshot.unlogged_tables == UNLOGGED
    assert catalog.load(open_storage(source.settings.backup_dir), snapshot.id).unlogged_tables == UNLOGGED


@pytest.mark.slow
def test_verify_snapshot_after_a_dump_expects_the_unlogged_tables_empty(source: Source) -> None:
    dump, _skipped = run_dump(source.settings)
    assert dump.tables["public.scratch_cache"] == 40 and dump.tables["public.fills_h2"] > 0
    assert dump.unlogged_tables == UNLOGGED
    take_snapshot(source.settings)
    expected = readable_counts(source)
    more_rows(source)
    switch_and_wait(source.cluster.conninfo("aitrapp"), source.env.archive)
    result = run_cli("verify", "--snapshot", "--json", env=cli_env(source.settings), timeout=600)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 0, result.stderr + result.stdout
    document = json.loads(result.stdout)
    assert document["ok"] is True and document["problems"] == []
    assert document["details"]["unlogged_tables"] == UNLOGGED
    assert {"recovery", "end-of-archive", "row-counts", "amcheck"} <= set(document["checked"])
    assert document["tables_compared"] == len(expected)  # every table recovery can read, no unlogged one
    assert document["details"]["rows"] == sum(expected.values()) + 1  # the quote inserted after


@pytest.mark.slow
def test_verify_snapshot_at_a_restore_point_with_a_same_day_dump_records_a_verdict(source: Source) -> None:
    """The post-close state: a restore point, then that day's dump; recovery pauses there and compares."""
    take_snapshot(source.settings)
    point = create_restore_point(source.settings, restore_point_name(DAY), trading_day=DAY)
    dump, _skipped = run_dump(source.settings, trading_day=DAY)
    more_rows(source)  # after the close: the end of the archive differs from the restore point
    switch_and_wait(source.cluster.conninfo("aitrapp"), source.env.archive)
    result = run_cli("verify", "--snapshot", "--json", env=cli_env(source.settings), timeout=600)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 0, result.stderr + result.stdout
    document = json.loads(result.stdout)
    assert document["ok"] is True, document["problems"]
    assert {"restore-point-row-counts", "end-of-archive", "row-counts", "amcheck"} <= set(document["checked"])
    assert document["details"]["restore_point"]["name"] == point.name
    assert document["details"]["restore_point"]["dump"] == dump.id
    assert document["details"]["unlogged_tables"] == UNLOGGED
    recorded = catalog.load(open_storage(source.settings.backup_dir), document["backup_id"])
    assert recorded.verification is not None and recorded.verification.ok
    assert recorded.verification.details["unlogged_tables"] == UNLOGGED


@pytest.mark.slow
def test_an_error_while_checking_is_a_recorded_verdict_of_one_line(
        source: Source, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Whatever a check of the recovered copy raises: one line, exit 1, the failed verdict recorded."""
    snapshot = take_snapshot(source.settings)

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise psycopg.errors.FeatureNotSupported("cannot access temporary or unlogged relations during recovery\n"
                                                 "CONTEXT: a second line")

    monkeypatch.setattr(physical_verify, "amcheck_indexes", refuse)
    for name in list(os.environ):  # exactly the module's settings, nothing inherited
        if name.startswith(("BACKUP_", "CELERY_", "SENTRY_", "WAL_")) or name == "DATABASE_URL":
            monkeypatch.delenv(name)
    for name, value in cli_env(source.settings).items():
        monkeypatch.setenv(name, value)
    code = main(["verify", "--snapshot", snapshot.id])
    captured = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in captured.err + captured.out
    recorded = catalog.load(open_storage(source.settings.backup_dir), snapshot.id)
    assert recorded.verification is not None and recorded.verification.ok is False
    assert recorded.verification.problems == [
        "checking the recovered copy failed: cannot access temporary or unlogged relations during recovery"]
    assert recorded.verification.problems[0] in captured.out


@pytest.mark.slow
def test_the_drill_counts_what_recovery_can_read_and_names_the_unlogged_tables(source: Source) -> None:
    take_snapshot(source.settings)
    expected = readable_counts(source)
    with connect(source.cluster.conninfo("aitrapp")) as conn:
        moment = datetime.fromisoformat(str(conn.execute("SELECT now()::text").fetchone()[0]))
    more_rows(source)
    switch_and_wait(source.cluster.conninfo("aitrapp"), source.env.archive)
    result = pitr_drill(source.settings, target=moment)
    assert result.ok, result.problems
    assert result.unlogged_tables == UNLOGGED
    assert result.tables == len(expected) and result.rows == sum(expected.values())
    recorded = catalog.load(open_storage(source.settings.backup_dir), str(result.snapshot_id))
    assert recorded.pitr_drill is not None and recorded.pitr_drill["unlogged_tables"] == UNLOGGED


@pytest.mark.slow
def test_an_error_while_drilling_is_a_recorded_result_of_one_line(
        source: Source, monkeypatch: pytest.MonkeyPatch) -> None:
    take_snapshot(source.settings)
    switch_and_wait(source.cluster.conninfo("aitrapp"), source.env.archive)

    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("a bug in counting\nsecond line")

    monkeypatch.setattr(drill_module, "count_rows", broken)
    result = pitr_drill(source.settings, seed=3)
    assert result.ok is False and result.problems == ["the drill failed: RuntimeError: a bug in counting"]
    recorded = catalog.load(open_storage(source.settings.backup_dir), str(result.snapshot_id))
    assert recorded.pitr_drill is not None and recorded.pitr_drill["problems"] == result.problems
