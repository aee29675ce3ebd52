"""The archive's newest acknowledged segment, per location: a small state file wal-push keeps up to date.

The exporter (``backup-tasks metrics``) and ``status`` read the archive's freshness from here instead
of listing 100,000 segments on every scrape. ``<archive>/.state.json``::

    {"v": 1, "locations": {
        "archive": {"segment": "00000001000000A30000004F", "completed_at": 1764500000.25,
                    "stored_at": 1764500000.31, "where": "/var/backups/aitrapp/wal"},
        "copy":    {... the same for <BACKUP_COPY_TO>/wal ...}}}

``completed_at`` is the segment's completion time as its trailer records it (when the server
finished writing it), ``stored_at`` when wal-push recorded it as stored there. A location's entry
moves only forward (by ``completed_at``, then segment name): a repeated push of an old segment after a
crash never makes the state look older than it is. ``copy`` is dropped when a push runs without a copy
(BACKUP_COPY_TO removed), and kept as it was while the copy lacks files (``wal.backlog``: queued when it
failed or was slow; the shipper moves the entry as it catches up): it then shows how far the copy is behind.

``read`` also counts what only the archive's directory can tell, for the exporter: the copy's backlog
(files, bytes, the oldest) and the WAL dropped without being stored (``wal.dropped``); ``Recorded``.

Part of the per-segment fast path: the standard library only (and ``wal.names``, ``storage.files``).
Writes are atomic (``storage.files.write_atomically``: a temporary file renamed over) under a short
``flock`` on ``.state.lock``, so concurrent pushers never
interleave a read-modify-write; one that cannot get the lock within ``LOCK_WAIT`` skips its update
(the next segment's push records the newer one). ``record`` never raises: the state is advisory and
must never fail a push; an error is logged (PostgreSQL's log, through stderr) and ignored.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from backup_tasks.storage.files import WAL_MODES, write_atomically
from backup_tasks.wal.names import position

if TYPE_CHECKING:
    from backup_tasks.wal.backlog import BacklogCount
    from backup_tasks.wal.dropped import Dropped

log = logging.getLogger(__name__)

STATE_FILE = ".state.json"
LOCK_FILE = ".state.lock"
STATE_VERSION = 1
#: Group-writable: the server's OS user and root (a manual ``wal-push``) both lock it.
LOCK_MODE = WAL_MODES.lock_file
#: How long a pusher waits for another's update before skipping its own (seconds).
LOCK_WAIT = 1.0
#: The two locations a segment is stored in: the local archive and BACKUP_COPY_TO's ``wal/``.
ARCHIVE = "archive"
COPY = "copy"
#: What the state file's temporary name starts with while it is written (``storage.files.temporary_name``).
TEMP_MARK = f"{STATE_FILE}.tmp-"


@dataclass(frozen=True)
class Newest:
    """The newest segment acknowledged as stored in one location."""

    segment: str
    completed_at: float  # unix time the server finished writing it (the archived trailer's completed_at)
    stored_at: float  # unix time wal-push recorded it stored there
    where: str  # the location: the archive directory, or the copy's URL

    def newer_than(self, other: Newest) -> bool:
        return (self.completed_at, position(self.segment), self.segment[:8]) > \
            (other.completed_at, position(other.segment), other.segment[:8])


class StateUnreadable(Exception):
    """The state file exists but cannot be read or parsed (the exporter reports its source as down)."""


class Recorded(dict[str, Newest]):
    """What ``read`` returns: the newest segment per location (a mapping by location, as the file has it), and
    what the archive's directory says besides: the copy's ``backlog`` and the ``dropped`` WAL records."""

    def __init__(self, entries: dict[str, Newest], *, backlog: BacklogCount | None = None,
                 dropped_wal: list[Dropped] | None = None) -> None:
        from backup_tasks.wal.backlog import EMPTY

        super().__init__(entries)
        self.backlog = backlog or EMPTY
        self.dropped = dropped_wal or []


def state_path(root: Path) -> Path:
    return Path(root) / STATE_FILE


def read(root: Path | None) -> Recorded:
    """The recorded newest segment per location (none when nothing was recorded yet, or the archive is no local
    directory, which is where the state file lives), with the copy's backlog and the dropped WAL.

    Raises ``StateUnreadable`` when the file is there but unreadable (permissions, damage), or the backlog
    cannot be counted.
    """
    from backup_tasks.wal import dropped  # the exporter's, not wal-push's
    from backup_tasks.wal.backlog import Backlog

    if root is None:
        return Recorded({})
    entries = _read_entries(root)
    try:
        backlog = Backlog(root).count()
    except OSError as exc:
        raise StateUnreadable(f"cannot count the copy's backlog in {root}: {exc.strerror or exc}") from None
    return Recorded(entries, backlog=backlog, dropped_wal=dropped.read(root))


def _read_entries(root: Path) -> dict[str, Newest]:
    try:
        raw = state_path(root).read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise StateUnreadable(f"cannot read {state_path(root)}: {exc.strerror or exc}") from None
    try:
        return _parse(json.loads(raw))
    except (ValueError, TypeError, KeyError) as exc:
        raise StateUnreadable(f"{state_path(root)} is damaged: {exc}") from None


def _parse(content: object) -> dict[str, Newest]:
    if not isinstance(content, dict) or content.get("v") != STATE_VERSION:
        raise ValueError("not a version-1 state document")
    locations = content["locations"]
    if not isinstance(locations, dict):
        raise ValueError("'locations' is not an object")
    return {str(name): Newest(segment=str(entry["segment"]), completed_at=float(entry["completed_at"]),
                              stored_at=float(entry["stored_at"]), where=str(entry["where"]))
            for name, entry in locations.items()}


def record(root: Path, segment: str, completed_at: float, *, copy_where: str | None, copy_stored: bool,
           now: float | None = None) -> None:
    """Record ``segment`` as stored in the archive at ``root`` (and in the copy when ``copy_stored``). Never raises.

    ``copy_where``: the copy this push was configured with (None: no copy, its entry is dropped).
    """
    try:
        _record(Path(root), segment, completed_at, copy_where=copy_where, copy_stored=copy_stored,
                now=time.time() if now is None else now)
    except Exception as exc:  # advisory state: a push that stored its segment has succeeded whatever happens here
        log.warning("backup-tasks wal-push: could not record %s in the archive's state file %s (the segment itself "
                    "is archived): %s", segment, state_path(root), exc)


def _record(root: Path, segment: str, completed_at: float, *, copy_where: str | None, copy_stored: bool,
            now: float) -> None:
    lock_fd = _lock(root)
    if lock_fd is None:
        log.debug("state file of %s busy: %s not recorded, the next push records a newer one", root, segment)
        return
    try:
        try:
            current = _read_entries(root)
        except StateUnreadable:
            current = {}  # damaged: rewritten whole below
        updated = dict(current)
        _advance(updated, ARCHIVE, Newest(segment, completed_at, now, str(root)))
        if copy_where is None:
            updated.pop(COPY, None)
        elif copy_stored:
            _advance(updated, COPY, Newest(segment, completed_at, now, copy_where))
        elif COPY in updated and updated[COPY].where != copy_where:
            updated.pop(COPY)  # about another copy location: says nothing about this one
        if updated != current:
            _write(root, updated)
    finally:
        os.close(lock_fd)


def _advance(entries: dict[str, Newest], location: str, candidate: Newest) -> None:
    recorded = entries.get(location)
    if recorded is None or recorded.where != candidate.where or candidate.newer_than(recorded):
        entries[location] = candidate


def _lock(root: Path) -> int | None:
    """An fd holding the exclusive lock on ``.state.lock``, or None after ``LOCK_WAIT`` seconds of contention."""
    path = root / LOCK_FILE
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, LOCK_MODE)  # flock needs no write access: any group member
    try:
        if os.fstat(fd).st_uid == os.geteuid():
            os.fchmod(fd, LOCK_MODE)  # the server's umask 077 would keep root's tools out (and the reverse)
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    return None
                time.sleep(0.01)
    except BaseException:
        os.close(fd)
        raise


def _write(root: Path, entries: dict[str, Newest]) -> None:
    """Atomically; not fsynced: a state lost in a crash is rewritten by the next push."""
    document = {"v": STATE_VERSION, "locations": {name: asdict(e) for name, e in sorted(entries.items())}}
    write_atomically(state_path(root), json.dumps(document).encode(), mode=WAL_MODES.file)
