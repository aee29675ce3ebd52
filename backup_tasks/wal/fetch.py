"""One archived file read from whichever location holds a good one, and what "no location has it" means.

``WalArchive`` reads its primary first, and ``elsewhere`` the copy (``<BACKUP_COPY_TO>/wal``) when
the primary lacks the file, holds a damaged one or cannot be read; each object is checked against
its own trailer (size and sha256 of the original), so a good copy is never refused for the
primary's damage and a damaged one never handed over. It serves ``WalArchive.fetch`` (wal-fetch:
into ``pg_wal``, atomically) and ``WalArchive.read_text`` (history files for planning), so a file
that only the copy holds (the local archive lost a disk; wal-push stored it in the copy alone) is
read like any other.

When neither returns the file, wal-fetch's exit code depends on whether it is *provably* not
archived: ``absence_error`` gathers the WAL known to exist (``wal.absence.Known``: the union of
what the locations that answered hold, their history files, the local state file's records) and
asks ``wal.absence.judge``, whose module docstring states the rule. The copy is asked at most once
per process: once it failed to answer, every later question is answered without it
(``UnionContents.copy_failed``), so an unreachable endpoint costs its retries once.

Imported by ``wal.archive`` only when the primary cannot give a file (a segment found there, wal-fetch's
per-segment case, never loads this), standard library and the WAL modules only (``wal.system``: where a
major upgrade's new system began, see ``wal.absence``; boto3 only when the copy is a bucket and is asked).
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from backup_tasks.errors import BackupError, ObjectMissing, WalArchiveError, WalCorrupt, WalGap, WalMissing
from backup_tasks.wal.absence import ABSENT, GAP, Known, judge
from backup_tasks.wal.layout import object_key
from backup_tasks.wal.names import kind_of, timeline_of
from backup_tasks.wal.objects import verified_chunks
from backup_tasks.wal.timelines import parse_history

if TYPE_CHECKING:
    from backup_tasks.storage.base import Storage
    from backup_tasks.wal.contents import UnionContents
    from backup_tasks.wal.index import TimelineRuns
    from backup_tasks.wal.objects import Trailer

log = logging.getLogger(__name__)

T = TypeVar("T")


class TwoLocations(Protocol):
    """What this module reads of ``wal.archive.WalArchive`` (which calls it: a Protocol, not an import cycle)."""

    primary: Storage
    copy: Storage | None
    read_copy: bool
    identity_file: str | Path | None

    @property
    def location(self) -> str: ...
    @property
    def root(self) -> Path | None: ...
    @property
    def contents(self) -> UnionContents: ...
    @property
    def copy_problem(self) -> str | None: ...
    def read_text(self, name: str) -> str: ...
    def trailer(self, name: str, *, primary_only: bool = False) -> Trailer: ...


def elsewhere(archive: TwoLocations, name: str, consume: Callable[[Iterator[bytes]], T], primary_error: BackupError,
              *, judge_absence: bool = False) -> T:
    """``consume`` the checked content of ``name`` from the copy: the primary failed with ``primary_error``.

    When no location returns it: ``WalMissing``; with ``judge_absence`` (wal-fetch) the absence rule's
    answer instead (``absence_error``), and a file taken from the copy is said in the server log. A
    damaged or unreadable file with no good one elsewhere raises the primary's error (``WalCorrupt``,
    ``WalArchiveError``), the copy's added.
    """
    missing = isinstance(primary_error, WalMissing)
    copy = archive.copy if archive.read_copy else None
    if copy is None:
        if missing and judge_absence:
            raise absence_error(archive, name, None) from None
        raise primary_error
    try:
        data = _copy_bytes(archive, copy, name)
    except ObjectMissing:
        if not missing:
            raise primary_error from None
        if judge_absence:
            raise absence_error(archive, name, None) from None
        raise WalMissing(f"{name} is in neither the WAL archive {archive.location} nor its copy {copy.location}") \
            from None
    except Exception as exc:  # a StorageError, an OSError (a copy this user cannot enter), a bad copy URL
        problem = str(exc) or type(exc).__name__
        archive.contents.copy_failed(problem)
        if not missing:
            raise WalArchiveError(f"{primary_error}; the copy in {copy.location} cannot be read either: "
                                  f"{problem}") from None
        if judge_absence:
            raise absence_error(archive, name, problem) from None
        raise WalArchiveError(f"{name} is not in the WAL archive {archive.location}, and its copy in {copy.location} "
                              f"cannot be read: {problem}") from None
    log.log(logging.WARNING if judge_absence else logging.INFO, "%s; restoring %s from the copy in %s",
            primary_error, name, copy.location)
    try:
        return consume(verified_chunks(io.BytesIO(data), len(data), name, hashlib.sha256(),
                                       identity_file=archive.identity_file))
    except WalCorrupt as exc:
        raise WalCorrupt(f"{primary_error}; and the copy in {copy.location} is damaged too: {exc}") from None


def _copy_bytes(archive: TwoLocations, copy: Storage, name: str) -> bytes:
    """The copy's object of ``name``; the copy is not asked again once it failed (``UnionContents.copy_failed``)."""
    problem = archive.copy_problem
    if problem is not None:
        raise WalArchiveError(problem)
    return copy.read_bytes(object_key(name))


def absence_error(archive: TwoLocations, name: str, copy_problem: str | None) -> WalArchiveError:
    """What no location returning ``name`` means (``wal.absence``): ``WalMissing``, ``WalGap`` or ``WalArchiveError``.

    ``copy_problem``: why the copy could not be asked, when it could not.
    """
    known = known_wal(archive, name)
    verdict = judge(name, known, lambda: segment_size(archive, known.runs))
    copy = archive.copy if archive.read_copy else None
    where = f"the WAL archive {archive.location}" + (f" or its copy in {copy.location}" if copy is not None else "")
    if verdict.outcome == ABSENT:
        problem = copy_problem or archive.copy_problem
        if copy is not None and problem is not None:
            # Said in the server log: recovery ends here although one location could not be asked.
            log.warning("%s is not in the WAL archive %s and the copy in %s cannot be read (%s); %s, so it is taken "
                        "as not archived", name, archive.location, copy.location, problem,
                        verdict.reason or "nothing known shows it exists")
        return WalMissing(f"{name} is not in {where}")
    what = f"WAL segment {name}" if kind_of(name) == "segment" else name
    if verdict.outcome == GAP:
        return WalGap(f"{what} is missing from {where} although {verdict.reason}: recovery cannot go past this gap")
    assert copy is not None  # without a copy every location answered
    because = f" ({verdict.reason})" if verdict.reason else ""
    problem = copy_problem or archive.copy_problem
    return WalArchiveError(f"{what} is not in the WAL archive {archive.location}, and the copy in {copy.location} "
                           f"cannot be read to make sure it is not there either ({problem}){because}. Recovery "
                           f"stops here rather than end early: run it again once the copy answers (to recover from "
                           f"the local archive alone, restore without BACKUP_COPY_TO)")


def known_wal(archive: TwoLocations, name: str) -> Known:
    """The WAL known to exist in ``archive``'s locations that answer (``wal.absence.Known``), for judging ``name``.

    For a history file, what its rule reads (``UnionContents.around_history``: the history file names and
    the segments of its timeline; a later timeline has a history file of its own); for anything else the
    whole archive: every segment, and the ancestry in every history file.
    """
    contents = archive.contents
    histories: dict[int, list[tuple[int, int]] | None]
    if kind_of(name) == "history":
        runs, names = contents.around_history(timeline_of(name))
        histories = dict.fromkeys(map(timeline_of, names))
    else:
        runs = contents.segment_runs()  # the copy's listing (once) unless it failed: then the primary's alone
        histories = {}
        for history in contents.history_names():
            try:
                histories[timeline_of(history)] = parse_history(archive.read_text(history))
            except BackupError:
                histories[timeline_of(history)] = None  # known to exist; its ancestry unknown
    return Known(runs, histories, _recorded(archive), complete=contents.copy is None or contents.copy_problem is None,
                 boundaries=generation_boundaries(archive) if kind_of(name) == "segment" else ())


def generation_boundaries(archive: TwoLocations) -> tuple[str, ...]:
    """Where each later generation's WAL begins (``wal.system``): the first segments the primary's generation records
    name (the wal-push that opened each wrote it there), else the copy's (``upgrade --finish`` copies them, for a
    restore from the copy alone). Unreadable records: none, so the names a major upgrade skipped count as a gap
    (exit 200): recovery stops loudly rather than early."""
    from backup_tasks.wal.system import read_records

    copy = archive.copy if archive.read_copy and archive.copy_problem is None else None
    for location in (archive.primary, copy):
        if location is None:
            continue
        try:
            generations, _upgrades, _released = read_records(location)
        except (BackupError, OSError) as exc:
            log.warning("the generation records of %s cannot be read (%s): a major upgrade's skipped WAL names count "
                        "as a gap", location.location, exc)
            continue
        found = tuple(g.first_segment for g in generations if g.first_segment)
        if found:
            return found
    return ()


def _recorded(archive: TwoLocations) -> tuple[str, ...]:
    """The newest segment per location that wal-push recorded in the local archive's state file (``wal.state``)."""
    if archive.root is None:
        return ()
    from backup_tasks.wal import state

    try:
        return tuple(newest.segment for newest in state.read(archive.root).values())
    except state.StateUnreadable as exc:
        log.warning("not using the WAL archive's state file: %s", exc)
        return ()


def segment_size(archive: TwoLocations, runs: TimelineRuns) -> int | None:
    """The archive's segment size: the original size in an archived segment's trailer; None when none can tell."""
    newest = [f"{timeline:08X}{log_id:08X}{last:08X}" for timeline, spans in sorted(runs.items())
              for log_id, _first, last in spans[-1:]]
    for name in newest[:3]:  # a few tries: a damaged trailer here or there must not decide
        try:
            return archive.trailer(name).size
        except BackupError:
            continue
    return None
