"""What the server says about its WAL: ``pg_stat_archiver`` (one query) and the segment it is writing.

``archiver_stats`` is the one query of ``pg_stat_archiver``, on a connection the caller already has
(``check`` after its segment switch, ``snapshot`` before it starts). ``read_server_wal`` is the one
short reading the health check and the exporter both take (``observe.facts``): its own connection,
``SERVER_TIMEOUT`` for the connect and for every statement, the timeline and current segment, and
the archiver row; a server that does not answer is an answer (``ServerWal.error``), not a crash.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from backup_tasks.conninfo import ConnInfo
from backup_tasks.errors import BackupError
from backup_tasks.postgres.connect import connect
from backup_tasks.postgres.failures import first_line

#: Seconds to wait for the server (the connect, then each statement): a scrape or a health check must not
#: hang on a down database (unless DATABASE_URL sets its own connect_timeout).
SERVER_TIMEOUT = 3

#: pg_stat_archiver with its times in UTC ISO 8601, and whether archive_command is failing now (its last failure
#: newer than its last success), decided by the server on timestamps, not on text in the session's TimeZone.
_ARCHIVER_SQL = """
SELECT archived_count, last_archived_wal,
       to_char(last_archived_time AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
       failed_count, last_failed_wal,
       to_char(last_failed_time AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
       coalesce(last_failed_time > last_archived_time, last_failed_time IS NOT NULL)
FROM pg_stat_archiver
"""
#: The text form of the times above, for messages that quote them as the server gave them.
UTC_TEXT = "%Y-%m-%dT%H:%M:%S.%fZ"

#: The segment being written (none on a standby, which cannot say) and, on a standby, the timeline it replays
#: (its latest checkpoint's; a primary's is the first 8 hex digits of its current segment's name).
_POSITION_SQL = """
SELECT CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_walfile_name(pg_current_wal_lsn()) END,
       CASE WHEN pg_is_in_recovery() THEN (pg_control_checkpoint()).timeline_id END
"""


def archiver_stats(conn: psycopg.Connection) -> dict[str, Any]:
    """``pg_stat_archiver``: counts, last archived and failed file and time (UTC ISO 8601), and ``failing``."""
    row = conn.execute(_ARCHIVER_SQL).fetchone()
    keys = ("archived_count", "last_archived_wal", "last_archived_time", "failed_count", "last_failed_wal",
            "last_failed_time", "failing")
    return dict(zip(keys, row, strict=True)) if row else {}


@dataclass(frozen=True)
class ArchiverStats:
    """The server's ``pg_stat_archiver`` row, typed."""

    archived_count: int
    last_archived_wal: str | None
    last_archived_at: datetime | None
    failed_count: int
    last_failed_wal: str | None
    last_failed_at: datetime | None
    failing: bool  # the last failure is newer than the last success (decided by the server: ``archiver_stats``)

    @classmethod
    def of(cls, stats: dict[str, Any]) -> ArchiverStats:
        """From ``archiver_stats``."""
        return cls(archived_count=int(stats.get("archived_count") or 0),
                   last_archived_wal=stats.get("last_archived_wal"),
                   last_archived_at=_utc(stats.get("last_archived_time")),
                   failed_count=int(stats.get("failed_count") or 0), last_failed_wal=stats.get("last_failed_wal"),
                   last_failed_at=_utc(stats.get("last_failed_time")), failing=bool(stats.get("failing")))


def _utc(text: object) -> datetime | None:
    """A time of ``archiver_stats`` (``2026-11-30T11:20:01.123000Z``) as an aware datetime."""
    return datetime.fromisoformat(str(text)) if text else None


@dataclass(frozen=True)
class ServerWal:
    """What the server says about its WAL, or why it said nothing (``error``: then nothing else is known)."""

    label: str  # host:port, for messages
    timeline: int | None = None
    current_segment: str | None = None  # being written (None on a standby)
    archiver: ArchiverStats | None = None
    error: str | None = None


def read_server_wal(conninfo: ConnInfo) -> ServerWal:
    """The server's timeline, current segment and archiver row, within ``SERVER_TIMEOUT`` per step."""
    label = conninfo.server_label
    try:
        with connect(conninfo.with_connect_timeout(SERVER_TIMEOUT)) as conn:
            conn.execute(f"SET statement_timeout = '{SERVER_TIMEOUT}s'")
            current, standby_timeline = conn.execute(_POSITION_SQL).fetchone()
            stats = archiver_stats(conn)
    except BackupError as exc:  # connect's classified failure: it names the server already
        return ServerWal(label, error=str(exc))
    except psycopg.Error as exc:
        return ServerWal(label, error=f"{label}: {first_line(str(exc))}")
    timeline = int(standby_timeline) if current is None else int(str(current)[:8], 16)
    return ServerWal(label, timeline=timeline, current_segment=None if current is None else str(current),
                     archiver=ArchiverStats.of(stats))
