"""When a WAL file that no location returned is provably not archived: the rule behind wal-fetch's exit code.

PostgreSQL runs restore_command for every file it wants. Exit 1 means "not archived": for a segment
the normal end of recovery (the server stops replaying and, at the end, promotes), for a history file
the answer to a probe. Any status above 125 (``wal.command.RECOVERY_FATAL``, 200) stops recovery with
an error instead. Exiting 1 for a file that exists somewhere, or once existed, ends recovery early and
quietly, at a point short of the target; so ``wal-fetch`` exits 1 (``WalMissing``) only when the file
is provably not archived, and 200 (``WalGap``, or ``WalArchiveError`` naming what could not be read)
whenever it cannot prove that.

PostgreSQL also asks for files that never exist, and those must keep their prompt exit 1, even while
the copy (``<BACKUP_COPY_TO>/wal``) is unreachable, or every restore fails along with the copy: the
next timeline's history file (it probes ``0000000N.history`` upwards for newer timelines, at the start
and at the end of recovery), the segment after the end of the archived WAL, and segments of a
timeline whose history it read but that never archived anything.

The judgement is made from the *known WAL*: what the locations that answered hold (the local archive;
the copy when it could be listed; a bucket read alone), their history files, and the newest segment
per location that wal-push recorded in the local archive's state file (``wal.state``: it knows how
far the copy got even while the copy cannot be asked). Knowledge is *complete* when every location
answered: the primary and, when one is configured, the copy. The rule looks for *evidence* that
the file existed:

- segment ``T/P`` (timeline T, position P):
  a. a known segment of timeline T after P (the classic gap);
  b. a state record of a segment of T at or after P (wal-push stored it, or later WAL of T);
  c. a known timeline D descending from T (T is an ancestor in D's history file) whose line left T at
     a position after segment P, with segments of D known or recorded: T's WAL went past P (D
     branched from T after it), so P existed (a gap before a timeline switch). Exiting 1 would
     end recovery on T short of the branch, on a path the archive shows to be longer.
- ``N.history``: known WAL of timeline N or later (a segment, a later history file, a state record).
  A timeline is numbered after the newest one the archive held when it was created, and its history
  file is archived before its first segment: ``N.history`` was archived and is lost, and exiting 1
  would make PostgreSQL settle on timeline N-1 and miss N and its descendants. Timeline 1 has no
  history file: ``00000001.history`` never has evidence. (A listed location is asked for its
  history files and timeline N's segments only: a later timeline shows by its own history file.)
- ``.partial`` and ``.backup`` files: never evidence (PostgreSQL does not need them to recover), but
  they are provably absent only with complete knowledge.

Generations (``wal.system``: a major upgrade's new system archives into the same archive): the WAL
of one system says nothing about another's. ``pg_upgrade`` starts the new system's WAL past the old
one's last position, and the old server's last segment (cut short by its shutdown) is never archived:
the names between the old system's newest archived segment and the new system's first
(``boundaries``: where each later generation's WAL begins) are provably absent, so recovery of the
old generation ends at its last archived segment. Evidence for a segment is therefore read only from
the WAL of its own generation: segments, state records and branch points before the next boundary
after it (a branch the new system made, or its WAL, is no evidence about the old system's).

Evidence with complete knowledge: a gap, ``WalGap`` (200). Evidence with the copy unreadable: the
copy may hold the file, ``WalArchiveError`` (200), saying that the copy must answer (or that
BACKUP_COPY_TO must be unset to restore from the local archive alone). No evidence: ``WalMissing``
(exit 1), the copy unreadable or not: the end of the archived WAL (P is past the newest WAL known on
its line), a timeline never used, T's last segment (at a promotion it exists only as ``.partial``),
or the next timeline's history file probed for. WAL of other timelines (an ancestor that went on after
a branch, a sibling) says nothing about whether T reached P, so it is no evidence.

Pure (standard library, ``wal.names``, ``wal.index`` types): ``wal.archive`` gathers the known WAL.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from backup_tasks.wal.index import TimelineRuns
from backup_tasks.wal.names import kind_of, position, segment_number, timeline_of

#: The file is provably not archived (exit 1).
ABSENT = "absent"
#: Known WAL shows it existed: a gap (exit 200).
GAP = "gap"
#: A location that could hold it did not answer (exit 200).
UNPROVEN = "unproven"


class Known(NamedTuple):
    """The WAL known to exist (see the module docstring)."""

    #: Segments of every location that answered, as runs per timeline (``wal.index``).
    runs: TimelineRuns
    #: Per timeline with a known history file: its ``(parent, switch LSN)`` entries (``timelines.parse_history``);
    #: None when it could not be read.
    histories: dict[int, list[tuple[int, int]] | None]
    #: The newest segment per location that wal-push recorded (``wal.state``).
    recorded: tuple[str, ...] = ()
    #: Every location answered (no copy configured, or the copy could be listed).
    complete: bool = True
    #: The first segment of each later generation (``wal.system``: a major upgrade's new system), any order.
    boundaries: tuple[str, ...] = ()


class Verdict(NamedTuple):
    outcome: str  # ABSENT, GAP or UNPROVEN
    reason: str  # why, for the message ("" when there is nothing to add)


def judge(name: str, known: Known, segment_size: Callable[[], int | None]) -> Verdict:
    """Whether ``name``, which no location returned, is provably not archived.

    ``segment_size``: the archive's segment size (one archived segment's trailer), asked only when a
    history's switch position must be compared with a segment; None when no segment can tell.
    """
    kind = kind_of(name)
    if kind == "history":
        evidence = _history_evidence(timeline_of(name), known)
    elif kind == "segment":
        evidence = _segment_evidence(name, known, segment_size)
    else:
        evidence = None
    if evidence is not None:
        return Verdict(GAP if known.complete else UNPROVEN, evidence)
    if kind not in ("history", "segment") and not known.complete:
        return Verdict(UNPROVEN, "")
    return Verdict(ABSENT, "")


def _history_evidence(timeline: int, known: Known) -> str | None:
    later = sorted({*(t for t in known.runs if t >= timeline and known.runs[t]),
                    *(t for t in known.histories if t > timeline),
                    *(timeline_of(s) for s in known.recorded if timeline_of(s) >= timeline)})
    if timeline == 1 or not later:
        return None
    return (f"WAL of timeline {later[-1]} is archived, and every timeline's history file is archived before its "
            f"first segment: the history of timeline {timeline} was lost, and recovery would miss that timeline "
            f"and every one after it")


def newest_position(runs: TimelineRuns, timeline: int, below: str | None = None) -> str | None:
    """The position (``names.position``) of the newest segment of ``timeline`` in ``runs`` (before ``below``)."""
    best: str | None = None
    for log_id, first, last in runs.get(timeline) or ():
        newest = f"{log_id:08X}{last:08X}"
        if below is not None and newest >= below:
            if f"{log_id:08X}{first:08X}" >= below:
                continue  # the whole run is past the limit
            newest = f"{log_id:08X}{int(below[8:], 16) - 1:08X}"  # the run crosses it: the limit is in this log id
        best = newest if best is None or newest > best else best
    return best


def generation_limit(name: str, known: Known) -> str | None:
    """The position where the next generation after ``name``'s begins (``Known.boundaries``), or None."""
    here = position(name)
    return min((position(b) for b in known.boundaries if position(b) > here), default=None)


def departures(timeline: int, known: Known) -> dict[int, int]:
    """Each known timeline descending from ``timeline``, with the switch LSN where its line left ``timeline``."""
    found = {}
    for descendant, entries in known.histories.items():
        lsn = next((lsn for parent, lsn in entries or () if parent == timeline), None)
        if descendant != timeline and lsn is not None:
            found[descendant] = lsn
    return found


def _segment_evidence(name: str, known: Known, segment_size: Callable[[], int | None]) -> str | None:
    timeline, here = timeline_of(name), position(name)
    limit = generation_limit(name, known)  # WAL from here on is a later system's: no word on this one's
    newest = newest_position(known.runs, timeline, limit)
    if newest is not None and newest > here:
        return f"later segments of its timeline are archived (up to {timeline:08X}{newest})"
    recorded = sorted((s for s in known.recorded if timeline_of(s) == timeline and position(s) >= here
                       and (limit is None or position(s) < limit)), key=position)
    if recorded:
        return f"wal-push recorded {recorded[-1]} as archived (wal.state), which is not before it on its timeline"
    branches = departures(timeline, known)
    size = segment_size() if branches else None
    for descendant, lsn in sorted(branches.items()):
        if not size or lsn // size <= segment_number(name, size):
            continue  # it left this timeline at or before this segment: no word on whether this one existed
        if limit is not None and lsn // size >= segment_number(f"{timeline:08X}{limit}", size):
            continue  # it branched from a later system's WAL
        if known.runs.get(descendant) or any(timeline_of(s) == descendant for s in known.recorded):
            return (f"timeline {descendant}, which branched from timeline {timeline} after this segment (at "
                    f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}), is archived: timeline {timeline} went past it (a gap "
                    f"before a timeline switch)")
    return None
