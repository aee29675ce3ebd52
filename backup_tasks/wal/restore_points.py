"""Named restore points: created on the server (``pg_create_restore_point``) and recorded in the archive.

The post-close workflow marks the end of each trading day (``trading-day-D-close``); snapshot
verification recovers to such a point and compares with that day's dump. Each record is written to the
local archive and to its copy (``<BACKUP_COPY_TO>/wal/restore_points/``), so ``restore-pitr
--target-name`` from the bucket alone finds the point's segment and time as it does locally.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime

import psycopg

from backup_tasks.clock import utcnow
from backup_tasks.errors import ConfigError, RestoreRefused, StorageError
from backup_tasks.postgres.connect import connect
from backup_tasks.postgres.failures import first_line
from backup_tasks.settings import Settings
from backup_tasks.wal.archive import WalArchive
from backup_tasks.wal.layout import RESTORE_POINT_DIR
from backup_tasks.wal.names import position, timeline_of


@dataclass(frozen=True)
class RestorePoint:
    name: str
    lsn: str
    timeline: int
    segment: str
    created_at: str  # ISO 8601 with microseconds, UTC
    system_identifier: str | None = None
    trading_day: str | None = None

    @property
    def created(self) -> datetime:
        return datetime.fromisoformat(self.created_at)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:80] or "_"


def restore_point_key(point: RestorePoint) -> str:
    return f"{RESTORE_POINT_DIR}/{point.segment}-{_safe(point.name)}.json"


def save_restore_point(archive: WalArchive, point: RestorePoint) -> str:
    """Record a restore point in the archive (fsynced, mode 0640 like the WAL it refers to), then in its copy;
    its key."""
    key = restore_point_key(point)
    archive.put_record(key, json.dumps(asdict(point), indent=2).encode())
    return key


def _documents(archive: WalArchive) -> Iterator[bytes]:
    """The stored restore point records (unreadable ones skipped): where the archive lists them cheapest
    (a directory's listing; a bucket's one listing of the whole archive, no extra request)."""
    for key in archive.contents.keys(f"{RESTORE_POINT_DIR}/"):
        if key.endswith(".json"):
            with contextlib.suppress(StorageError):
                yield archive.primary.read_bytes(key)


def restore_points(archive: WalArchive) -> list[RestorePoint]:
    """Every recorded restore point, oldest first (unreadable records skipped)."""
    found = []
    for document in _documents(archive):
        try:
            data = json.loads(document)
            found.append(RestorePoint(**{k: data.get(k) for k in RestorePoint.__dataclass_fields__}))
        except (ValueError, TypeError):
            continue
    return sorted(found, key=lambda p: (position(p.segment), p.created_at))


def delete_restore_point(archive: WalArchive, point: RestorePoint) -> None:
    """Remove a record from the copy, then the archive (prune, with the WAL it points into): a copy that refuses
    (``ObjectLocked``) leaves the local record listed for the next prune."""
    archive.delete_record(restore_point_key(point))


log = logging.getLogger(__name__)


def create_restore_point(settings: Settings, name: str, *, trading_day: str | None = None,
                         switch_wal: bool = True) -> RestorePoint:
    """``pg_create_restore_point(name)`` on the server, recorded in the archive; the WAL is switched so the
    point reaches the archive now rather than at the next archive_timeout."""
    if not name or len(name.encode()) > 63:
        raise ConfigError(f"a restore point name must be 1 to 63 bytes long, got {name!r}")
    archive = WalArchive.for_settings(settings)
    with connect(settings.source()) as conn:
        if conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
            raise RestoreRefused("the server is a standby: create restore points on the primary")
        level = conn.execute("SELECT current_setting('wal_level')").fetchone()[0]
        if level == "minimal":
            raise ConfigError("wal_level is minimal: restore points need wal_level = replica")
        try:
            lsn = str(conn.execute("SELECT pg_create_restore_point(%s)", (name,)).fetchone()[0])
        except psycopg.Error as exc:
            raise RestoreRefused(f"pg_create_restore_point failed: {first_line(str(exc))} (needs superuser or "
                                 f"GRANT EXECUTE ON FUNCTION pg_create_restore_point)") from None
        created = utcnow()
        row = conn.execute("SELECT timeline_id FROM pg_control_checkpoint()").fetchone()
        timeline = int(row[0])
        segment = str(conn.execute("SELECT pg_walfile_name(%s::pg_lsn + 1)", (lsn,)).fetchone()[0])
        sysid = str(conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()[0])
        if switch_wal:
            conn.execute("SELECT pg_switch_wal()")
    point = RestorePoint(name=name, lsn=lsn, timeline=timeline_of(segment) or timeline, segment=segment,
                         created_at=created.isoformat(timespec="microseconds"), system_identifier=sysid,
                         trading_day=trading_day)
    try:
        archive.ensure()
        save_restore_point(archive, point)
    except (OSError, StorageError) as exc:  # the point is in the WAL: PostgreSQL finds it by name without us
        log.warning("restore point %s created at %s but not recorded in %s: %s", name, lsn, archive.location, exc)
    return point


def restore_point_for_day(settings: Settings, trading_day: str) -> RestorePoint | None:
    """The post-close hook's "end of trading day N" mark; None (nothing done) when the server does not archive
    WAL, i.e. point-in-time recovery is not configured."""
    with connect(settings.source()) as conn:
        mode = conn.execute("SELECT current_setting('archive_mode')").fetchone()[0]
        level = conn.execute("SELECT current_setting('wal_level')").fetchone()[0]
    if mode == "off" or level == "minimal":
        return None
    return create_restore_point(settings, restore_point_name(trading_day), trading_day=trading_day)


def restore_point_name(trading_day: str) -> str:
    """The name the post-close workflow gives the end of a trading day."""
    return f"trading-day-{trading_day}-close"
