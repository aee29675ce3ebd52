"""Watching a PostgreSQL server while a command runs, for tests that act at chosen moments.

``Server`` polls the database list and ``pg_stat_activity`` for a moment (a staging database appears,
a statement runs or waits on a lock); ``held`` holds a database's lock so that its RENAME or DROP
waits inside the statement until the test lets go; ``fingerprint`` compares databases by content.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql

from backup_tasks.conninfo import ConnInfo
from backup_tasks.logical.swap import MARKER_PREFIX, RUN_LOCK_CLASS
from backup_tasks.postgres.connect import connect
from tests.support.processes import wait_until

Fingerprint = dict[str, tuple[int, str]]


def fingerprint(db: ConnInfo) -> Fingerprint:
    """Every user table's row count and the md5 of all its rows, in a stable order."""
    with connect(db) as conn:
        tables = conn.execute("SELECT n.nspname, c.relname FROM pg_class c "
                              "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r' "
                              "AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
                              "AND n.nspname NOT LIKE 'pg_toast%' ORDER BY 1, 2").fetchall()
        found: Fingerprint = {}
        for schema, table in tables:
            query = sql.SQL("SELECT count(*), md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t::text), '')) "
                            "FROM {} t").format(sql.Identifier(schema, table))
            count, digest = conn.execute(query).fetchone()
            found[f"{schema}.{table}"] = (int(count), str(digest))
    return found


def databases_like(admin: ConnInfo, target: ConnInfo) -> list[str]:
    with connect(admin) as conn:
        rows = conn.execute("SELECT datname FROM pg_database WHERE starts_with(datname, %s) ORDER BY 1",
                            (target.dbname[:40],)).fetchall()
    return [r[0] for r in rows]


def drop_all_like(admin: ConnInfo, target: ConnInfo) -> None:
    with connect(admin) as conn:
        for name in databases_like(admin, target):
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def moment_or_exit(check: Callable[[], Any], proc: subprocess.Popen[bytes], *, timeout: float = 60) -> Any:
    """Poll ``check`` every few ms until it returns something truthy; None if ``proc`` ended first."""
    ended = object()
    found = wait_until(lambda: check() or (ended if proc.poll() is not None else None), timeout=timeout,
                       interval=0.003, what="the moment")
    return None if found is ended else found


def poll(check: Callable[[], Any], *, timeout: float = 60) -> Any:
    """Poll ``check`` every few ms until it returns something truthy."""
    return wait_until(check, timeout=timeout, interval=0.003, what="the moment")


class Server:
    """One polling connection to the server under test."""

    def __init__(self, admin: ConnInfo) -> None:
        self.conn = connect(admin)

    def staging_of(self, target: str) -> str | None:
        """The staging database of a restore into ``target``, once it exists."""
        row = self.conn.execute("SELECT datname FROM pg_database WHERE starts_with(datname, %s)",
                                (f"{target[:40]}__restoring_",)).fetchone()
        return str(row[0]) if row else None

    def staging_in_use(self, target: str) -> str | None:
        """The staging database once it is marked or pg_restore writes into it (a lock taken then blocks no setup)."""
        row = self.conn.execute(
            "SELECT datname FROM pg_database d WHERE starts_with(datname, %s) "
            "AND (starts_with(shobj_description(oid, 'pg_database'), %s) OR EXISTS (SELECT 1 FROM pg_stat_activity a "
            "WHERE a.datname = d.datname))",
            (f"{target[:40]}__restoring_", MARKER_PREFIX)).fetchone()
        return str(row[0]) if row else None

    def aside_of(self, target: str) -> str:
        """The old target's name once it is renamed aside."""
        row = self.conn.execute("SELECT datname FROM pg_database WHERE starts_with(datname, %s)",
                                (f"{target[:40]}__replaced_",)).fetchone()
        assert row, f"{target} was not renamed aside"
        return str(row[0])

    def exists(self, name: str) -> bool:
        return self.conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None

    def oid(self, name: str) -> int | None:
        row = self.conn.execute("SELECT oid::bigint FROM pg_database WHERE datname = %s", (name,)).fetchone()
        return int(row[0]) if row else None

    def sessions(self, *, like: str, datname: str | None = None, waiting: bool = False) -> list[int]:
        """pids of sessions whose current statement starts with ``like`` (``%`` patterns allowed)."""
        rows = self.conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE query LIKE %s AND (%s::text IS NULL OR datname = %s) "
            "AND (NOT %s OR (state = 'active' AND wait_event_type = 'Lock')) AND pid <> pg_backend_pid()",
            (like, datname, datname, waiting)).fetchall()
        return [int(r[0]) for r in rows]

    def alive(self, pid: int) -> bool:
        return self.conn.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone() is not None

    def run_alive(self, staging: str) -> bool:
        """Whether the run that owns ``staging`` still holds its advisory lock (its process lives)."""
        run = int(staging.rsplit("_", 1)[1], 16)
        return self.conn.execute("SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND classid = %s AND objid = %s "
                                 "AND objsubid = 2", (RUN_LOCK_CLASS, run)).fetchone() is not None

    def close(self) -> None:
        self.conn.close()


@contextmanager
def held(admin: ConnInfo, dbname: str) -> Iterator[None]:
    """A lock on database ``dbname`` (a COMMENT in an open transaction): its RENAME or DROP waits for the block."""
    conn = psycopg.connect(**admin.kwargs())
    try:
        conn.execute(sql.SQL("COMMENT ON DATABASE {} IS 'held by a test'").format(sql.Identifier(dbname)))
        yield
    finally:
        conn.rollback()
        conn.close()


def rename_statement(name: str) -> str:
    return f'ALTER DATABASE "{name}" RENAME%'
