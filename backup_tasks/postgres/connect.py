"""Connections to PostgreSQL, with failures classified (``failures.classify``) and the password kept out of messages."""

from __future__ import annotations

import psycopg

from backup_tasks.conninfo import ConnInfo
from backup_tasks.errors import ConfigError
from backup_tasks.postgres.failures import classify


def connect(conninfo: ConnInfo, *, autocommit: bool = True) -> psycopg.Connection:
    try:
        return psycopg.connect(**conninfo.kwargs(), autocommit=autocommit)
    except psycopg.OperationalError as exc:
        raise classify(str(exc), conninfo) from None
    except psycopg.ProgrammingError as exc:  # libpq rejected the options themselves (?foo=bar)
        raise classify(str(exc), conninfo, fallback=ConfigError) from None


def server_version(conn: psycopg.Connection) -> str:
    return str(conn.execute("SHOW server_version").fetchone()[0]).split()[0]


def server_major(conn: psycopg.Connection) -> int:
    return int(conn.info.server_version) // 10000
