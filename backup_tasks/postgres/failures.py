"""The one classifier of PostgreSQL failures: libpq connection errors and the stderr of pg_dump & co.

Every path that talks to a server (connect, pg_dump, pg_basebackup, pg_restore) turns what went wrong
into the same error types, so a missing role is ``AuthenticationFailed`` and an unknown host a
``ConfigError`` whichever tool met it, and Celery retries only what a retry can fix.
"""

from __future__ import annotations

import psycopg

from backup_tasks.conninfo import ConnInfo
from backup_tasks.errors import AuthenticationFailed, ConfigError, DatabaseMissing, SourceUnavailable


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
