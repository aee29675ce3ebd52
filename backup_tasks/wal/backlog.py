"""The copy's backlog: WAL files stored in the local archive that ``<BACKUP_COPY_TO>/wal`` still lacks.

``wal-push`` acknowledges a file once it is durable in the local archive; the copy is given a
short bound (``--copy-timeout``). A file the copy did not take within it (down, slow, refusing) is
*queued*: an entry ``<archive>/.copy-backlog/<name>`` is written and fsynced, with its directory,
before the acknowledgement, so a crash never forgets what the copy lacks. The entry is only a
pointer: the object is the archived one, and what the copy lacks is decided by the copy itself
when the shipper (``wal.ship``) puts it there create-only (an entry for a file the copy holds
already costs one request and is removed). Entries are removed once the copy holds their file; a
lost removal (a crash) only means that request again.

Beside the entries (dot-files, never WAL names):

- ``.lock``: the shipper's ``flock``: one shipper at a time (``wal-ship``, the beat task, a
  ``wal-push`` catching up), never waiting on each other for long;
- ``.failed``: the copy's last failure (its text; its mtime is when): while it is recent,
  ``wal-push`` queues without trying the copy (``retry_due``), so a copy that hangs costs the
  server one bound per ``RETRY_SECONDS``, not one per segment.

Shared by root's tools and the server's OS user: the directory and files get ``WAL_MODES``, the lock
is group-writable. Part of the per-segment fast path, and read by the exporter through ``wal.state``:
the standard library and ``storage.files`` only (``wal.objects`` when a trailer is read).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from backup_tasks.storage.files import TEMP_MARK, WAL_MODES, is_temporary, make_dirs, write_atomically
from backup_tasks.wal.layout import object_key
from backup_tasks.wal.names import kind_of

BACKLOG_DIR = ".copy-backlog"
LOCK_FILE = ".lock"
FAILED_FILE = ".failed"
ENTRY_VERSION = 1
#: Seconds the copy is given for one file by default (wal-push's ``--copy-timeout``, BACKUP_COPY_TIMEOUT_SECONDS).
COPY_TIMEOUT = 10
#: After the copy failed, ``wal-push`` tries it again (and ships the backlog) no sooner than this.
RETRY_SECONDS = 30.0


@dataclass(frozen=True)
class BacklogCount:
    """What the copy lacks, counted from the entries and the archived objects they point to."""

    files: int  # WAL files queued (segments, and the odd history or .backup file)
    bytes: int  # their size as archived: what shipping them sends
    oldest: str | None  # the first queued segment in WAL order
    oldest_completed_at: float | None  # when the server completed it (its trailer), unix time

    def age_seconds(self, now: float) -> float:
        """How far the copy is behind: the age of its oldest queued segment (0 with none)."""
        return 0.0 if self.oldest_completed_at is None else max(0.0, now - self.oldest_completed_at)


EMPTY = BacklogCount(0, 0, None, None)


def shipping_order(names: list[str]) -> list[str]:
    """History files first, then by name (timeline, then position): the order PostgreSQL archives in."""
    return sorted(names, key=lambda name: (not name.endswith(".history"), name))


class Backlog:
    """The backlog of the local archive at ``root`` (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.directory = self.root / BACKLOG_DIR

    def entry(self, name: str) -> Path:
        return self.directory / name

    def names(self) -> list[str]:
        """The queued WAL files in ``shipping_order``; none when the directory does not exist."""
        try:
            entries = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return shipping_order([entry for entry in entries if not entry.startswith(".")])

    def pending(self) -> bool:
        """Whether anything is queued: one directory listing (usually of an empty or missing directory).

        A directory that cannot be listed holds nothing we could ship: False (queueing into it then
        fails, and wal-push with it, unless the copy takes the file).
        """
        try:
            with os.scandir(self.directory) as entries:
                return any(not entry.name.startswith(".") for entry in entries)
        except OSError:
            return False

    def holds(self, name: str) -> bool:
        return self.entry(name).exists()

    def add(self, name: str, *, reason: str, copy: str) -> None:
        """Queue ``name`` durably (the entry and its directory entry fsynced): it may be acknowledged now.

        Raises ``OSError`` when the entry cannot be written: then nothing may be acknowledged.
        """
        kind_of(name)
        make_dirs(self.directory, WAL_MODES.directory, inside=self.root)
        content = {"v": ENTRY_VERSION, "name": name, "copy": copy, "queued_at": time.time(), "reason": reason}
        write_atomically(self.entry(name), json.dumps(content).encode(), mode=WAL_MODES.file, fsync=True)

    def remove(self, name: str) -> None:
        """The copy holds ``name`` now (not fsynced: an entry that comes back only costs one more request)."""
        with contextlib.suppress(FileNotFoundError):
            self.entry(name).unlink()

    # --- the copy's last failure ------------------------------------------------------------------

    def note_failure(self, reason: str) -> None:
        """Remember that the copy failed just now (never raises: it only spaces out the next attempts)."""
        try:
            make_dirs(self.directory, WAL_MODES.directory, inside=self.root)
            write_atomically(self.directory / FAILED_FILE, reason.encode(errors="replace"), mode=WAL_MODES.file)
        except OSError:
            pass

    def clear_failure(self) -> None:
        with contextlib.suppress(OSError):
            (self.directory / FAILED_FILE).unlink()

    def last_failure(self) -> tuple[float, str] | None:
        """When the copy last failed, and how (None: not since it last took everything)."""
        path = self.directory / FAILED_FILE
        try:
            return path.stat().st_mtime, path.read_text(errors="replace")
        except OSError:
            return None

    def retry_due(self, now: float | None = None) -> bool:
        """Whether the copy may be tried again: no failure noted, or the last one ``RETRY_SECONDS`` ago."""
        failed = self.last_failure()
        return failed is None or (time.time() if now is None else now) - failed[0] >= RETRY_SECONDS

    # --- one shipper at a time --------------------------------------------------------------------

    @contextlib.contextmanager
    def shipping(self, wait: float = 0.0) -> Iterator[bool]:
        """Hold the shipper's lock: yields True, or False when another shipper kept it for ``wait`` seconds."""
        make_dirs(self.directory, WAL_MODES.directory, inside=self.root)
        fd = os.open(self.directory / LOCK_FILE, os.O_RDONLY | os.O_CREAT, WAL_MODES.lock_file)
        try:
            if os.fstat(fd).st_uid == os.geteuid():
                os.fchmod(fd, WAL_MODES.lock_file)  # the server's umask 077 would keep root's shipper out
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        yield False
                        return
                    time.sleep(0.05)
            yield True
        finally:
            os.close(fd)

    # --- what it amounts to -----------------------------------------------------------------------

    def count(self) -> BacklogCount:
        """Files and bytes queued, and the oldest queued segment with its completion time (one stat per entry,
        one trailer read). Entries whose object is gone (WAL expiry) count as files of 0 bytes."""
        names = self.names()
        if not names:
            return EMPTY
        total = 0
        for name in names:
            with contextlib.suppress(OSError):
                total += os.stat(self.root / object_key(name)).st_size
        segments = [name for name in names if kind_of(name) == "segment"]
        oldest = segments[0] if segments else None
        return BacklogCount(len(names), total, oldest, self._completed_at(oldest) if oldest else None)

    def _completed_at(self, name: str) -> float | None:
        """The trailer's completion time of the archived ``name``; else when it was queued (its entry's mtime)."""
        from backup_tasks.wal.objects import TRAILER_SIZE, parse_trailer  # zstandard: not for the exporter's import

        try:
            with open(self.root / object_key(name), "rb") as fh:
                fh.seek(-TRAILER_SIZE, os.SEEK_END)
                return parse_trailer(fh.read(TRAILER_SIZE), name).completed_at
        except Exception:  # gone, unreadable or damaged: the shipper says which; the age still counts
            try:
                return self.entry(name).stat().st_mtime
            except OSError:
                return None

    def clear_temporaries(self, older_than: float) -> None:
        """Remove temporary entry files a killed ``add`` left (older than ``older_than``, a unix time)."""
        try:
            entries = os.listdir(self.directory)
        except OSError:
            return
        for entry in entries:
            if is_temporary(entry, TEMP_MARK):
                path = self.directory / entry
                with contextlib.suppress(OSError):
                    if path.stat().st_mtime < older_than:
                        path.unlink()
