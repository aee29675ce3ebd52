"""Queries on a connected server: user tables and exact row counts, exported snapshots, databases, amcheck."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql

from backup_tasks.conninfo import ConnInfo
from backup_tasks.postgres.connect import connect
from backup_tasks.postgres.failures import first_line

#: Ordinary (incl. unlogged) and partitioned tables of the user's schemas, excluding tables that
#: belong to an extension (pg_dump does not dump their rows unless configured, so we cannot compare).
USER_TABLES_SQL = """
SELECT n.nspname, c.relname, c.relkind
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p')
  AND c.relpersistence <> 't'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%%' AND n.nspname NOT LIKE 'pg\\_temp\\_%%'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                  AND d.objid = c.oid AND d.deptype = 'e')
ORDER BY n.nspname, c.relname
"""


def qualified_name(schema: str, table: str) -> str:
    """The manifest key of a table: ``schema.table``, each part quoted only when it must be."""
    return f"{_quote_if_needed(schema)}.{_quote_if_needed(table)}"


def _quote_if_needed(ident: str) -> str:
    if re.fullmatch(r"[a-z_][a-z0-9_$]*", ident):
        return ident
    return '"' + ident.replace('"', '""') + '"'


def list_tables(conn: psycopg.Connection) -> list[tuple[str, str, str]]:
    return [(r[0], r[1], r[2]) for r in conn.execute(USER_TABLES_SQL.replace("%%", "%")).fetchall()]


def count_rows(conn: psycopg.Connection) -> dict[str, int]:
    """Exact row count of every user table, in the connection's current snapshot.

    A partitioned parent counts all its partitions' rows (``count(*)`` on the parent); each leaf is
    counted on its own with ``ONLY`` so inheritance children are not counted twice.
    """
    counts: dict[str, int] = {}
    for schema, table, kind in list_tables(conn):
        ident = sql.Identifier(schema, table)
        query = sql.SQL("SELECT count(*) FROM {}" if kind == "p" else "SELECT count(*) FROM ONLY {}")
        counts[qualified_name(schema, table)] = int(conn.execute(query.format(ident)).fetchone()[0])
    return counts


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


def amcheck_indexes(conn: psycopg.Connection) -> tuple[int, list[str]]:
    """Run ``bt_index_check`` on every valid B-tree index of user tables; return (checked, problems).

    Returns (0, []) when the server has no amcheck extension available.
    """
    available = conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'amcheck'").fetchone()
    if not available:
        return 0, []
    conn.execute("CREATE EXTENSION IF NOT EXISTS amcheck")
    rows = conn.execute(
        """SELECT c.oid::regclass::text FROM pg_index i
           JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam
           JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE a.amname = 'btree' AND c.relkind = 'i' AND i.indisvalid AND c.relpersistence <> 't'
             AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'"""
    ).fetchall()
    problems: list[str] = []
    for (index,) in rows:
        try:
            conn.execute("SELECT bt_index_check(%s::regclass, true)", (index,))
        except psycopg.Error as exc:
            problems.append(f"index {index}: {first_line(str(exc))}")
    return len(rows), problems
