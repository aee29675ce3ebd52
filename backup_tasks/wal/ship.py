"""The catch-up shipper: the copy's backlog (``wal.backlog``) sent to ``<BACKUP_COPY_TO>/wal``.

Three callers, one function (``ship``): ``backup-tasks wal-ship`` (the operator's, and the test's),
the worker's beat task ``backup_tasks.wal_ship`` (every minute), and ``wal-push`` itself when the copy
may answer again (``wal.pushahead``: for a moment, so the server never waits long).

The promises, the same as ``wal-push``'s own copy:

- **In WAL order**: history files, then by name; a few puts overlap (``THREADS``), submitted in that
  order. The state file's copy entry (``wal.state``, what the lag alert watches) moves only to the
  end of the run of files shipped without a hole, so it never claims more than the copy holds.
- **Create-only, checked**: each file is read back from the archive and checked first (its trailer;
  unencrypted objects are decompressed against its sha256 too), then put create-only with the
  WAL's rule (``WalArchive.copy_object``): the same object there already is fine, a damaged one is
  replaced, other content is a ``WalConflict`` (reported, its entry kept). A file gone from the
  archive (WAL expiry) has nothing left to ship: its entry is dropped.
- **One shipper at a time**: under the backlog's ``flock``; a second one returns at once (``busy``)
  or after ``lock_wait``. Even without the lock, puts are create-only: nothing is sent twice into
  a different object, nothing is overwritten.
- **Bounded**: each put is given ``put_timeout`` seconds; the first failure of the copy (down,
  refusing, too slow) stops the run and is noted (``Backlog.note_failure``). No new put starts
  after ``until``.

Part of the per-segment fast path (``wal-push`` ships a little): no settings, no Celery.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from backup_tasks.errors import BackupError, ObjectMissing, StorageError, WalConflict, WalCorrupt
from backup_tasks.storage.copies import Outcome
from backup_tasks.wal import state
from backup_tasks.wal.archive import WalArchive
from backup_tasks.wal.backlog import COPY_TIMEOUT, EMPTY, Backlog, BacklogCount
from backup_tasks.wal.layout import object_key
from backup_tasks.wal.names import SEGMENT_RE
from backup_tasks.wal.objects import AGE_MAGIC, TRAILER_SIZE, Trailer, parse_trailer, verified_chunks

log = logging.getLogger(__name__)

#: Puts in flight at once (as push-ahead's threads): the copy's round trips overlap.
THREADS = 4
#: How long ``wal-ship`` and the beat task wait for another shipper (a wal-push ships for a few seconds at most).
LOCK_WAIT = 15.0


@dataclass
class ShipReport:
    """What one run did (``wal-ship --json``, the beat task's result)."""

    copy: str | None  # the copy location, None: no copy configured (nothing to ship to)
    shipped: list[str] = field(default_factory=list)  # put into the copy now
    already_there: list[str] = field(default_factory=list)  # the copy held them already
    expired: list[str] = field(default_factory=list)  # gone from the archive (WAL expiry): nothing to ship
    failed: dict[str, str] = field(default_factory=dict)  # name -> why (damaged here, other content there)
    error: str | None = None  # the copy failed: the run stopped there
    busy: bool = False  # another shipper holds the lock
    bytes: int = 0  # sent
    seconds: float = 0.0
    remaining: BacklogCount = EMPTY  # what the copy still lacks

    @property
    def ok(self) -> bool:
        """Nothing left behind: the copy holds everything the archive queued for it."""
        return self.remaining.files == 0 and not self.failed and self.error is None

    def to_dict(self) -> dict[str, Any]:
        now = time.time()
        document = {"ok": self.ok, **asdict(self)}
        document["remaining"] = {**asdict(self.remaining), "age_seconds": round(self.remaining.age_seconds(now), 3)}
        return document


class _Local(Exception):
    """The archive's side failed for one file (unreadable, damaged): that file's problem, not the copy's."""


def ship(archive: WalArchive, *, put_timeout: float, until: float | None = None, lock_wait: float = 0.0,
         threads: int = THREADS) -> ShipReport:
    """Send the backlog of ``archive`` (a local archive with a copy) to its copy; see the module docstring.

    ``until``: a ``time.monotonic()`` after which no new put starts (None: until the backlog is empty).
    """
    started = time.monotonic()
    copy = archive.copy
    report = ShipReport(copy=copy.location if copy is not None else None)
    if archive.root is None:
        return report
    backlog = Backlog(archive.root)
    try:
        if copy is not None and backlog.pending():
            with backlog.shipping(wait=lock_wait) as held:
                if not held:
                    report.busy = True
                else:
                    _ship_held(archive, backlog, report, put_timeout=put_timeout, until=until, threads=threads)
        report.remaining = backlog.count()  # without a copy given here: what waits for one
    except OSError as exc:  # the backlog's own directory (permissions, a full disk for its lock)
        report.error = f"cannot use the copy's backlog in {backlog.directory}: {exc.strerror or exc}"
    report.seconds = round(time.monotonic() - started, 3)
    return report


def ship_to_copy(archive: WalArchive, *, put_timeout: float | None = None,
                 for_seconds: float | None = None) -> ShipReport:
    """``wal-ship`` and the beat task: the whole backlog (no new put after ``for_seconds``), waiting for a
    shipper that holds the lock; each put gets ``put_timeout`` seconds (None: ``backlog.COPY_TIMEOUT``)."""
    return ship(archive, put_timeout=put_timeout or COPY_TIMEOUT, lock_wait=LOCK_WAIT,
                until=None if for_seconds is None else time.monotonic() + for_seconds)


def _ship_held(archive: WalArchive, backlog: Backlog, report: ShipReport, *, put_timeout: float,
               until: float | None, threads: int) -> None:
    order: list[str] = []  # every file this run attempted, in the order submitted
    attempted: set[str] = set()
    done: dict[str, Trailer | None] = {}  # attempted files the copy now holds (or that left the archive)
    in_flight: deque[tuple[str, Future[tuple[Outcome | None, Trailer | None, int]]]] = deque()

    def settle_oldest() -> None:
        name, future = in_flight.popleft()
        try:
            outcome, trailer, size = future.result()
        except _Local as exc:
            report.failed[name] = str(exc)
            return
        except WalConflict as exc:
            report.failed[name] = str(exc)
            return
        except (BackupError, OSError) as exc:  # the copy refused, did not answer, or cannot be used: stop here
            report.error = report.error or str(exc)
            return
        done[name] = trailer
        if trailer is None:
            report.expired.append(name)
        elif outcome is Outcome.HELD:
            report.already_there.append(name)
        else:
            report.shipped.append(name)
            report.bytes += size

    backlog.clear_temporaries(time.time() - 3600)  # what a killed wal-push left while queueing
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="wal-ship")
    try:
        while report.error is None:
            fresh = [name for name in backlog.names() if name not in attempted]
            if not fresh or (until is not None and time.monotonic() > until):
                break
            for name in fresh:  # wal-push may queue more meanwhile: listed again until none are new
                if report.error is not None or (until is not None and time.monotonic() > until):
                    break
                order.append(name)
                attempted.add(name)
                in_flight.append((name, pool.submit(_ship_one, archive, backlog, name, put_timeout)))
                while len(in_flight) >= threads:
                    settle_oldest()
            while in_flight:
                settle_oldest()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # each put is bounded: this waits put_timeout at most
        while in_flight:  # cancelled before they started, or finished meanwhile
            name, future = in_flight.popleft()
            if future.done() and not future.cancelled() and future.exception() is None:
                done[name] = future.result()[1]
    if report.error is not None:
        backlog.note_failure(report.error)
        log.warning("backup-tasks: the WAL copy %s did not take the backlog (%d files shipped before): %s",
                    report.copy, len(report.shipped), report.error)
    elif not backlog.pending():
        backlog.clear_failure()
    _record_copy(archive, order, done)


def _ship_one(archive: WalArchive, backlog: Backlog, name: str,
              put_timeout: float) -> tuple[Outcome | None, Trailer | None, int]:
    """One file from the archive into the copy: (what the copy did, its trailer, bytes); (None, None, 0) when the
    archive no longer holds it. Its entry is removed once the copy holds it."""
    try:
        data = archive.primary.read_bytes(object_key(name))
    except ObjectMissing:
        backlog.remove(name)  # expired (or removed by hand) since it was queued: nothing to ship
        return None, None, 0
    except (StorageError, OSError) as exc:
        raise _Local(f"cannot read {name} in the archive {archive.location}: {exc}") from None
    trailer = checked(data, name, archive)
    outcome = archive.copy_object(name, data, within=put_timeout)
    backlog.remove(name)
    return outcome, trailer, len(data)


def checked(data: bytes, name: str, archive: WalArchive) -> Trailer:
    """The trailer of the archived object ``data``; ``_Local`` when the object is damaged.

    An unencrypted object (or one the archive's identity file opens) is decompressed and compared
    with its trailer's size and sha256: the copy must never receive a damaged object as a good one.
    """
    try:
        trailer = parse_trailer(data[-TRAILER_SIZE:], f"archived {name}")
        if data.startswith(AGE_MAGIC) and archive.identity_file is None:
            return trailer  # encrypted, and no key here: the trailer is what can be checked
        for _chunk in verified_chunks(io.BytesIO(data), len(data), name, hashlib.sha256(),
                                      identity_file=archive.identity_file):
            pass
        return trailer
    except WalCorrupt as exc:
        raise _Local(f"{exc}: not shipped; restore it from a good copy (or remove it) and ship again") from None
    except BackupError as exc:  # an identity file that does not open it, say: this file is not shipped
        raise _Local(f"cannot check archived {name} before shipping it: {exc}") from None


def _record_copy(archive: WalArchive, order: list[str], done: dict[str, Trailer | None]) -> None:
    """Move the state file's copy entry to the newest segment of the run shipped without a hole."""
    newest: tuple[str, Trailer] | None = None
    for name in order:
        if name not in done:
            break
        trailer = done[name]
        if trailer is not None and SEGMENT_RE.match(name):
            newest = (name, trailer)
    if newest is None or archive.root is None or archive.copy is None:
        return
    state.record(archive.root, newest[0], newest[1].completed_at, copy_where=archive.copy.location, copy_stored=True)
