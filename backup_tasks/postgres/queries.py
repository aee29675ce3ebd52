"""Queries on a connected server: user tables and exact row counts, exported snapshots, databases, amcheck, the
system identifier.

Unlogged tables (``unlogged_tables``) are the ones no physical recovery brings back: a dump copies
their rows, a recovered copy has none, and a server still in recovery refuses to read them at all.
``count_rows(conn, recovered=True)`` counts only what such a server can read. Temporary tables (another
session's, still in a snapshot's catalog) are in no count.

``run_parallel`` spreads independent read-only jobs (``count_jobs``, ``amcheck_jobs``) over several
connections, longest first: verify's checks of a restored copy are CPU-bound in the backends.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Literal

import psycopg
from psycopg import sql

from backup_tasks.conninfo import ConnInfo
from backup_tasks.postgres.connect import connect
from backup_tasks.postgres.failures import first_line

#: Ordinary (incl. unlogged) and partitioned tables of the user's schemas, excluding tables that
#: belong to an extension (pg_dump does not dump their rows unless configured, so we cannot compare).
_USER_TABLES_FROM = """
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p')
  AND c.relpersistence <> 't'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%%' AND n.nspname NOT LIKE 'pg\\_temp\\_%%'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                  AND d.objid = c.oid AND d.deptype = 'e')
ORDER BY n.nspname, c.relname
"""
USER_TABLES_SQL = "SELECT n.nspname, c.relname, c.relkind" + _USER_TABLES_FROM
#: The same with each table's persistence ('p' permanent, 'u' unlogged): what a server in recovery can read.
_PERSISTENT_USER_TABLES_SQL = "SELECT n.nspname, c.relname, c.relkind, c.relpersistence" + _USER_TABLES_FROM
#: The unlogged ones that hold rows (relkind 'r': plain tables, partitions, inheritance children alike).
#: PostgreSQL 15 lets a partitioned table be unlogged too, but it holds no rows: its partitions say
#: what comes back, each by its own persistence.
UNLOGGED_TABLES_SQL = ("SELECT nspname, relname FROM (" + _PERSISTENT_USER_TABLES_SQL + ") AS t "
                       "WHERE relkind = 'r' AND relpersistence = 'u'")
#: Every leaf partition of each partitioned user table (nested levels included), by pg_partition_tree.
_PARTITION_LEAVES_SQL = """
SELECT n.nspname, c.relname, ln.nspname, l.relname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
CROSS JOIN LATERAL pg_partition_tree(c.oid) t
JOIN pg_class l ON l.oid = t.relid JOIN pg_namespace ln ON ln.oid = l.relnamespace
WHERE c.relkind = 'p' AND t.isleaf AND l.relkind IN ('r', 'f')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
ORDER BY n.nspname, c.relname, ln.nspname, l.relname
"""
#: The same with each table's heap size, for ordering jobs (a verify's counts; never the dump's snapshot).
_SIZED_USER_TABLES_SQL = "SELECT n.nspname, c.relname, c.relkind, pg_relation_size(c.oid)" + _USER_TABLES_FROM


def qualified_name(schema: str, table: str) -> str:
    """The manifest key of a table: ``schema.table``, each part quoted only when it must be."""
    return f"{_quote_if_needed(schema)}.{_quote_if_needed(table)}"


def _quote_if_needed(ident: str) -> str:
    if re.fullmatch(r"[a-z_][a-z0-9_$]*", ident):
        return ident
    return '"' + ident.replace('"', '""') + '"'


def list_tables(conn: psycopg.Connection) -> list[tuple[str, str, str]]:
    return [(r[0], r[1], r[2]) for r in conn.execute(USER_TABLES_SQL.replace("%%", "%")).fetchall()]


def count_rows(conn: psycopg.Connection, *, recovered: bool = False, skip: Collection[str] = ()) -> dict[str, int]:
    """Exact row count of every user table, in the connection's current snapshot.

    A partitioned parent counts all its partitions' rows (``count(*)`` on the parent); each leaf is
    counted on its own with ``ONLY`` so inheritance children are not counted twice.

    ``recovered``: the server is a physical recovery (perhaps still in recovery, paused at a target), so
    only what it can read is counted: no unlogged relation is opened (a server in recovery refuses to,
    and after it they are empty by construction). ``skip``: more tables not to read (a dump's list of
    unlogged tables). Tables not read are not in the result; a partitioned table holding one of them
    among its partitions (or itself unlogged) is the sum of its other partitions, each counted ``ONLY``
    (a partition has no inheritance children, so the sum is what ``count(*)`` on the parent gives).
    Which tables are unlogged comes from the catalog, which a server in recovery reads as any other.
    """
    rows = conn.execute(_PERSISTENT_USER_TABLES_SQL.replace("%%", "%")).fetchall()
    tables = [(qualified_name(schema, table), schema, table, kind, persistence)
              for schema, table, kind, persistence in rows]
    unreadable = set(skip) | {key for key, *_, persistence in tables if recovered and persistence == "u"}
    leaves = _partition_leaves(conn) if unreadable else {}
    counts: dict[str, int] = {}
    # Tables that hold rows first, then the partitioned ones: whole, or from the partitions that can be read.
    for key, schema, table, kind, _persistence in sorted(tables, key=lambda t: t[3] == "p"):
        if kind != "p":
            if key not in unreadable:
                counts[key] = _count_table(conn, schema, table, kind)
            continue
        if key in skip:
            continue
        parts = leaves.get(key, [])
        if key not in unreadable and unreadable.isdisjoint(leaf for leaf, _s, _t in parts):
            counts[key] = _count_table(conn, schema, table, kind)
        else:
            counts[key] = sum(counts[leaf] if leaf in counts else _count_table(conn, leaf_schema, leaf_table, "r")
                              for leaf, leaf_schema, leaf_table in parts if leaf not in unreadable)
    return {key: counts[key] for key, *_rest in tables if key in counts}  # in the catalog's order, as before


def unlogged_tables(conn: psycopg.Connection) -> list[str]:
    """The user tables whose rows no physical recovery brings back (unlogged), partitions and inheritance
    children included, as sorted manifest keys. Reads the catalog only: works on a server in recovery."""
    rows = conn.execute(UNLOGGED_TABLES_SQL.replace("%%", "%")).fetchall()
    return sorted(qualified_name(r[0], r[1]) for r in rows)


def partition_leaves(conn: psycopg.Connection) -> dict[str, list[str]]:
    """Each partitioned user table -> its leaf partitions (those of nested levels too), as manifest keys.

    Catalog only (works in recovery): with it a parent's count can leave out partitions that cannot be read.
    """
    return {parent: [leaf for leaf, _s, _t in parts] for parent, parts in _partition_leaves(conn).items()}


def _partition_leaves(conn: psycopg.Connection) -> dict[str, list[tuple[str, str, str]]]:
    leaves: dict[str, list[tuple[str, str, str]]] = {}
    for schema, table, leaf_schema, leaf in conn.execute(_PARTITION_LEAVES_SQL).fetchall():
        leaves.setdefault(qualified_name(schema, table), []).append(
            (qualified_name(leaf_schema, leaf), leaf_schema, leaf))
    return leaves


@contextmanager
def exported_snapshot(conninfo: ConnInfo) -> Iterator[tuple[psycopg.Connection, str]]:
    """A repeatable-read, read-only transaction whose snapshot ``pg_dump --snapshot`` can share.

    The transaction stays open for the whole ``with`` block: the snapshot is importable only while
    its exporting transaction lives, and row counts taken in it describe exactly what pg_dump sees.
    """
    conn = connect(conninfo, autocommit=False)
    try:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        snapshot = str(conn.execute("SELECT pg_export_snapshot()").fetchone()[0])
        yield conn, snapshot
    finally:
        try:
            conn.rollback()
        finally:
            conn.close()


def database_names(conn: psycopg.Connection) -> list[str]:
    """Every database of the server, templates aside, sorted: a new system holding all of a catalog's databases is the
    old one after ``pg_upgrade`` (``catalog.generations``)."""
    return sorted(str(row[0]) for row in conn.execute("SELECT datname FROM pg_database WHERE NOT datistemplate"))


def system_identifier(conn: psycopg.Connection) -> str:
    """The cluster's system identifier (``pg_control_system()``, which any role may call), as decimal text."""
    return str(conn.execute("SELECT system_identifier::text FROM pg_control_system()").fetchone()[0])


def database_is_empty(conn: psycopg.Connection) -> bool:
    """No user relation, function or type outside the system schemas (a fresh ``createdb``)."""
    row = conn.execute(
        """SELECT
             (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
                 AND n.nspname NOT LIKE 'pg_toast%%' AND n.nspname NOT LIKE 'pg_temp_%%')
           + (SELECT count(*) FROM pg_namespace WHERE nspname NOT IN ('pg_catalog', 'information_schema', 'public')
                AND nspname NOT LIKE 'pg_toast%%' AND nspname NOT LIKE 'pg_temp_%%')""".replace("%%", "%")
    ).fetchone()
    return int(row[0]) == 0


def database_exists(conn: psycopg.Connection, dbname: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone() is not None


def create_database(conn: psycopg.Connection, dbname: str) -> None:
    conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(dbname)))


def drop_database(conn: psycopg.Connection, dbname: str, *, force: bool = False) -> None:
    stmt = "DROP DATABASE IF EXISTS {} WITH (FORCE)" if force else "DROP DATABASE IF EXISTS {}"
    conn.execute(sql.SQL(stmt).format(sql.Identifier(dbname)))


#: Valid B-tree indexes of user relations, with what ``bt_index_check(heapallindexed)`` costs: with
#: heapallindexed the check scans the whole heap, so its time follows the table's tuple count
#: (``reltuples``, set by the index builds of a restore) far more than the index's own size.
AMCHECK_INDEXES_SQL = """
SELECT c.oid::regclass::text, greatest(t.reltuples, 0)::float8, pg_relation_size(t.oid), pg_relation_size(c.oid),
       t.oid, i.indisprimary, i.indisunique
FROM pg_index i
JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_class t ON t.oid = i.indrelid
JOIN pg_am a ON a.oid = c.relam JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE a.amname = 'btree' AND c.relkind = 'i' AND i.indisvalid AND c.relpersistence <> 't'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'
"""


@dataclass(frozen=True)
class Job:
    """One query of a parallel check: ``run(conn)`` returns a problem (or None); ``cost`` orders the queue."""

    cost: float
    name: str
    run: Callable[[psycopg.Connection], str | None]


def amcheck_available(conn: psycopg.Connection) -> bool:
    """Whether amcheck can be used here; creates the extension (in the connected database) when it can."""
    available = conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'amcheck'").fetchone()
    if available:
        conn.execute("CREATE EXTENSION IF NOT EXISTS amcheck")
    return bool(available)


#: ``heap_check`` of ``amcheck_jobs``: each table's heap against one of its indexes, or against every index
#: (``Settings.verify_heap_check``, BACKUP_VERIFY_HEAP_CHECK, validated there).
HeapCheck = Literal["one", "all"]


def amcheck_jobs(conn: psycopg.Connection, *, heap_check: HeapCheck = "one") -> list[Job]:
    """One ``bt_index_check`` job per valid B-tree index of user tables.

    Every index gets the structural check. ``heapallindexed`` (a scan of the whole heap, every tuple
    hashed and looked up in the index) is run, with ``heap_check="one"``, against one index per table:
    its primary key, else a unique index, else its smallest; that reads every row of the table once.
    With ``"all"``, against every index (a heap scan per index: about three times the check time on
    the trading schema). A dump holds no index data: restoring rebuilds every index from the rows, so the rows
    (and one complete index over them) are what a backup's verification has to prove; ``"all"`` also
    tests the verifier's own index builds.

    Call ``amcheck_available`` first. A failed check is a problem naming the index, not an exception.
    """
    rows = conn.execute(AMCHECK_INDEXES_SQL).fetchall()
    heap_checked: dict[int, str] = {}
    if heap_check == "one":
        # Preferred first: primary key, then unique, then the smallest index.
        for row in sorted(rows, key=lambda r: (not r[5], not r[6], int(r[3]))):
            heap_checked.setdefault(int(row[4]), str(row[0]))
    jobs = []
    for index, tuples, heap_bytes, index_bytes, table, _primary, _unique in rows:
        with_heap = heap_check == "all" or heap_checked.get(int(table)) == str(index)
        # Tuples dominate a heap check (hashing each into the Bloom filter); sizes break ties and cover a
        # table whose reltuples is unknown (-1, never vacuumed or indexed). A structural check reads the index.
        cost = float(tuples) + (int(heap_bytes) + int(index_bytes)) / 1024 if with_heap else int(index_bytes) / 1024
        jobs.append(Job(cost, f"amcheck {index}", partial(_check_index, index=str(index), heapallindexed=with_heap)))
    return jobs


def _check_index(conn: psycopg.Connection, *, index: str, heapallindexed: bool) -> str | None:
    try:
        conn.execute("SELECT bt_index_check(%s::regclass, %s)", (index, heapallindexed))
    except psycopg.Error as exc:
        return f"index {index}: {first_line(str(exc))}"
    return None


def amcheck_indexes(conn: psycopg.Connection, *, heap_check: HeapCheck = "one") -> tuple[int, list[str]]:
    """Run ``bt_index_check`` on every valid B-tree index of user tables; return (checked, problems).

    Returns (0, []) when the server has no amcheck extension available. One connection, in turn;
    ``run_parallel`` with ``amcheck_jobs`` spreads the same checks over several connections.
    """
    if not amcheck_available(conn):
        return 0, []
    jobs = amcheck_jobs(conn, heap_check=heap_check)
    problems = [p for p in (job.run(conn) for job in jobs) if p is not None]
    return len(jobs), problems


def count_jobs(conn: psycopg.Connection, into: dict[str, int]) -> list[Job]:
    """``count_rows`` as one job per table, each storing its count in ``into`` (for ``run_parallel``).

    The tables are counted in separate snapshots: only for a database nobody writes to (a restored copy).
    """
    jobs = []
    for schema, table, kind, heap_bytes in conn.execute(_SIZED_USER_TABLES_SQL.replace("%%", "%")).fetchall():
        key = qualified_name(schema, table)
        # A sequential scan costs far less per tuple than amcheck's hashing: sizes stay small next to it.
        jobs.append(Job(int(heap_bytes) / 65536, f"count {key}",
                        partial(_count_into, schema=schema, table=table, kind=kind, key=key, into=into)))
    return jobs


def _count_table(conn: psycopg.Connection, schema: str, table: str, kind: str) -> int:
    ident = sql.Identifier(schema, table)
    query = sql.SQL("SELECT count(*) FROM {}" if kind == "p" else "SELECT count(*) FROM ONLY {}")
    return int(conn.execute(query.format(ident)).fetchone()[0])


def _count_into(conn: psycopg.Connection, *, schema: str, table: str, kind: str, key: str,
                into: dict[str, int]) -> str | None:
    into[key] = _count_table(conn, schema, table, kind)  # one key per job: no two threads write the same
    return None


def run_parallel(conninfo: ConnInfo, jobs: list[Job], *, connections: int) -> list[str]:
    """Run ``jobs`` on up to ``connections`` connections at once, costliest first; return their problems.

    Longest-first on a shared queue keeps the connections busy until the end (no big job starting
    last while the others idle). The problems come back in the jobs' given order, whatever finished
    first. An exception of a job (not a problem it reports) stops the others and is raised.
    """
    order = sorted(range(len(jobs)), key=lambda i: jobs[i].cost, reverse=True)
    results: list[str | None] = [None] * len(jobs)
    lock = threading.Lock()
    failed: list[BaseException] = []

    def worker(conn: psycopg.Connection) -> None:
        while True:
            with lock:
                if not order or failed:
                    return
                i = order.pop(0)
            try:
                results[i] = jobs[i].run(conn)
            except BaseException as exc:  # handed to the caller's thread below
                with lock:
                    failed.append(exc)
                return

    conns: list[psycopg.Connection] = []
    try:
        for _ in range(max(1, min(connections, len(jobs)))):  # all opened before any job starts
            conns.append(connect(conninfo))
        # The caller's thread works on the first connection; threads on the others.
        threads = [threading.Thread(target=worker, args=(c,), name=f"check-{n}", daemon=True)
                   for n, c in enumerate(conns[1:], start=1)]
        for thread in threads:
            thread.start()
        worker(conns[0])
        for thread in threads:
            thread.join()
    finally:
        for c in conns:
            c.close()
    if failed:
        raise failed[0]
    return [p for p in results if p is not None]
