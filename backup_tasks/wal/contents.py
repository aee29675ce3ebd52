"""What a WAL archive holds: its names, runs and sizes, read as cheaply as its location allows.

A local directory is read through its cached index (``wal.index``: 100,000 segments as ~400
directory stats) and plain directory listings; files there are looked at one ``stat`` at a time. Any
other location (a bucket's ``wal/`` read for a restore) is listed once, in one paginated request,
and every later question (which names, is this one there, how big, is there a later segment) is
answered from that listing. Readers only: wal-push never lists the archive.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from backup_tasks.errors import ObjectMissing, WalArchiveError
from backup_tasks.storage.base import ObjectInfo, Storage
from backup_tasks.wal.index import ArchiveIndex, TimelineRuns, is_segment_dir, read_index, timeline_runs_of_names
from backup_tasks.wal.layout import HISTORY_DIR, INCOMING_MARK, SUFFIX, object_key
from backup_tasks.wal.names import HISTORY_RE, SEGMENT_RE, position


class ArchiveContents:
    """The names in ``storage`` (the archive's primary); ``root`` is its directory when it is a local one."""

    def __init__(self, storage: Storage, root: Path | None) -> None:
        self.storage = storage
        self.root = root
        self._listing: dict[str, ObjectInfo] | None = None

    def changed(self) -> None:
        """Forget the listing: something was written or deleted through the archive."""
        self._listing = None

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

    def listing(self) -> dict[str, ObjectInfo]:
        """Every object of the archive by key: one listing (a bucket: one paginated request), kept."""
        if self._listing is None:
            self._listing = {info.key: info for info in self.storage.list("", recursive=True)}
        return self._listing

    def _listed(self, pattern: re.Pattern[str], directory: str | None) -> list[str]:
        """Names matching ``pattern`` in ``directory``, or in any segment directory (None)."""
        found = []
        for key in self.listing():
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
        return sorted(self._listed(SEGMENT_RE, None), key=lambda n: (position(n), n[:8]))

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
        if self.root is not None:
            return sorted(entry[:-len(SUFFIX)] for entry in list_directory(self.root / HISTORY_DIR)
                          if entry.endswith(SUFFIX) and HISTORY_RE.match(entry[:-len(SUFFIX)]))
        return sorted(self._listed(HISTORY_RE, HISTORY_DIR))

    def exists(self, name: str) -> bool:
        if self.root is not None:
            return self.storage.exists(object_key(name))
        return object_key(name) in self.listing()

    def size_of(self, name: str) -> int:
        """Bytes stored for ``name``; 0 when it is not there."""
        if self.root is None:
            info = self.listing().get(object_key(name))
            return info.size if info else 0
        try:
            return self.storage.size(object_key(name))
        except ObjectMissing:
            return 0

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


def list_directory(path: Path) -> list[str]:
    """The entries of a directory of the archive; none when it is missing, ``WalArchiveError`` when unreadable."""
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except PermissionError:
        raise WalArchiveError(f"permission denied reading the WAL archive directory {path}") from None
