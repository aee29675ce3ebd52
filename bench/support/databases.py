"""The benchmarks' generated databases on the local server: ``bt_bench_<MB>``, made once and reused.

A database is generated with ``backup_tasks.postgres.sampledata`` and ``VACUUM (FREEZE, ANALYZE)``,
then reused while its ``pg_database_size`` is within 10% of the request. The bench only ever drops
a database it created: those carry a comment saying so (``DB_MARKER``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
from psycopg import sql

from backup_tasks.conninfo import ConnInfo
from backup_tasks.postgres import sampledata
from backup_tasks.postgres.connect import connect
from support import MIB

#: The local server's maintenance database, where the bench runs unless told otherwise.
SERVER_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DB_PREFIX = "bt_bench_"
#: Written on every database the bench generates; only databases carrying it are ever dropped.
DB_MARKER = "backup-tasks benchmark data"
SIZE_TOLERANCE = 0.10


@dataclass
class BenchDatabase:
    name: str
    requested_mb: int
    size_bytes: int
    generated: bool
    generate_seconds: float | None
    rows: dict[str, int]


def database_url(server: ConnInfo, dbname: str) -> str:
    """``postgresql://user@host:port/dbname`` on ``server`` (no password: the bench's server trusts it)."""
    return server.with_dbname(dbname).redacted()


def exists(admin: psycopg.Connection, name: str) -> bool:
    return admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


def database_size(admin: psycopg.Connection, name: str) -> int | None:
    row = admin.execute("SELECT pg_database_size(%s)", (name,)).fetchone() if exists(admin, name) else None
    return int(row[0]) if row else None


def is_ours(admin: psycopg.Connection, name: str) -> bool:
    row = admin.execute("SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
                        (name,)).fetchone()
    return bool(row and row[0] and str(row[0]).startswith(DB_MARKER))


def mark_as_ours(admin: psycopg.Connection, name: str, what: str) -> None:
    admin.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(name),
                                                                 sql.Literal(f"{DB_MARKER} ({what})")))


def drop_bench_database(admin: psycopg.Connection, name: str) -> None:
    """Drop ``name`` only if the bench made it (it carries ``DB_MARKER``)."""
    if not exists(admin, name):
        return
    if not is_ours(admin, name):
        raise SystemExit(f"refusing to drop {name}: it was not created by this benchmark")
    admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def row_counts(conninfo: ConnInfo) -> dict[str, int]:
    with connect(conninfo) as conn:
        rows = conn.execute("SELECT relname, n_live_tup FROM pg_stat_user_tables ORDER BY relname").fetchall()
    return {str(name): int(count) for name, count in rows}


def ensure_database(admin: psycopg.Connection, server: ConnInfo, size_mb: int, *, regenerate: bool = False,
                    say: Callable[[str], None] = print) -> BenchDatabase:
    """``bt_bench_<MB>`` with about ``size_mb`` of trading data: reused when its size fits, else (re)made."""
    name = f"{DB_PREFIX}{size_mb}"
    existing = database_size(admin, name)
    fits = existing is not None and abs(existing / MIB - size_mb) <= SIZE_TOLERANCE * size_mb
    if existing is not None and fits and not regenerate and is_ours(admin, name):
        say(f"reusing {name} ({existing / MIB:.0f} MiB)")
        return BenchDatabase(name, size_mb, existing, False, None, row_counts(server.with_dbname(name)))
    if existing is not None:
        if not is_ours(admin, name):
            raise SystemExit(f"{name} exists but was not created by this benchmark; drop or rename it yourself")
        say(f"dropping {name} ({existing / MIB:.0f} MiB, wanted {size_mb} MiB)")
        drop_bench_database(admin, name)
    say(f"generating {name}: about {size_mb} MiB of trading data (sampledata.generate)")
    admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
    mark_as_ours(admin, name, f"{size_mb} MiB")
    started = time.monotonic()
    sampledata.generate(server.with_dbname(name), size_mb=size_mb)
    with connect(server.with_dbname(name)) as conn:
        # A settled database, as production is after autovacuum: hint bits set, visibility map
        # current, so no run pays for the first reader's clean-up.
        conn.execute("VACUUM (FREEZE, ANALYZE)")
    took = time.monotonic() - started
    size = database_size(admin, name) or 0
    say(f"generated {name}: {size / MIB:.0f} MiB in {took:.0f}s")
    if abs(size / MIB - size_mb) > SIZE_TOLERANCE * size_mb:
        say(f"warning: {name} is {size / MIB:.0f} MiB, not ~{size_mb}: adjust sampledata.BYTES_PER_SIGNAL")
    return BenchDatabase(name, size_mb, size, True, round(took, 1), row_counts(server.with_dbname(name)))
