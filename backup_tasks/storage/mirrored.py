"""``BACKUP_DIR`` plus ``BACKUP_COPY_TO`` as one storage.

Every finished backup, manifest and record goes to both, in the same relative layout, in the order
the catalog's ``copies.BACKUPS`` policy states (the copy first; taken back when the primary then
fails): ``TeeWriter`` tees one stream into two writers and publishes in both or neither, ``put_new``
and ``put_bytes`` go through ``copies.Mirror``. Reads prefer the primary and fall back to the copy
when an object is missing or unreadable there; ``list`` is the union.

A key is taken when either location holds it (as ``exists`` says): ``put_new`` creates it in the
copy first, create-only, so the copy decides a race between two writers; then in the primary,
create-only too. If the primary already holds the key (or fails), the object just created in the
copy is deleted again and the answer is False (or the error): no writer overwrites anything, and an
object is never left in one location only because of ``put_new``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import BinaryIO, TypeVar

from backup_tasks.errors import ConfigError, ObjectMissing, StorageError
from backup_tasks.storage.base import Features, ObjectInfo, ObjectWriter, Storage
from backup_tasks.storage.copies import BACKUPS, Mirror
from backup_tasks.storage.integrity import holders

log = logging.getLogger(__name__)

T = TypeVar("T")


class TeeWriter:
    """Writes one stream to two locations; commit publishes in both or in neither (in the mirror's order)."""

    def __init__(self, primary: ObjectWriter, copy: ObjectWriter, *, key: str, mirror: Mirror) -> None:
        self.primary = primary
        self.copy = copy
        self.key = key
        self.mirror = mirror
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
        # In the policy's order (the copy first): if the second then fails, the first is taken back;
        # either way no location keeps an object the other lacks, and a manifest is only written after both.
        assert self.mirror.copy is not None
        first, second = self.mirror.in_order(self.primary, self.copy)
        first_location, second_location = self.mirror.in_order(self.mirror.primary, self.mirror.copy)
        try:
            first.commit()
        except BaseException:
            self._closed = True
            second.abort()
            raise
        try:
            second.commit()
        except BaseException:
            self._closed = True
            self.mirror.take_back(first_location, self.key, f"the write to {second_location.location} failed")
            raise
        self._closed = True

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
        self.mirror = Mirror(primary, copy, BACKUPS)

    @property
    def features(self) -> Features:
        """Read-only when either is (writes go to both), locked when either may refuse a delete."""
        primary, copy = self.primary.features, self.copy.features
        return Features(read_only=primary.read_only or copy.read_only,
                        object_lock=primary.object_lock or copy.object_lock,
                        versioned=primary.versioned and copy.versioned)

    def writer(self, key: str) -> TeeWriter:
        primary = self.primary.writer(key)
        try:
            copy = self.copy.writer(key)
        except BaseException:
            primary.abort()
            raise
        return TeeWriter(primary, copy, key=key, mirror=self.mirror)

    def _read(self, key: str, read: Callable[[Storage], T]) -> T:
        # Missing, or the primary location itself broken (a dead disk is what the copy is for).
        try:
            return read(self.primary)
        except StorageError as primary_error:
            log.warning("cannot read %s from %s (%s); reading it from %s", key, self.primary.location,
                        primary_error, self.copy.location)
            try:
                return read(self.copy)
            except StorageError as copy_error:
                # "Missing" only when it is missing in both; otherwise say why it cannot be read.
                if isinstance(primary_error, ObjectMissing) and not isinstance(copy_error, ObjectMissing):
                    raise copy_error from None
                raise primary_error from None

    def open(self, key: str) -> BinaryIO:
        return self._read(key, lambda member: member.open(key))

    def read_bytes(self, key: str) -> bytes:
        with self.open(key) as fh:
            return fh.read()

    def read_tail(self, key: str, count: int) -> bytes:
        return self._read(key, lambda member: member.read_tail(key, count))

    def put_bytes(self, key: str, data: bytes) -> None:
        self.mirror.put_bytes(key, data)

    def put_new(self, key: str, data: bytes) -> bool:
        """Create ``key`` in both locations unless either holds it (see the module docstring)."""
        return self.mirror.put_new(key, data).stored

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
        # Both, even when one fails: then raise what both said (see ``copies.combined``).
        self.mirror.delete(key)

    def delete_many(self, keys: Iterable[str]) -> dict[str, StorageError]:
        """Batched deletes in both locations, even when one fails: failures of either, then the first error raised."""
        return self.mirror.delete_many(keys)

    def retention(self, key: str) -> datetime | None:
        """The later of the two locations' locks: the key is gone from both only after it."""
        dates = [found for member in self.members if (found := member.retention(key)) is not None]
        return max(dates) if dates else None

    def clear_partials(self, prefix: str = "") -> list[str]:
        return [*self.primary.clear_partials(prefix), *self.copy.clear_partials(prefix)]

    def holders(self, key: str) -> list[str]:
        return holders(self.members, key)
