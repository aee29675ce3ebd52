"""``BACKUP_DIR`` plus ``BACKUP_COPY_TO`` as one storage.

Every finished backup, manifest and WAL segment goes to both, in the same relative layout
(``TeeWriter`` tees one stream into two writers and publishes in both or neither). Reads prefer the
primary and fall back to the copy when an object is missing or unreadable there; ``list`` is the union.

A key is taken when either location holds it (as ``exists`` says). ``put_new`` creates the object
in the copy first, create-only, so the copy decides a race between two writers; then in the primary,
create-only too. If the primary already holds the key (or fails), the object just created in the copy
is deleted again and the answer is False (or the error): no writer overwrites anything, and an object
is never left in one location only because of ``put_new``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime
from typing import BinaryIO

from backup_tasks.errors import ConfigError, ObjectLocked, ObjectMissing, StorageError
from backup_tasks.storage.base import ObjectInfo, ObjectWriter, Storage
from backup_tasks.storage.integrity import (
    holders,
)

log = logging.getLogger(__name__)


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


class TeeWriter:
    """Writes one stream to two locations; commit publishes in both or in neither."""

    def __init__(self, primary: ObjectWriter, copy: ObjectWriter, *, key: str, copy_location: str) -> None:
        self.primary = primary
        self.copy = copy
        self.key = key
        self.copy_location = copy_location
        self.bytes_written = 0
        self._closed = False

    def write(self, data: bytes) -> None:
        try:
            self.primary.write(data)
            self.copy.write(data)
        except BaseException:
            self.abort()
            raise
        self.bytes_written += len(data)

    def commit(self) -> None:
        # The copy first: if the primary then fails, the copy is deleted again; either way no location
        # keeps an object the other lacks, and a manifest is only written after both succeeded.
        try:
            self.copy.commit()
        except BaseException:
            self._closed = True
            self.primary.abort()
            raise
        try:
            self.primary.commit()
        except BaseException:
            self._closed = True
            self._after_primary_failed()
            raise
        self._closed = True

    def _after_primary_failed(self) -> None:
        delete = getattr(self, "delete_copy", None)
        if delete is not None:
            try:
                delete()
            except Exception as exc:
                log.warning("could not remove %s from %s after the primary write failed: %s",
                            self.key, self.copy_location, exc)

    def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        for writer in (self.primary, self.copy):
            try:
                writer.abort()
            except Exception:
                pass

    def __enter__(self) -> TeeWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if not self._closed:
            self.abort()


class MirroredStorage:
    """``BACKUP_DIR`` plus ``BACKUP_COPY_TO`` behind the ``Storage`` interface.

    Writes and deletes go to both. Reads come from the primary, or from the copy when the
    primary lacks the object (checksum fallback needs the manifest: see ``first_good``). ``list``
    is the union, each key once.
    """

    def __init__(self, primary: Storage, copy: Storage) -> None:
        if primary.location == copy.location:
            raise ConfigError(f"BACKUP_COPY_TO must name a different location than BACKUP_DIR ({copy.location})")
        self.primary = primary
        self.copy = copy
        self.location = primary.location
        self.members: tuple[Storage, ...] = (primary, copy)

    def writer(self, key: str) -> TeeWriter:
        primary = self.primary.writer(key)
        try:
            copy = self.copy.writer(key)
        except BaseException:
            primary.abort()
            raise
        tee = TeeWriter(primary, copy, key=key, copy_location=self.copy.location)
        tee.delete_copy = lambda: self.copy.delete(key)  # type: ignore[attr-defined]
        return tee

    def open(self, key: str) -> BinaryIO:
        # Missing, or the primary location itself broken (a dead disk is what the copy is for).
        try:
            return self.primary.open(key)
        except StorageError as primary_error:
            log.warning("cannot read %s from %s (%s); reading it from %s", key, self.primary.location,
                        primary_error, self.copy.location)
            try:
                return self.copy.open(key)
            except StorageError as copy_error:
                # "Missing" only when it is missing in both; otherwise say why it cannot be read.
                if isinstance(primary_error, ObjectMissing) and not isinstance(copy_error, ObjectMissing):
                    raise copy_error from None
                raise primary_error from None

    def read_bytes(self, key: str) -> bytes:
        with self.open(key) as fh:
            return fh.read()

    def put_bytes(self, key: str, data: bytes) -> None:
        self.copy.put_bytes(key, data)
        self.primary.put_bytes(key, data)

    def put_new(self, key: str, data: bytes) -> bool:
        """Create ``key`` in both locations unless either holds it (see the module docstring)."""
        if not self.copy.put_new(key, data):
            return False
        try:
            created = self.primary.put_new(key, data)
        except BaseException:
            self._undo_copy(key)
            raise
        if not created:
            self._undo_copy(key)
        return created

    def _undo_copy(self, key: str) -> None:
        try:
            self.copy.delete(key)
        except Exception as exc:
            log.warning("could not remove %s from %s after it could not be created in %s: %s", key,
                        self.copy.location, self.primary.location, exc)

    def exists(self, key: str) -> bool:
        return self.primary.exists(key) or self.copy.exists(key)

    def size(self, key: str) -> int:
        try:
            return self.primary.size(key)
        except ObjectMissing:
            return self.copy.size(key)

    def list(self, prefix: str = "", *, recursive: bool = True) -> list[ObjectInfo]:
        seen = {obj.key: obj for obj in self.copy.list(prefix, recursive=recursive)}
        seen.update({obj.key: obj for obj in self.primary.list(prefix, recursive=recursive)})
        return sorted(seen.values(), key=lambda o: o.key)

    def delete(self, key: str) -> None:
        # Both, even when one fails: then raise what both said (see ``combined``).
        failure: StorageError | None = None
        for member in self.members:
            try:
                member.delete(key)
            except StorageError as exc:
                failure = combined(failure, exc)
        if failure is not None:
            raise failure

    def delete_many(self, keys: Iterable[str]) -> dict[str, StorageError]:
        """Batched deletes in both locations, even when one fails: failures of either, then the first error raised."""
        wanted = list(dict.fromkeys(keys))
        failures: dict[str, StorageError] = {}
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

    def retention(self, key: str) -> datetime | None:
        """The later of the two locations' locks: the key is gone from both only after it."""
        dates = [found for member in self.members if (found := member.retention(key)) is not None]
        return max(dates) if dates else None

    def clear_partials(self, prefix: str = "") -> list[str]:
        return [*self.primary.clear_partials(prefix), *self.copy.clear_partials(prefix)]

    def holders(self, key: str) -> list[str]:
        return holders(self.members, key)


