"""A summary of the local WAL archive, kept by its readers: 100,000 segments read as ~400 directory stats.

Twelve weeks of WAL is over 100,000 files in ~400 directories (``wal.archive`` layout: one directory
per timeline and log id, up to 256 segments of 16 MiB each). Listing them all and parsing every name
costs ~0.3 s on every ``list`` and ``prune``; almost none of those directories ever change again. So
each directory is summarized (its segments as runs of numbers, every other archived name, and, once
somebody needed it, the bytes its WAL files take) and the summaries are cached in one small file in
the archive root (``INDEX_FILE``). A reader stats every directory (cheap) and trusts a cached summary
only while the directory's inode, mtime and ctime are exactly what they were when it was listed:
adding or removing a file changes the directory's mtime (and ctime), so a changed directory is always
listed again. The index is never required and never written by ``wal-push``: a missing, unreadable,
corrupt or unwritable cache file just means the directories are listed now, and the refreshed cache
is written back (temporary file, then rename) only where this user may, silently otherwise (the
archive is often owned by the server's OS user while root or an operator reads it).

A directory modified within ``RACY_SECONDS`` of the scan is used for this answer but not cached: a
second change landing in the same timestamp tick as the listing (coarse clocks, filesystems with 1 or
2 s granularity) would leave its mtime unchanged, and the cached summary must never hide it.

Standard library only (and ``storage.files``): ``wal.contents`` reads it, which ``wal.archive`` (the
wal-push / wal-fetch fast path) imports lazily, from its listing methods, which wal-push never calls.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field, replace
from itertools import groupby
from operator import itemgetter
from pathlib import Path

from backup_tasks.errors import BackupError, WalArchiveError
from backup_tasks.storage.files import write_atomically
from backup_tasks.wal.layout import FILE_MODE, HISTORY_DIR, INCOMING_MARK, SUFFIX
from backup_tasks.wal.names import SEGMENT_RE, kind_of

log = logging.getLogger(__name__)

INDEX_FILE = ".wal-index.json"
#: Bumped whenever the file's meaning changes: a file of another format is ignored (and replaced).
FORMAT = 1
#: A directory whose mtime is this recent is listed on every read, never cached (see above).
RACY_SECONDS = 5
_HEX = frozenset("0123456789ABCDEF")
#: ``name[16:24]`` of the segments of one log id at the default 16 MiB (256 of them), ready to append.
_LOW_HEX = [f"{n:08X}" for n in range(256)]

#: A run of present segments in one directory: the first and last value of ``name[16:24]``, inclusive.
Run = tuple[int, int]
#: Per timeline, runs in WAL order: (log id, first, last) of ``name[8:16]`` and ``name[16:24]``.
TimelineRuns = dict[int, list[tuple[int, int, int]]]


def is_segment_dir(name: str) -> bool:
    """A segment directory of the archive: 16 upper-case hex digits (timeline, log id)."""
    return len(name) == 16 and _HEX.issuperset(name)


def runs_of(numbers: Iterable[int]) -> list[Run]:
    """Sorted, merged runs of consecutive numbers (duplicates allowed)."""
    return merge_runs((number, number) for number in numbers)


def merge_runs(runs: Iterable[Run]) -> list[Run]:
    """Overlapping or adjacent runs joined, in order."""
    merged: list[Run] = []
    for first, last in sorted(runs):
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(last, merged[-1][1]))
        else:
            merged.append((first, last))
    return merged


def timeline_runs_of_names(names: Iterable[str]) -> TimelineRuns:
    """The runs of segment names (only segment names: ``segment_names``; any order, WAL order is cheapest).

    A listing in WAL order comes as blocks of one directory each; a block of unique names whose
    first and last are as far apart as its length is one run, found without parsing every name.
    """
    by_dir: dict[str, list[Run]] = {}
    for directory, block in groupby(names, key=itemgetter(slice(0, 16))):
        found = list(block)
        low, high = int(min(found)[16:24], 16), int(max(found)[16:24], 16)
        if high - low + 1 == len(found) and len(set(found)) == len(found):
            runs = [(low, high)]
        else:
            runs = runs_of(int(name[16:24], 16) for name in found)
        by_dir.setdefault(directory, []).extend(runs)
    result: TimelineRuns = {}
    for directory in sorted(by_dir, key=lambda d: (d[8:], d[:8])):
        runs = by_dir[directory]
        timeline, log_id = int(directory[:8], 16), int(directory[8:], 16)
        result.setdefault(timeline, []).extend((log_id, a, b) for a, b in merge_runs(runs))
    return result


def union_runs(first: TimelineRuns, second: TimelineRuns) -> TimelineRuns:
    """The segments of either, as runs per timeline (two locations' contents seen as one archive)."""
    if not second:
        return first
    if not first:
        return second
    result: TimelineRuns = {}
    for timeline in sorted(first.keys() | second.keys()):
        by_log_id: dict[int, list[Run]] = {}
        for log_id, low, high in [*first.get(timeline, []), *second.get(timeline, [])]:
            by_log_id.setdefault(log_id, []).append((low, high))
        result[timeline] = [(log_id, low, high) for log_id in sorted(by_log_id)
                            for low, high in merge_runs(by_log_id[log_id])]
    return result


@dataclass(frozen=True)
class DirectorySummary:
    """What one directory of the archive holds, as of ``stamp``."""

    #: (st_ino, st_mtime_ns, st_ctime_ns) of the directory when it was listed.
    stamp: tuple[int, int, int]
    #: The segments named after this directory, as runs of ``name[16:24]``.
    runs: tuple[Run, ...] = ()
    #: Every other archived name (``.partial``, ``.backup``, ``.history``, strays), sorted, without ``.zst``.
    others: tuple[str, ...] = ()
    #: Bytes stored by its WAL files (segments, ``.partial``, ``.backup`` named after it); None until counted.
    wal_bytes: int | None = None

    def segment_names(self, directory: str) -> list[str]:
        names: list[str] = []
        for first, last in self.runs:
            if last < len(_LOW_HEX):  # 100,000 names in ~4 ms: concatenation, not formatting
                names += map(directory.__add__, _LOW_HEX[first:last + 1])
            else:
                names += [f"{directory}{n:08X}" for n in range(first, last + 1)]
        return names

    def to_json(self) -> list[object]:
        return [*self.stamp, self.wal_bytes, [list(run) for run in self.runs], list(self.others)]

    @classmethod
    def from_json(cls, raw: object) -> DirectorySummary:
        """Strictly checked: anything unexpected raises ``ValueError`` (and the whole cache is ignored)."""
        if not isinstance(raw, list) or len(raw) != 6:
            raise ValueError("entry")
        ino, mtime, ctime, wal_bytes, runs, others = raw
        if not all(type(v) is int for v in (ino, mtime, ctime)) or not (wal_bytes is None or type(wal_bytes) is int):
            raise ValueError("stamp")
        if not isinstance(runs, list) or not isinstance(others, list) or not all(type(o) is str for o in others):
            raise ValueError("names")
        checked: list[Run] = []
        for run in runs:
            if not (isinstance(run, list) and len(run) == 2 and all(type(v) is int for v in run)
                    and 0 <= run[0] <= run[1] and (not checked or run[0] > checked[-1][1] + 1)):
                raise ValueError("runs")
            checked.append((run[0], run[1]))
        return cls((ino, mtime, ctime), tuple(checked), tuple(others), wal_bytes)


def summarize(directory: str, entries: Iterable[str], stamp: tuple[int, int, int]) -> DirectorySummary:
    """The summary of a directory from its listing (``os.listdir``): temporary files of wal-push skipped."""
    numbers: list[int] = []
    others: list[str] = []
    for entry in entries:
        if not entry.endswith(SUFFIX) or INCOMING_MARK in entry:
            continue
        base = entry[:-len(SUFFIX)]
        # A segment counts where wal-fetch looks for it: in the directory named after it.
        if len(base) == 24 and base.startswith(directory) and SEGMENT_RE.match(base):
            numbers.append(int(base[16:], 16))
        else:
            others.append(base)
    return DirectorySummary(stamp, tuple(runs_of(numbers)), tuple(sorted(others)))


@dataclass(frozen=True)
class ArchiveIndex:
    """Every directory of a local archive, summarized: segment directories and ``history``."""

    directories: dict[str, DirectorySummary] = field(default_factory=dict)

    def segment_dirs(self) -> list[str]:
        """Segment directories in WAL order (log id, then timeline)."""
        return sorted((d for d in self.directories if d != HISTORY_DIR), key=lambda d: (d[8:], d[:8]))

    def segment_names(self) -> list[str]:
        """Every archived segment (where wal-fetch finds it), in WAL order then timeline."""
        names: list[str] = []
        for _log_id, same in groupby(self.segment_dirs(), key=lambda d: d[8:]):
            block = list(same)
            if len(block) == 1:
                names += self.directories[block[0]].segment_names(block[0])
            else:  # two timelines in one log id: interleave by position
                names += sorted((n for d in block for n in self.directories[d].segment_names(d)),
                                key=lambda n: (n[16:], n[:8]))
        return names

    def names(self, directories: Collection[str] | None = None) -> list[str]:
        """Every archived WAL file of any kind (of ``directories``, default all), sorted."""
        found: list[str] = []
        for directory, summary in self.directories.items():
            if directories is None or directory in directories:
                found += summary.segment_names(directory) + list(summary.others)
        return sorted(found)

    def timeline_runs(self) -> TimelineRuns:
        result: TimelineRuns = {}
        for directory in self.segment_dirs():
            timeline, log_id = int(directory[:8], 16), int(directory[8:], 16)
            result.setdefault(timeline, []).extend((log_id, a, b) for a, b in self.directories[directory].runs)
        return result

    def wal_bytes(self, directories: Iterable[str]) -> int:
        """Bytes stored by the WAL files of ``directories`` (``read_index(count_bytes=...)`` must have counted them)."""
        total = 0
        for directory in directories:
            counted = self.directories[directory].wal_bytes
            if counted is None:
                raise ValueError(f"the size of {directory} was not counted")  # a bug: asked without count_bytes
            total += counted
        return total


def _counted(root: Path, directory: str, summary: DirectorySummary) -> DirectorySummary:
    """``summary`` with ``wal_bytes``: a stat of each WAL file named after the directory (where wal-push puts it).

    History files and strays never expire and are not counted; nor is a file named after another
    directory (never put there by wal-push), which a prune sizes by itself.
    """
    total = 0
    for name in [*summary.segment_names(directory), *(o for o in summary.others if o.startswith(directory))]:
        try:
            if kind_of(name) == "history":
                continue
        except BackupError:
            continue
        try:
            total += os.stat(os.path.join(root, directory, name + SUFFIX)).st_size
        except FileNotFoundError:
            pass  # deleted meanwhile: the directory's new mtime makes the next reader list it again
    return replace(summary, wal_bytes=total)


def read_index(root: Path, *, count_bytes: Callable[[str], bool] | None = None) -> ArchiveIndex:
    """The index of the archive at ``root``, up to date now; ``count_bytes``: which directories' sizes are wanted.

    Sizes are counted once per directory (a stat per file) and cached with its summary: files in the
    archive are never rewritten in place (wal-push publishes a new file by link or rename), so the
    directory's stamp vouches for their sizes too.

    A missing archive is an empty one; a directory this user may not read is ``WalArchiveError`` (as a
    listing). Whatever was listed is written back to the cache file when this user may.
    """
    started_ns = time.time_ns()
    cached = _load(root)
    current: dict[str, DirectorySummary] = {}
    try:
        entries = list(os.scandir(root))
    except (FileNotFoundError, NotADirectoryError):
        return ArchiveIndex()
    except PermissionError:
        raise WalArchiveError(f"permission denied reading the WAL archive directory {root}") from None
    for entry in entries:
        name = entry.name
        if name != HISTORY_DIR and not is_segment_dir(name):
            continue
        try:
            st = entry.stat()  # before the listing: a change during it leaves a stamp that no longer matches
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(st.st_mode):
            continue
        stamp = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
        summary = cached.get(name)
        if summary is None or summary.stamp != stamp:
            try:
                summary = summarize(name, os.listdir(entry.path), stamp)
            except (FileNotFoundError, NotADirectoryError):
                continue  # removed meanwhile
            except PermissionError:
                raise WalArchiveError(f"permission denied reading the WAL archive directory {entry.path}") from None
        if count_bytes is not None and summary.wal_bytes is None and count_bytes(name):
            summary = _counted(root, name, summary)
        current[name] = summary
    racy_from = started_ns - RACY_SECONDS * 1_000_000_000
    keep = {name: s for name, s in current.items() if s.stamp[1] < racy_from}
    if keep != cached:
        _store(root, keep)
    return ArchiveIndex(current)


def _load(root: Path) -> dict[str, DirectorySummary]:
    """The cached summaries, or nothing at all when the file is missing, unreadable, damaged or of another format."""
    try:
        raw = (root / INDEX_FILE).read_bytes()
    except OSError:
        return {}
    try:
        digest, _, body = raw.partition(b"\n")
        if hashlib.sha256(body).hexdigest().encode() != digest:
            raise ValueError("checksum")
        document = json.loads(body)
        if not isinstance(document, dict) or document.get("format") != FORMAT or \
                not isinstance(document.get("directories"), dict):
            raise ValueError("format")
        return {name: DirectorySummary.from_json(entry) for name, entry in document["directories"].items()
                if isinstance(name, str) and (name == HISTORY_DIR or is_segment_dir(name))}
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        log.debug("ignoring the WAL archive index %s: %s", root / INDEX_FILE, exc)
        return {}


def _store(root: Path, summaries: dict[str, DirectorySummary]) -> None:
    """Write the cache atomically; silently nothing where this user may not (no fsync: a cache lost in a crash
    is rebuilt by the next reader)."""
    body = json.dumps({"format": FORMAT, "directories": {name: s.to_json() for name, s in sorted(summaries.items())}},
                      separators=(",", ":")).encode()
    try:
        write_atomically(root / INDEX_FILE, hashlib.sha256(body).hexdigest().encode() + b"\n" + body, mode=FILE_MODE)
    except OSError as exc:
        log.debug("not caching the WAL archive index in %s: %s", root, exc.strerror)
