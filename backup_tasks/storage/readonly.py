"""Any location opened so that it is only read: writes and deletes raise ``StorageReadOnly``.

A restore from the bucket alone (disaster recovery: ``wal-fetch --archive-url``, the WAL of a
``BACKUP_DIR`` that is a URL, ``--as-of``) reads a location that must not change under it, whatever
the credentials at hand would allow. ``locations.open_storage(..., read_only=True)`` wraps the driver
in ``ReadOnlyStorage``: reads pass through, ``features.read_only`` is True, and every write or
delete is refused before it reaches the location.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime
from typing import BinaryIO, NoReturn

from backup_tasks.errors import StorageError, StorageReadOnly
from backup_tasks.storage.base import Features, ObjectInfo, ObjectWriter, Storage


class ReadOnlyStorage:
    """``inner`` behind the ``Storage`` interface, reads only; ``why`` says in refusals why it is read-only."""

    def __init__(self, inner: Storage, why: str = "opened read-only") -> None:
        self.inner = inner
        self.why = why
        self.location = inner.location

    @property
    def features(self) -> Features:
        return replace(self.inner.features, read_only=True)

    def _refuse(self, action: str, key: str | None = None) -> NoReturn:
        raise StorageReadOnly(f"{self.location} is {self.why}: refusing {action} {key if key is not None else 'it'}")

    # --- reads pass through ----------------------------------------------------------------------------

    def open(self, key: str) -> BinaryIO:
        return self.inner.open(key)

    def read_bytes(self, key: str) -> bytes:
        return self.inner.read_bytes(key)

    def read_tail(self, key: str, count: int) -> bytes:
        return self.inner.read_tail(key, count)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def size(self, key: str) -> int:
        return self.inner.size(key)

    def list(self, prefix: str = "", *, recursive: bool = True) -> list[ObjectInfo]:
        return self.inner.list(prefix, recursive=recursive)

    def retention(self, key: str) -> datetime | None:
        return self.inner.retention(key)

    # --- writes and deletes are refused ----------------------------------------------------------------

    def writer(self, key: str) -> ObjectWriter:
        self._refuse("writing", key)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._refuse("writing", key)

    def put_new(self, key: str, data: bytes) -> bool:
        self._refuse("writing", key)

    def delete(self, key: str) -> None:
        self._refuse("deleting", key)

    def delete_many(self, keys: Iterable[str]) -> dict[str, StorageError]:
        self._refuse("deleting from")

    def clear_partials(self, prefix: str = "") -> list[str]:
        self._refuse("clearing partial objects in")
