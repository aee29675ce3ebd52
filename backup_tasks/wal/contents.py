"""What a WAL archive holds: its names, runs and sizes, read as cheaply as its locations allow.

``ArchiveContents`` reads one location. A local directory is read through its cached index
(``wal.index``: 100,000 segments as ~400 directory stats) and plain directory listings; files there
are looked at one ``stat`` at a time. Any other location (a bucket's ``wal/``, read for a restore or
as the copy) is listed once, in one paginated request, and every later question (which names, is
this one there, how big, is there a later segment) is answered from that listing.

``UnionContents`` is what ``WalArchive``'s readers see: the archive (its primary) and, when one is
configured, its copy (``<BACKUP_COPY_TO>/wal``) as ONE archive. Names, runs, history files and
existence are the union of the two, since a segment may be in either alone: the local archive lost a
disk or a directory, or (``wal-push`` with the copy only, when the local archive cannot be written)
the copy holds what the local archive never had. The copy is always read through one listing (a
local copy too: its directory is nobody's index to keep), made at the first question that needs
it and kept, so a planning pays one listing of the copy however many questions it asks; a single
``exists`` asked before any listing is one HEAD, and the question wal-fetch asks about one history
file (``around_history``: PostgreSQL probing for the next timeline) two small prefix listings.

A copy that cannot be read does not fail a reader: the answers are then the primary's alone,
``copy_problem`` says why (``WalArchive.copy_problem``, for messages), a warning says so once, and
the copy is not asked again by this reader (an unreachable endpoint costs its retries once, not
once per question). Whoever needs to know that nothing was missed (wal-fetch's exit code:
``wal.absence``) checks ``copy_problem``.

What stays the primary's alone: the index and its directories (WAL expiry and the clearing of
leftovers work on the local archive; ``storage.copies.WAL``: expiry lists the primary), restore
point records (``keys``) and sizes (``size_of``: what the local archive stores).

Readers only: wal-push never lists the archive.
"""

from __future__ import annotations

import heapq
import logging
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from backup_tasks.errors import BackupError, ObjectMissing, WalArchiveError
from backup_tasks.storage.base import ObjectInfo, Storage
from backup_tasks.wal.index import (
    ArchiveIndex,
    TimelineRuns,
    is_segment_dir,
    read_index,
    timeline_runs_of_names,
    union_runs,
)
from backup_tasks.wal.layout import HISTORY_DIR, INCOMING_MARK, SUFFIX, object_key
from backup_tasks.wal.names import HISTORY_RE, SEGMENT_RE, position

log = logging.getLogger(__name__)

T = TypeVar("T")


def _wal_order(name: str) -> tuple[str, str]:
    return position(name), name[:8]


class ArchiveContents:
    """The names in one location, ``storage``; ``root`` is its directory when it is read through its index."""

    def __init__(self, storage: Storage, root: Path | None) -> None:
        self.storage = storage
        self.root = root
        self._listing: dict[str, ObjectInfo] | None = None
        #: Listings of a part only (``listing(prefix)`` before the whole was listed), by prefix.
        self._parts: dict[str, dict[str, ObjectInfo]] = {}

    def changed(self) -> None:
        """Forget the listing: something was written or deleted through the archive."""
        self._listing = None
        self._parts = {}

    # --- a local directory -----------------------------------------------------------------------------

    def index(self, *, count_bytes: Callable[[str], bool] | None = None) -> ArchiveIndex:
        """The archive's directories summarized (``wal.index``: cached, each directory checked by its mtime)."""
        if self.root is None:
            raise WalArchiveError(f"the WAL archive {self.storage.location} is not a directory here: it has no index")
        return read_index(self.root, count_bytes=count_bytes)

    def segment_dirs(self) -> Iterator[str]:
        """The segment directories of a local archive, as they are now (a plain listing)."""
        assert self.root is not None
        return (entry for entry in list_directory(self.root) if is_segment_dir(entry))

    # --- any other location: one listing ---------------------------------------------------------------

    def listing(self, prefix: str = "") -> dict[str, ObjectInfo]:
        """The objects of the archive by key: one listing (a bucket: one paginated request), kept.

        ``prefix``: only those under it, listed alone when the whole is not held (a timeline's segments,
        the history files: what a question about one history file needs).
        """
        if self._listing is not None:
            return {k: v for k, v in self._listing.items() if k.startswith(prefix)} if prefix else self._listing
        if not prefix:
            self._listing = {info.key: info for info in self.storage.list("", recursive=True)}
            return self._listing
        if prefix not in self._parts:
            self._parts[prefix] = {info.key: info for info in self.storage.list(prefix, recursive=True)}
        return self._parts[prefix]

    def _listed(self, pattern: re.Pattern[str], directory: str | None, prefix: str = "") -> list[str]:
        """Names matching ``pattern`` in ``directory``, or in any segment directory (None); keys under ``prefix``."""
        found = []
        for key in self.listing(prefix):
            folder, _, entry = key.rpartition("/")
            if not entry.endswith(SUFFIX) or INCOMING_MARK in entry:
                continue
            if (directory is None and not is_segment_dir(folder)) or (directory is not None and folder != directory):
                continue
            base = entry[:-len(SUFFIX)]
            if pattern.match(base):
                found.append(base)
        return found

    # --- the questions ---------------------------------------------------------------------------------

    def segment_names(self) -> list[str]:
        """Every archived segment (not .partial/.backup/.history) where wal-fetch finds it, in WAL order."""
        if self.root is not None:
            return self.index().segment_names()
        return sorted(self._listed(SEGMENT_RE, None), key=_wal_order)

    def segment_runs(self) -> TimelineRuns:
        """The archived segments as runs per timeline (what ``wal.coverage`` walks): see ``wal.index``."""
        if self.root is not None:
            return self.index().timeline_runs() if self.root.is_dir() else {}
        return timeline_runs_of_names(self.segment_names())

    def names(self) -> list[str]:
        """Every archived WAL file of any kind."""
        if self.root is not None:
            return self.index().names()
        anything = re.compile(r".")
        return sorted(self._listed(anything, None) + self._listed(anything, HISTORY_DIR))

    def history_names(self) -> list[str]:
        """Every archived timeline history file, sorted."""
        if self.root is not None:
            return sorted(entry[:-len(SUFFIX)] for entry in list_directory(self.root / HISTORY_DIR)
                          if entry.endswith(SUFFIX) and HISTORY_RE.match(entry[:-len(SUFFIX)]))
        return sorted(self._listed(HISTORY_RE, HISTORY_DIR))

    def exists(self, name: str) -> bool:
        if self.root is not None:
            return self.storage.exists(object_key(name))
        return object_key(name) in self.listing()

    def listed(self) -> bool:
        """Whether the listing is held (a listed location answers ``exists`` without a request)."""
        return self._listing is not None

    def size_of(self, name: str) -> int:
        """Bytes stored for ``name``; 0 when it is not there."""
        if self.root is None:
            info = self.listing().get(object_key(name))
            return info.size if info else 0
        try:
            return self.storage.size(object_key(name))
        except ObjectMissing:
            return 0

    def around_history(self, timeline: int) -> tuple[TimelineRuns, list[str]]:
        """What a question about ``<timeline>.history`` needs: the history file names, and the segments of
        ``timeline`` (of every timeline where that is as cheap: a local index, a listing held already).

        A listed location is asked for two small parts (its ``history/`` and ``<timeline>`` prefixes), not
        listed whole: PostgreSQL probes for the next timeline's history at the start and the end of every
        recovery.
        """
        if self.root is not None or self._listing is not None:
            return self.segment_runs(), self.history_names()
        segments = self._listed(SEGMENT_RE, None, prefix=f"{timeline:08X}")
        histories = self._listed(HISTORY_RE, HISTORY_DIR, prefix=f"{HISTORY_DIR}/")
        return timeline_runs_of_names(sorted(segments, key=_wal_order)), sorted(histories)

    def later_segment_exists(self, name: str) -> bool:
        """Whether a segment after ``name`` on the same timeline is archived (so ``name`` is a gap)."""
        tli, pos = name[:8], position(name)
        if self.root is None:
            return any(n[:8] == tli and position(n) > pos for n in self.segment_names())
        for directory in self.segment_dirs():
            if directory[:8] != tli or directory[8:] < pos[:8]:
                continue
            for entry in list_directory(self.root / directory):
                base = entry[:-len(SUFFIX)]
                if entry.endswith(SUFFIX) and SEGMENT_RE.match(base) and position(base) > pos:
                    return True
        return False

    def keys(self, prefix: str) -> list[str]:
        """The keys of the finished objects in the "directory" ``prefix`` (restore point records), sorted."""
        if self.root is not None:
            return [info.key for info in self.storage.list(prefix, recursive=False)]
        return sorted(key for key in self.listing() if key.startswith(prefix) and "/" not in key[len(prefix):])


class UnionContents:
    """The archive as its readers see it: ``primary`` and, when given, ``copy`` as one (see the module docstring)."""

    def __init__(self, primary: ArchiveContents, copy: ArchiveContents | None = None) -> None:
        self.primary = primary
        self.copy = copy
        #: Why the copy could not be read (its answers left out), or None.
        self.copy_problem: str | None = None

    def changed(self) -> None:
        """Forget what was listed: something was written or deleted through the archive."""
        self.primary.changed()
        if self.copy is not None:
            self.copy.changed()
            self.copy_problem = None

    def copy_failed(self, problem: str) -> None:
        """The copy cannot be read (found by whoever asked it): answer from the primary alone from now on."""
        if self.copy is not None and self.copy_problem is None:
            self.copy_problem = problem
            log.warning("cannot read the WAL copy in %s (%s): reading the archive %s alone, so WAL that is only "
                        "in the copy is not seen", self.copy.storage.location, problem, self.primary.storage.location)

    def _from_copy(self, question: Callable[[ArchiveContents], T]) -> T | None:
        """``question`` asked of the copy; None when there is no copy or it cannot be read (``copy_failed``)."""
        if self.copy is None or self.copy_problem is not None:
            return None
        try:
            return question(self.copy)
        except (BackupError, OSError) as exc:  # unreachable, refused, a directory this user cannot enter
            self.copy_failed(str(exc) or type(exc).__name__)
            return None

    # --- the primary's alone -----------------------------------------------------------------------------

    @property
    def root(self) -> Path | None:
        return self.primary.root

    def index(self, *, count_bytes: Callable[[str], bool] | None = None) -> ArchiveIndex:
        return self.primary.index(count_bytes=count_bytes)

    def segment_dirs(self) -> Iterator[str]:
        return self.primary.segment_dirs()

    def size_of(self, name: str) -> int:
        return self.primary.size_of(name)

    def keys(self, prefix: str) -> list[str]:
        return self.primary.keys(prefix)

    # --- the union ----------------------------------------------------------------------------------------

    def segment_names(self) -> list[str]:
        """Every segment in either location (not .partial/.backup/.history), in WAL order, each once."""
        names = self.primary.segment_names()
        extra = self._from_copy(ArchiveContents.segment_names)
        if not extra:
            return names
        merged: list[str] = []
        for name in heapq.merge(names, extra, key=_wal_order):
            if not merged or merged[-1] != name:
                merged.append(name)
        return merged

    def segment_runs(self) -> TimelineRuns:
        """The segments of either location as runs per timeline (what ``wal.coverage`` walks)."""
        runs = self.primary.segment_runs()
        extra = self._from_copy(ArchiveContents.segment_runs)
        return union_runs(runs, extra) if extra else runs

    def names(self) -> list[str]:
        """Every WAL file of any kind in either location, sorted."""
        extra = self._from_copy(ArchiveContents.names)
        return sorted({*self.primary.names(), *(extra or ())})

    def history_names(self) -> list[str]:
        """Every timeline history file in either location, sorted."""
        extra = self._from_copy(ArchiveContents.history_names)
        return sorted({*self.primary.history_names(), *(extra or ())})

    def exists(self, name: str) -> bool:
        """Whether either location holds ``name`` (the copy: from its listing when held, else one HEAD)."""
        if self.primary.exists(name):
            return True
        return bool(self._from_copy(lambda c: c.exists(name) if c.listed() else c.storage.exists(object_key(name))))

    def around_history(self, timeline: int) -> tuple[TimelineRuns, list[str]]:
        """``ArchiveContents.around_history`` of both locations, as one."""
        runs, histories = self.primary.around_history(timeline)
        extra = self._from_copy(lambda c: c.around_history(timeline))
        if extra is None:
            return runs, histories
        return union_runs(runs, extra[0]), sorted({*histories, *extra[1]})

    def later_segment_exists(self, name: str) -> bool:
        """Whether a segment after ``name`` on the same timeline is in either location (so ``name`` is a gap)."""
        return self.primary.later_segment_exists(name) or bool(
            self._from_copy(lambda c: c.later_segment_exists(name)))


def list_directory(path: Path) -> list[str]:
    """The entries of a directory of the archive; none when it is missing, ``WalArchiveError`` when unreadable."""
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except PermissionError:
        raise WalArchiveError(f"permission denied reading the WAL archive directory {path}") from None
