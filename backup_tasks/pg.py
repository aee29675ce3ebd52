"""Talking to PostgreSQL: connections with classified errors, tool discovery, snapshots, row counts.

The password only ever travels in psycopg's connect arguments or in the ``PGPASSWORD`` environment
of a child process: never on a command line, never in a message.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import psycopg
from psycopg import sql

from .errors import AuthenticationFailed, ConfigError, DatabaseMissing, SourceUnavailable, ToolMissing
from .settings import ConnInfo

PG_LIB_ROOT = Path("/usr/lib/postgresql")


def classify_connect_error(exc: psycopg.Error, conninfo: ConnInfo) -> Exception:
    """Turn a libpq connection failure into the error type a user (and Celery) can act on."""
    text = str(exc)
    where = conninfo.redacted()
    if "password authentication failed" in text or "no password supplied" in text \
            or "authentication failed" in text or ("role" in text and "does not exist" in text):
        return AuthenticationFailed(f"authentication failed for {where}: check the user and password "
                                    f"in the URL (or ~/.pgpass)")
    if "database" in text and "does not exist" in text:
        return DatabaseMissing(f"database {conninfo.dbname!r} does not exist on {conninfo.server_label}")
    if "could not translate host name" in text or "Name or service not known" in text:
        return ConfigError(f"unknown host in {where}: {first_line(text)}")
    if "invalid" in text and ("value" in text or "connection option" in text or "integer" in text):
        return ConfigError(f"bad connection setting in {where}: {first_line(text)}")
    return SourceUnavailable(f"cannot reach PostgreSQL at {where}: {first_line(text)}")


def first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else text.strip()


def connect(conninfo: ConnInfo, *, autocommit: bool = True) -> psycopg.Connection:
    try:
        return psycopg.connect(**conninfo.kwargs(), autocommit=autocommit)
    except psycopg.OperationalError as exc:
        raise classify_connect_error(exc, conninfo) from None
    except psycopg.ProgrammingError as exc:  # libpq rejected the options themselves (?foo=bar)
        raise ConfigError(f"bad connection setting in {conninfo.redacted()}: {first_line(str(exc))}") from None


def server_version(conn: psycopg.Connection) -> str:
    return str(conn.execute("SHOW server_version").fetchone()[0]).split()[0]


def server_major(conn: psycopg.Connection) -> int:
    return int(conn.info.server_version) // 10000


# --- client tool discovery --------------------------------------------------------------------

@dataclass(frozen=True)
class Tool:
    path: Path
    major: int


def _major_of(binary: Path) -> int:
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"(\d+)(?:\.\d+)?", out)
    return int(match[1]) if match else 0


def find_tool(name: str, *, min_major: int = 0, bin_dir: Path | None = None) -> Tool:
    """Locate a PostgreSQL client binary no older than the server (pg_dump refuses newer servers).

    Order: ``PG_BIN_DIR`` when set; the newest ``/usr/lib/postgresql/N/bin`` (Debian keeps several
    majors side by side there); then ``PATH``.
    """
    candidates: list[Path] = []
    if bin_dir is not None:
        candidates.append(bin_dir / name)
    if PG_LIB_ROOT.is_dir():
        versions = sorted((p for p in PG_LIB_ROOT.iterdir() if p.name.isdigit()), key=lambda p: -int(p.name))
        candidates.extend(v / "bin" / name for v in versions)
    on_path = shutil.which(name)
    if on_path:
        candidates.append(Path(on_path))
    seen: list[str] = []
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            major = _major_of(candidate)
            if major >= min_major:
                return Tool(candidate, major)
            seen.append(f"{candidate} ({major})")
    if seen:
        raise ToolMissing(f"{name} {min_major} or newer is needed for this server; found only "
                          f"{', '.join(seen)}. Install postgresql-client-{min_major} or set PG_BIN_DIR")
    raise ToolMissing(f"{name} not found (looked in PG_BIN_DIR, {PG_LIB_ROOT}/*/bin and PATH); "
                      f"install the PostgreSQL client tools (e.g. apt-get install postgresql-client) or set PG_BIN_DIR")


class StderrTail:
    """Drain a child's stderr on a thread, keeping only its last ``keep`` lines (memory stays flat).

    ``consume`` may take a line instead (return True), e.g. to count pg_dump's progress lines.
    """

    def __init__(self, stream: IO[bytes], *, name: str, keep: int = 50,
                 consume: Callable[[str], bool] | None = None) -> None:
        self.lines: list[str] = []
        self._stream, self._keep, self._consume = stream, keep, consume
        self._thread = threading.Thread(target=self._drain, name=f"{name}-stderr", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        for raw in self._stream:
            line = raw.decode(errors="replace").rstrip()
            if line and not (self._consume and self._consume(line)):
                self.lines.append(line)
                del self.lines[:-self._keep]

    def join(self) -> str:
        """Wait for the stream to end; the kept tail as one text."""
        self._thread.join()
        return "\n".join(self.lines)


def tool_env(conninfo: ConnInfo) -> dict[str, str]:
    """A child environment for libpq tools: ours minus any PG* variable, plus this target's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(conninfo.libpq_env())
    env.setdefault("PGCONNECT_TIMEOUT", "10")
    return env


# --- catalog queries --------------------------------------------------------------------------

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
