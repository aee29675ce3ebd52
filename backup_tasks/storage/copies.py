"""A primary location and its copy kept together: one policy, for the catalog and the WAL archive alike.

Two things keep a second location (``BACKUP_COPY_TO``): the catalog (``mirrored.MirroredStorage``:
backups, manifests and their records) and the WAL archive (``wal.archive.WalArchive``: segments,
history files, restore point records). Both write each object to both locations and delete it
from both, but each needs its own order, stated here and nowhere else (``CopyPolicy``):

- ``BACKUPS``: the copy first. When the primary then fails (or holds the key already), what was
  just created in the copy is taken back: no location keeps an object the other lacks, and a
  manifest is written only once its data is in both. Deletes go to both, each whatever the other
  says: the catalog lists the union of the two, so what either kept is found by the next prune.
- ``WAL``: the primary first: the local archive is what makes a segment durable, and
  archive_command waits for that answer; the copy follows, and nothing is ever taken back from the
  primary. Deletes go to the copy first, and to the primary only for what the copy let go
  (``DELETE_BATCH`` keys at a time): WAL expiry lists the primary alone, so an interrupted or refused
  delete leaves the primary's file for the next run, never a copy that nobody lists any more.

``Mirror`` applies a policy to a primary and an optional copy. ``put_new`` creates an object in
both, create-only in each; where a location holds the key already, ``settle`` says what that means:
by default the key is taken (nothing written, ``Outcome.TAKEN``); the WAL's rule reads the object's
checksum trailer (the same object: fine; a damaged one: replaced; another: a conflict, raised, and
the object left untouched). Where the first location held an equal object, the second gets that
object byte for byte, so both hold the same bytes.

The WAL's copy is written within a bound: ``copy_new(..., within=seconds)`` runs the write in a
daemon thread (``bounded``) and gives up waiting after that long with ``StorageUnavailable``. A
bucket that hangs (no answer, boto3 waiting out its own timeouts and retries, up to minutes) then
holds ``wal-push`` only that long, and a daemon thread never keeps the process alive: the abandoned
write dies with it (a bucket publishes an object whole or not at all; a directory leaves a partial
file that ``clear_partials`` removes). What the copy did not take is the WAL's backlog
(``wal.backlog``), which a shipper drains (``wal.ship``), so that the primary never waits on it.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, NamedTuple, TypeVar

from backup_tasks.errors import ObjectLocked, StorageError, StorageUnavailable
from backup_tasks.storage.base import Storage

if TYPE_CHECKING:
    from concurrent.futures import Future

log = logging.getLogger(__name__)

#: Keys per step of a copy-first ``delete_many``: an interruption leaves at most this many keys deleted
#: from the copy but not yet from the primary (which the next run, listing the primary, deletes again).
DELETE_BATCH = 1000

T = TypeVar("T")


class CopyPolicy(NamedTuple):
    """In what order a primary and its copy are written and deleted (see the module docstring).

    (NamedTuples here, not dataclasses: cheaper to define, on wal-push's path once per segment.)
    """

    name: str
    #: Writes go to the copy first (else to the primary first).
    copy_first: bool
    #: A write the second location fails (or finds taken) takes back what the first one just created.
    take_back: bool
    #: Deletes go to the copy first, then to the primary for what the copy let go (else to both, each
    #: whatever the other says).
    delete_copy_first: bool


#: The catalog: the copy first and taken back on failure; deletes in both.
BACKUPS = CopyPolicy("backups", copy_first=True, take_back=True, delete_copy_first=False)
#: The WAL archive: the primary first (it makes a segment durable), never taken back; deletes copy first.
WAL = CopyPolicy("wal", copy_first=False, take_back=False, delete_copy_first=True)


class Outcome(enum.Enum):
    """What a create-only write found and did in one location."""

    CREATED = "created"  # written now
    HELD = "held"  # the location held this very object already (as ``settle`` judged it)
    REPLACED = "replaced"  # the location held a damaged object under the key: replaced by this one
    TAKEN = "taken"  # another object holds the key: left untouched, nothing written


#: ``settle(location, key, data)``: what the object already under ``key`` in ``location`` means for a
#: write of ``data``: ``HELD``, ``REPLACED`` (replace it) or ``TAKEN``; or it raises (a conflict).
Settle = Callable[[Storage, str, bytes], Outcome]


def taken(location: Storage, key: str, data: bytes) -> Outcome:
    """The default rule: whatever holds the key already, the key is taken."""
    return Outcome.TAKEN


class Written(NamedTuple):
    """What ``Mirror.put_new`` did in each location (None: no copy, or not tried after the first was taken)."""

    primary: Outcome | None
    copy: Outcome | None

    @property
    def stored(self) -> bool:
        """Both locations (or the primary alone, without a copy) hold the object now."""
        return self.primary is not None and Outcome.TAKEN not in (self.primary, self.copy)


def bounded(call: Callable[[], T], seconds: float, what: str) -> T:
    """``call()``'s result, or ``StorageUnavailable`` naming ``what`` when it has not returned within ``seconds``.

    It runs in a daemon thread: a call that hangs is abandoned, still running, and never keeps the
    process from exiting. Its exceptions are raised here as they were raised there.
    """
    from concurrent.futures import Future  # a wal-push acknowledged from a marker never waits

    future: Future[T] = Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(call())
        except BaseException as exc:  # handed to the waiting thread, which raises it
            future.set_exception(exc)

    threading.Thread(target=run, name="bounded-copy", daemon=True).start()
    try:
        return future.result(timeout=seconds)
    except TimeoutError:  # concurrent.futures' is the builtin since Python 3.11
        raise StorageUnavailable(f"{what}: no answer within {seconds:g} s") from None


def combined(first: StorageError | None, second: StorageError) -> StorageError:
    """One failure for a key both locations failed to delete: a real failure outranks a lock, a later lock an earlier.

    A lock is an expected state (retry after the date); when one location holds the key for another
    reason, that reason is what the caller must see.
    """
    if first is None:
        return second
    if isinstance(first, ObjectLocked) and isinstance(second, ObjectLocked):
        return first if first.retain_until >= second.retain_until else second
    if isinstance(first, ObjectLocked):
        return second
    if isinstance(second, ObjectLocked):
        return first
    return type(first)(f"{first}; {second}")


class Mirror:
    """A primary location and an optional copy, written and deleted together by ``policy``."""

    def __init__(self, primary: Storage, copy: Storage | None, policy: CopyPolicy) -> None:
        self.primary = primary
        self.copy = copy
        self.policy = policy

    @property
    def members(self) -> tuple[Storage, ...]:
        return (self.primary,) if self.copy is None else (self.primary, self.copy)

    def in_order(self, primary: T, copy: T) -> tuple[T, T]:
        """``(primary, copy)`` (things of either location: writers, say) in the order writes go."""
        return (copy, primary) if self.policy.copy_first else (primary, copy)

    def take_back(self, location: Storage, key: str, why: str) -> None:
        """Remove what was just created in ``location`` when the policy says so (a failure is only logged)."""
        if not self.policy.take_back:
            return
        try:
            location.delete(key)
        except Exception as exc:
            log.warning("could not remove %s from %s after %s: %s", key, location.location, why, exc)

    # --- writes ----------------------------------------------------------------------------------------

    def put_new(self, key: str, data: bytes, *, settle: Settle = taken) -> Written:
        """Create ``key`` in each location, create-only, in the policy's order (see the module docstring)."""
        if self.copy is None:
            return Written(self._put_new_in(self.primary, key, data, settle), None)
        first, second = self.in_order(self.primary, self.copy)
        got_first = self._put_new_in(first, key, data, settle)
        if got_first is Outcome.TAKEN:
            return self._written(first, got_first, None)
        if got_first is Outcome.HELD:
            data = first.read_bytes(key)  # the second gets what the first holds, byte for byte
        created_first = got_first is Outcome.CREATED
        try:
            got_second = self._put_new_in(second, key, data, settle)
        except BaseException:
            if created_first:
                self.take_back(first, key, f"it could not be created in {second.location}")
            raise
        if got_second is Outcome.TAKEN and created_first:
            self.take_back(first, key, f"{second.location} already held it")
        return self._written(first, got_first, got_second)

    def primary_new(self, key: str, data: bytes, *, settle: Settle = taken) -> Outcome:
        """The primary's part of ``put_new`` alone: for a caller that then puts into the copy exactly what it
        reads back from the primary (``copy_new``: WAL push-ahead, whose markers describe that object)."""
        return self._put_new_in(self.primary, key, data, settle)

    def copy_new(self, key: str, data: bytes, *, settle: Settle = taken, within: float | None = None) -> Outcome | None:
        """The copy's part of ``put_new`` alone (None without a copy); see ``primary_new``.

        ``within``: seconds the copy is given (``bounded``), else ``StorageUnavailable``; None: no bound of ours.
        """
        copy = self.copy
        if copy is None:
            return None
        if within is None:
            return self._put_new_in(copy, key, data, settle)
        return bounded(lambda: self._put_new_in(copy, key, data, settle), within, f"writing {key} to {copy.location}")

    def _put_new_in(self, location: Storage, key: str, data: bytes, settle: Settle) -> Outcome:
        if location.put_new(key, data):
            return Outcome.CREATED
        found = settle(location, key, data)
        if found is Outcome.REPLACED:
            location.put_bytes(key, data)
        return found

    def _written(self, first: Storage, got_first: Outcome, got_second: Outcome | None) -> Written:
        return Written(got_first, got_second) if first is self.primary else Written(got_second, got_first)

    def put_bytes(self, key: str, data: bytes) -> None:
        """Write (or replace) a small object in each location, in the policy's order."""
        for location in self.in_order(self.primary, self.copy) if self.copy is not None else (self.primary,):
            location.put_bytes(key, data)

    # --- deletes ---------------------------------------------------------------------------------------

    def delete(self, key: str) -> None:
        """Delete ``key`` everywhere, in the policy's order; raises what a location refused (``combined``)."""
        if self.copy is not None and self.policy.delete_copy_first:
            self.copy.delete(key)  # raises: the primary keeps it, for the next run to find
            self.primary.delete(key)
            return
        failure: StorageError | None = None
        for member in self.members:
            try:
                member.delete(key)
            except StorageError as exc:
                failure = combined(failure, exc)
        if failure is not None:
            raise failure

    def delete_many(self, keys: Iterable[str]) -> dict[str, StorageError]:
        """``delete_many`` in every location, in the policy's order: ``{key: error}`` of what some location kept.

        A failure of a location as a whole raises: copy first, at once (the primary keeps the batch);
        in both, after both were tried (the first error).
        """
        wanted = list(dict.fromkeys(keys))
        failures: dict[str, StorageError] = {}
        if self.copy is not None and self.policy.delete_copy_first:
            for start in range(0, len(wanted), DELETE_BATCH):
                batch = wanted[start:start + DELETE_BATCH]
                failures.update(self.copy.delete_many(batch))
                failures.update(self.primary.delete_many([key for key in batch if key not in failures]))
            return failures
        failure: StorageError | None = None
        for member in self.members:
            try:
                for key, error in member.delete_many(wanted).items():
                    failures[key] = combined(failures.get(key), error)
            except StorageError as exc:
                failure = failure or exc
        if failure is not None:
            raise failure
        return failures
