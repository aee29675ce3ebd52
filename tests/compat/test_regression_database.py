"""A database nobody here wrote, restored whole (issue 19): PostgreSQL 15's regression database.

What ``make installcheck`` leaves behind (``tests/support/regression.py`` builds it once per session)
goes through every path a backup takes: ``dump``, ``verify``, ``restore`` (the same server; a fresh
server with ``--with-roles``; a fresh server with ``--no-owner``), ``snapshot``, ``verify --snapshot``
and ``restore-pitr``. Each copy is compared with the source: ``pg_dump --schema-only`` line for line,
every table's, materialized view's and sequence's rows, the large objects and the database's own
properties (owner, ACL, ``ALTER DATABASE ... SET``).

The yardstick is a plain round trip, made here too: ``pg_dumpall --globals-only | psql`` and
``pg_dump -Fc | pg_restore --create`` into a fresh server. What it changes, a logical restore may
change; nothing else. It changes two things, named below and checked to be all there is: the column
order of some inheritance children (pg_dump writes a child's inherited columns first), and the rows
of a materialized view that was stale in the source (pg_restore refreshes it). A physical copy
(PITR) must be exact, except for unlogged relations, which every recovery empties by design.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass

import pytest

from backup_tasks.conninfo import ConnInfo
from backup_tasks.postgres.cluster import ThrowawayCluster
from backup_tasks.postgres.connect import connect
from tests.support.pitr import cli_env, run_cli, stop_restored, switch_and_wait
from tests.support.regression import (
    RegressionSource,
    data_fingerprint,
    database_properties,
    differences,
    pg_tool,
    schema_lines,
    tool_env,
)

pytestmark = pytest.mark.slow

TRADING_DAY = "2026-11-27"
POINT = "regression-after-close"
#: pg_dump's flags for comparing a copy restored without owners: no OWNER TO, no GRANT/REVOKE.
NO_OWNER_FLAGS = ("--no-owner", "--no-privileges")

#: Inheritance children whose columns a dump and restore put in another order: pg_dump writes a child's
#: inherited columns first, where the source had added them to the parent (or the child) later.
REORDERED_CHILDREN = {
    "public.b_star", "public.c_star", "public.d_star", "public.e_star", "public.f_star", "public.gtestxx_4",
    "public.renamecolumnanother", "public.renamecolumnchild", "public.test_type_diff2_c1",
    "public.test_type_diff2_c2", "public.test_type_diff_c",
}
#: Materialized views left stale by the regression tests: pg_restore refreshes them, so their rows change.
STALE_MATVIEWS = {"public.mvtest_bb"}


@dataclass
class State:
    """One database as the comparisons see it."""

    schema: Counter[str]
    schema_no_owner: Counter[str]
    data: dict[str, str]
    properties: dict[str, object]


def state_of(conninfo: ConnInfo) -> State:
    return State(schema_lines(conninfo), schema_lines(conninfo, *NO_OWNER_FLAGS), data_fingerprint(conninfo),
                 database_properties(conninfo))


@dataclass
class Diff:
    schema: set[str]
    schema_no_owner: set[str]
    data: set[str]
    properties: set[str]


def diff(source: State, copy: State) -> Diff:
    return Diff(differences(source.schema, copy.schema), differences(source.schema_no_owner, copy.schema_no_owner),
                differences(source.data, copy.data), differences(source.properties, copy.properties))


def cli(source: RegressionSource, *args: str, timeout: float = 600) -> dict:
    """``backup-tasks --json ARGS`` against the regression database: its JSON document; fails on a traceback."""
    result = run_cli(*args, "--json", env=cli_env(source.settings), timeout=timeout)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 0, f"backup-tasks {' '.join(args)} exited {result.returncode}: " \
                                   f"{result.stderr[-2000:]} {result.stdout[-2000:]}"
    return dict(json.loads(result.stdout))


@pytest.fixture(scope="module")
def source_state(regression_source: RegressionSource) -> State:
    return state_of(regression_source.conninfo)


@pytest.fixture(scope="module")
def reference(regression_source: RegressionSource, source_state: State) -> Diff:
    """What a plain ``pg_dumpall -g`` + ``pg_dump | pg_restore --create`` into a fresh server changes."""
    with ThrowawayCluster() as fresh:
        target = tool_env(fresh.conninfo("postgres"))
        globals_sql = subprocess.run([pg_tool("pg_dumpall"), "--globals-only"], env=tool_env(regression_source.admin),
                                     capture_output=True, text=True, check=True).stdout
        # ON_ERROR_STOP off: the one error is `role "postgres" already exists`, as on any real target.
        subprocess.run([pg_tool("psql"), "-q", "-X"], input=globals_sql, env=target, capture_output=True,
                       text=True, check=True)
        dump = subprocess.run([pg_tool("pg_dump"), "-Fc"], env=tool_env(regression_source.conninfo),
                              capture_output=True, check=True).stdout
        restored = subprocess.run([pg_tool("pg_restore"), "--create", "--exit-on-error", "-d", "postgres"],
                                  input=dump, env=target, capture_output=True, check=False)
        assert restored.returncode == 0, restored.stderr.decode(errors="replace")
        return diff(source_state, state_of(fresh.conninfo("regression")))


@pytest.fixture(scope="module")
def dumped(regression_source: RegressionSource) -> dict:
    """``backup-tasks dump`` of the regression database, for the trading day the restore point marks."""
    return cli(regression_source, "dump", "--trading-day", TRADING_DAY)


@pytest.fixture(scope="module")
def snapshotted(regression_source: RegressionSource, dumped: dict) -> dict:
    """The post-close state: a same-day dump, a snapshot, marks 1-10, the day's restore point, marks 11-20."""
    snapshot = cli(regression_source, "snapshot")
    admin = regression_source.admin
    with connect(admin) as conn:
        conn.execute("CREATE TABLE marks (id int PRIMARY KEY)")
        conn.execute("INSERT INTO marks SELECT generate_series(1, 10)")
    cli(regression_source, "restore-point", "--trading-day", TRADING_DAY, POINT)
    with connect(admin) as conn:
        conn.execute("INSERT INTO marks SELECT generate_series(11, 20)")
    switch_and_wait(admin, regression_source.env.archive)
    return snapshot


def assert_within(copy: Diff, allowed: Diff, *, what: str) -> None:
    """``copy``'s differences from the source are among ``allowed``'s (the reference round trip's)."""
    assert copy.schema <= allowed.schema, f"{what}: schema differs beyond the round trip: " \
                                          f"{sorted(copy.schema - allowed.schema)[:20]}"
    assert copy.data <= allowed.data, f"{what}: data differs beyond the round trip: {sorted(copy.data - allowed.data)}"
    assert copy.properties <= allowed.properties, f"{what}: database properties differ: {copy.properties}"


def test_the_regression_database_is_the_one_the_issue_describes(regression_source: RegressionSource,
                                                                 source_state: State) -> None:
    assert regression_source.failed_tests < 20, "a few tests fail against a newer minor; not a broken run"
    with connect(regression_source.conninfo) as conn:
        counts = dict(conn.execute("""
            SELECT kind, count(*) FROM (
              SELECT CASE WHEN relkind = 'r' AND relpersistence = 'u' THEN 'unlogged' ELSE relkind::text END AS kind
              FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_(toast|temp)'
            ) k GROUP BY kind""").fetchall())
        policies = conn.execute("SELECT count(*) FROM pg_policy").fetchone()[0]
        policy_roles = conn.execute("SELECT count(DISTINCT r) FROM pg_policy, unnest(polroles) r WHERE r <> 0"
                                    ).fetchone()[0]
        large_objects = conn.execute("SELECT count(*) FROM pg_largeobject_metadata").fetchone()[0]
    assert counts["r"] + counts["p"] + counts["unlogged"] >= 600 and counts["p"] >= 80, counts
    assert counts["unlogged"] >= 4 and counts["m"] >= 8, counts
    assert policies >= 30 and policy_roles >= 2 and large_objects >= 1
    assert len(source_state.properties["settings"]) == 6  # type: ignore[arg-type]


def test_a_plain_dump_and_restore_changes_only_the_named_things(reference: Diff) -> None:
    assert {key for key in reference.data if key.endswith(" columns")} == {f"{t} columns" for t in REORDERED_CHILDREN}
    assert {key for key in reference.data if key.endswith(" rows")} == {f"{m} rows" for m in STALE_MATVIEWS}
    assert {key.rsplit(" ", 1)[1] for key in reference.data} == {"columns", "rows"}
    # In the schema, the same column definitions in another order: nothing added, lost or changed.
    for lines in (reference.schema, reference.schema_no_owner):
        assert lines and all(line[1:].startswith("    ") for line in lines), sorted(lines)
        removed = Counter(line[1:].rstrip(",") for line in lines if line[0] == "-")
        added = Counter(line[1:].rstrip(",") for line in lines if line[0] == "+")
        assert removed == added
    assert reference.properties == set(), "pg_restore --create keeps the database's properties"


def test_dump_and_verify(regression_source: RegressionSource, source_state: State, dumped: dict) -> None:
    with connect(regression_source.conninfo) as conn:
        tables = conn.execute(
            "SELECT n.nspname || '.' || c.relname, quote_ident(n.nspname) || '.' || quote_ident(c.relname),"
            "       c.relkind = 'r' AND NOT EXISTS (SELECT FROM pg_inherits WHERE inhparent = c.oid)"
            " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.relkind IN ('r', 'p') AND c.relpersistence <> 't'"
            "   AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_'").fetchall()
    assert set(dumped["tables"]) == {name for name, _, _ in tables}
    for name, quoted, leaf in tables:  # the manifest's counts are the source's rows
        if leaf:
            assert dumped["tables"][name] == int(source_state.data[f"{quoted} rows"].split()[0]), name
    verdict = cli(regression_source, "verify", dumped["id"])
    assert verdict["ok"] is True and verdict["problems"] == [], verdict
    assert verdict["tables_compared"] == len(dumped["tables"])
    listed = cli(regression_source, "list")
    assert dumped["id"] in json.dumps(listed) and "verified" in json.dumps(listed)


def test_restore_into_the_same_server(regression_source: RegressionSource, source_state: State, reference: Diff,
                                      dumped: dict) -> None:
    target = regression_source.cluster.conninfo("regression_restored")
    try:
        report = cli(regression_source, "restore", dumped["id"], "--target-database-url",
                     regression_source.cluster.url(target.dbname))
        assert report["ok"] and report["tables"] == len(dumped["tables"])
        assert_within(diff(source_state, state_of(target)), reference, what="restore into the same server")
    finally:
        with connect(regression_source.admin) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {target.dbname} WITH (FORCE)")


def source_roles(regression_source: RegressionSource) -> set[str]:
    with connect(regression_source.admin) as conn:
        return {r[0] for r in conn.execute("SELECT rolname FROM pg_roles WHERE rolname !~ '^pg_'").fetchall()}


def test_restore_into_a_fresh_server_with_roles(regression_source: RegressionSource, source_state: State,
                                                reference: Diff, dumped: dict) -> None:
    with ThrowawayCluster() as fresh:
        url = fresh.url("regression")
        # Without --with-roles: one error naming the missing roles, before anything is written.
        refused = run_cli("restore", dumped["id"], "--target-database-url", url,
                          env=cli_env(regression_source.settings))
        assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
        assert "regress_rls_group1" in refused.stderr, refused.stderr
        with connect(fresh.conninfo()) as conn:
            assert conn.execute("SELECT count(*) FROM pg_database WHERE datname LIKE 'regression%'").fetchone()[0] == 0
            assert conn.execute("SELECT count(*) FROM pg_roles WHERE rolname ~ '^regress_'").fetchone()[0] == 0

        report = cli(regression_source, "restore", dumped["id"], "--target-database-url", url, "--with-roles")
        assert report["ok"] and report["tables"] == len(dumped["tables"])
        assert "regress_rls_group1" in report["roles_created"]
        assert set(report["roles_created"]) <= source_roles(regression_source)
        # Owners, grants and policies included: the full schema, as the plain round trip with globals has it.
        assert_within(diff(source_state, state_of(fresh.conninfo("regression"))), reference,
                      what="restore --with-roles into a fresh server")


_POLICY_TO = re.compile(r" TO (.+?)(?: USING \(| WITH CHECK \(|;$)")


def policy_to_roles(line: str) -> set[str]:
    """The roles of a pg_dump ``CREATE POLICY`` line's ``TO`` clause (empty: PUBLIC)."""
    found = _POLICY_TO.search(line)
    return {role.strip().strip('"') for role in found.group(1).split(",")} if found else set()


def test_restore_into_a_fresh_server_without_owners(regression_source: RegressionSource, source_state: State,
                                                    reference: Diff, dumped: dict) -> None:
    with ThrowawayCluster() as fresh:
        report = cli(regression_source, "restore", dumped["id"], "--target-database-url", fresh.url("regression"),
                     "--no-owner")
        assert report["ok"] and report["tables"] == len(dumped["tables"])
        copy = state_of(fresh.conninfo("regression"))
        with connect(fresh.conninfo()) as conn:
            present = {r[0] for r in conn.execute("SELECT rolname FROM pg_roles").fetchall()}
    found = diff(source_state, copy)
    # Beyond the round trip: only policies naming roles this server lacks, cut to the present ones or left
    # out (row-level security stays enabled on their tables, compared like every other line).
    extra = found.schema_no_owner - reference.schema_no_owner
    assert all(line[1:].startswith("CREATE POLICY ") for line in extra), sorted(extra)[:20]
    removed = [line for line in extra if line[0] == "-"]
    assert all(policy_to_roles(line) - present for line in removed), removed
    assert all(not policy_to_roles(line) - present for line in extra if line[0] == "+")
    assert len(report["policies_changed"]) == len(removed) > 0, report["policies_changed"]
    # Data exactly as the round trip has it; the large objects' owners are the restoring user's now.
    ownership = {key for key in found.data if key.startswith("large object ") and key.endswith(" owner")}
    assert found.data - ownership <= reference.data, sorted(found.data - ownership - reference.data)
    # The database's settings and comment travel; owner and ACL are what --no-owner leaves out.
    assert copy.properties["settings"] == source_state.properties["settings"]
    assert copy.properties["comment"] == source_state.properties["comment"]


def test_snapshot_and_its_verification(regression_source: RegressionSource, snapshotted: dict) -> None:
    assert snapshotted["kind"] == "snapshot", snapshotted
    verdict = cli(regression_source, "verify", "--snapshot")
    assert verdict["ok"] is True and verdict["problems"] == [], verdict


def test_restore_pitr_to_the_restore_point(regression_source: RegressionSource, source_state: State,
                                           snapshotted: dict) -> None:
    data_dir = regression_source.env.base / "restored-pitr"
    try:
        report = cli(regression_source, "restore-pitr", "--data-dir", str(data_dir), "--target-name", POINT,
                     "--start")
        assert report["ok"] and report["started"], report
        copy_admin = ConnInfo(host="127.0.0.1", port=report["port"], dbname="postgres", user="postgres")
        with connect(copy_admin) as conn:
            assert [r[0] for r in conn.execute("SELECT id FROM marks ORDER BY id")] == list(range(1, 11))
        copy = state_of(copy_admin.with_dbname("regression"))
        found = diff(source_state, copy)
        # A physical copy is the source, byte for byte, apart from what recovery always empties.
        assert found.schema == found.schema_no_owner == found.properties == set()
        with connect(regression_source.conninfo) as conn:
            unlogged = {r[0] for r in conn.execute(
                "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) FROM pg_class c"
                " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relpersistence = 'u'"
                " AND c.relkind IN ('r', 'S')").fetchall()}
        assert unlogged and {key.rsplit(" ", 1)[0] for key in found.data} <= unlogged, sorted(found.data)
        assert all(copy.data[key].startswith("0 ") for key in found.data if key.endswith(" rows"))
    finally:
        stop_restored([data_dir])
        shutil.rmtree(data_dir, ignore_errors=True)

