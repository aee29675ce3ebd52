"""WAL acknowledged without being stored: the opt-in bound that protects the primary (``--drop-after``).

When neither the local archive nor the copy can take a file, ``wal-push`` fails and PostgreSQL keeps
the file in ``pg_wal`` and retries it, archiving nothing after it: an archive disk that stays full
while the bucket is down fills the server's disk next and stops the database. With ``--drop-after
BYTES`` (``BACKUP_WAL_DROP_AFTER_BYTES``), once the WAL waiting in ``pg_wal`` (every file the server
marked ``.ready``) is more than that, ``wal-push`` acknowledges the file without storing it, as
pgBackRest's ``archive-push-queue-max`` does: the server lives on, and no recovery can cross the
dropped range until a snapshot taken after it. Off by default, and loud:

- the server log: one ERROR line per dropped file, naming it and why;
- a durable record, ``<archive>/.dropped/<name>`` (JSON: the file, when, the bytes waiting, the
  bound, the failure). When the archive cannot take even that, it goes to
  ``<data directory>/backup-tasks-dropped/<name>`` (beside ``pg_wal``, which the server is writing
  anyway), and the next ``wal-push`` that stores a file in the archive moves it there (``adopt``);
- ``health`` fails naming the range until a snapshot starting after it exists (``unresolved``), the
  metric ``backup_tasks_wal_dropped_segments`` counts those files, and the worker's ``wal_ship`` task
  reports each new range to Sentry once (``reported`` in the record).

Part of the per-segment fast path: the standard library and ``storage.files`` only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from backup_tasks.storage.files import WAL_MODES, make_dirs, write_atomically
from backup_tasks.wal.names import SEGMENT_RE, segment_number, timeline_of

log = logging.getLogger(__name__)

DROPPED_DIR = ".dropped"
#: Beside ``pg_wal``, in the data directory: where a record goes when the archive cannot take it.
FALLBACK_DIR = "backup-tasks-dropped"
RECORD_VERSION = 1


@dataclass(frozen=True)
class Dropped:
    """One WAL file acknowledged without being stored."""

    name: str
    dropped_at: float  # unix time
    waiting_bytes: int  # WAL waiting in pg_wal when it was dropped
    drop_after: int  # the bound it exceeded
    size: int  # the file's size (a segment's: the cluster's segment size)
    reason: str  # why neither location took it
    reported: bool = False  # reported to Sentry by the worker's wal_ship task


def waiting_bytes(pg_wal: Path) -> int:
    """The size of every file ``pg_wal`` holds that the server has marked ``.ready`` (waiting to be archived)."""
    total = 0
    try:
        entries = os.listdir(pg_wal / "archive_status")
    except OSError:
        return 0
    for entry in entries:
        if entry.endswith(".ready"):
            with contextlib.suppress(OSError):
                total += os.stat(pg_wal / entry[:-len(".ready")]).st_size
    return total


def drop_if_over(archive_root: Path | None, source: Path, failure: Exception, drop_after: int) -> Dropped | None:
    """``source`` dropped (recorded, logged) when the WAL waiting in its ``pg_wal`` exceeds ``drop_after``; else None.

    ``failure``: why neither location took it. Never raises: a record that cannot be written anywhere
    is said in the server log, and the file is dropped all the same (the bound is what the operator chose).
    """
    waiting = waiting_bytes(source.parent)
    if waiting <= drop_after:
        return None
    try:
        size = os.stat(source).st_size
    except OSError:
        size = 0
    record = Dropped(source.name, time.time(), waiting, drop_after, size, str(failure))
    where = _write_somewhere(record, [archive_root / DROPPED_DIR if archive_root else None,
                                      source.parent.parent / FALLBACK_DIR])
    log.error("backup-tasks wal-push: ERROR: %s DROPPED, acknowledged WITHOUT being stored: pg_wal holds %d bytes "
              "waiting to be archived, more than --drop-after %d, and neither the archive nor the copy takes it "
              "(%s). Point-in-time recovery cannot cross it: fix the archive, then take a snapshot "
              "(`backup-tasks snapshot`). Recorded in %s", source.name, waiting, drop_after, failure,
              where or "NOWHERE (no location accepted the record)")
    return record


def _write_somewhere(record: Dropped, directories: list[Path | None]) -> Path | None:
    content = json.dumps({"v": RECORD_VERSION, **asdict(record)}).encode()
    for directory in directories:
        if directory is None:
            continue
        if not directory.parent.is_dir():
            continue  # an archive that is not there (unmounted?): never create it here
        try:
            make_dirs(directory, WAL_MODES.directory, inside=directory.parent)
            write_atomically(directory / record.name, content, mode=WAL_MODES.file, fsync=True)
            return directory / record.name
        except OSError:
            continue
    return None


def read(root: Path | None) -> list[Dropped]:
    """The records in the archive at ``root``, in WAL order (a damaged one is skipped)."""
    if root is None:
        return []
    directory = Path(root) / DROPPED_DIR
    try:
        entries = sorted(os.listdir(directory))
    except OSError:
        return []
    found = []
    for entry in entries:
        if entry.startswith("."):
            continue
        record = _load(directory / entry)
        if record is not None:
            found.append(record)
    return found


def _load(path: Path) -> Dropped | None:
    try:
        content = json.loads(path.read_bytes())
        if content.pop("v") != RECORD_VERSION:
            return None
        return Dropped(**content)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def unresolved(records: list[Dropped], snapshot_start: str | None) -> list[Dropped]:
    """The records recovery still cannot cross: those at or after ``snapshot_start`` (the WAL start segment of the
    newest restorable snapshot; None: no snapshot) are resolved only by a snapshot that starts after them."""
    return [r for r in records if snapshot_start is None or r.name[:24] >= snapshot_start]


def ranges(records: list[Dropped]) -> list[tuple[str, str, int]]:
    """``records`` as runs of consecutive segments, ``(first, last, files)`` in WAL order (other files alone)."""
    runs: list[tuple[str, str, int]] = []
    previous: Dropped | None = None
    for record in records:
        if runs and previous is not None and _follows(previous, record):
            first, _, count = runs[-1]
            runs[-1] = (first, record.name, count + 1)
        else:
            runs.append((record.name, record.name, 1))
        previous = record
    return runs


def _follows(earlier: Dropped, later: Dropped) -> bool:
    if not (SEGMENT_RE.match(earlier.name) and SEGMENT_RE.match(later.name)) or not earlier.size:
        return False
    return timeline_of(earlier.name) == timeline_of(later.name) and \
        segment_number(later.name, earlier.size) == segment_number(earlier.name, earlier.size) + 1


def describe(run: tuple[str, str, int]) -> str:
    first, last, count = run
    return first if count == 1 else f"{first} to {last} ({count} files)"


def mark_reported(root: Path, names: list[str]) -> None:
    """Note that these records were reported (the worker's Sentry event): not reported again."""
    directory = Path(root) / DROPPED_DIR
    for name in names:
        record = _load(directory / name)
        if record is not None and not record.reported:
            content = json.dumps({"v": RECORD_VERSION, **asdict(replace(record, reported=True))}).encode()
            with contextlib.suppress(OSError):
                write_atomically(directory / name, content, mode=WAL_MODES.file)


def adopt(root: Path, pg_wal: Path) -> None:
    """Move records written beside ``pg_wal`` (the archive could not take them) into the archive. Never raises.

    One failed ``stat`` per push when there are none.
    """
    fallback = pg_wal.parent / FALLBACK_DIR
    try:
        entries = os.listdir(fallback)
    except OSError:
        return
    target = Path(root) / DROPPED_DIR
    for entry in entries:
        if entry.startswith("."):
            continue
        try:
            make_dirs(target, WAL_MODES.directory, inside=root)
            write_atomically(target / entry, (fallback / entry).read_bytes(), mode=WAL_MODES.file, fsync=True)
            (fallback / entry).unlink()
        except OSError as exc:
            log.warning("backup-tasks wal-push: could not move the record of dropped WAL %s into %s: %s", entry,
                        target, exc)
            return
    with contextlib.suppress(OSError):
        os.rmdir(fallback)  # only when empty
