"""The storage contract every driver meets (``local``, ``s3``, ``memory``, ``mirrored``).

Keys are ``/``-separated relative paths (``aitrapp-dump-20261127T100500Z.dump.zst``).

- ``writer(key)`` streams into a temporary object; ``commit()`` publishes it atomically, ``abort()``
  (or a killed process) leaves nothing under the final key. Partial objects carry ``PARTIAL_MARK``
  and are removed by ``clear_partials`` (callers hold the lock that excludes live writers).
- ``open``, ``read_bytes``, ``size`` raise ``ObjectMissing`` for a key that is not there; other
  failures raise another ``StorageError`` (never "missing" for "unreadable").
- ``read_tail(key, count)`` is the last ``count`` (at least 1) bytes of an object (all of it when
  shorter): one ranged read where the location has them (a WAL file's trailer without its body).
- ``features`` (``Features``) says what the location can do beyond this core: read-only, Object Lock,
  versioned (readable as of a past time), a directory on this machine (``local_root``). Code outside
  ``storage/`` asks it, never a driver's class.
- ``put_bytes`` writes a small object (replacing one); ``put_new`` writes it only when the key is
  free and returns False, leaving the existing object untouched, when it is not (and only once that
  object is durable: a writer killed between publishing and syncing it may have left it unsynced).
- ``list(prefix, recursive=True)`` lists finished objects whose key starts with ``prefix``; with
  ``recursive=False`` only those in the prefix's own "directory" (no further ``/``), so a catalog
  read never walks the WAL archive beside it.
- ``delete`` of a missing key is not an error.
- ``delete_many(keys)`` deletes many keys in as few requests as the location allows (S3: one
  DeleteObjects per 1,000 keys; a directory or memory: one call, each key as ``delete`` would) and
  returns ``{key: error}`` for each key it could not delete (empty: every key is gone; a missing
  key is not a failure). The error is typed as ``delete`` would raise it: ``ObjectLocked`` (with
  ``retain_until``) for a key an Object Lock retention still holds, an expected state to report
  and retry after that date; ``StorageAuthFailed`` for credentials that may not delete; another
  ``StorageError`` otherwise (``str()`` of each is its message). A failure of the location as a
  whole (an unreachable endpoint, rejected credentials) raises ``StorageError`` as any other call;
  keys of earlier batches stay deleted, so the caller just runs again. Prune and WAL expiry delete
  through it, never key by key.
- ``retention(key)`` is when the Object Lock retention holding ``key`` ends, if that is still
  ahead; None when nothing holds it (always, where nothing is ever locked).

A location with Object Lock (``objectlock.ObjectLock``: S3, and the memory driver as its reference)
refuses to delete what is locked, with ``ObjectLocked``; writes still replace what ``list`` and
``open`` show. Reading a location as it was at a past time (``as_of``) is for versioned buckets
only: ``s3.S3Storage``; such a storage refuses writes with ``StorageReadOnly``, as any location opened
read-only does (``readonly.ReadOnlyStorage``, ``locations.open_storage(..., read_only=True)``).

``tests/storage/test_contract.py`` runs the same checks against every driver.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, Protocol

from backup_tasks.errors import StorageError, StorageFull

#: Marker in the name of objects being written; never a valid backup or manifest name.
PARTIAL_MARK = ".partial-"


@dataclass(frozen=True)
class Features:
    """What a location can do beyond the core every driver meets; callers ask this, never the driver's class."""

    #: Writes and deletes raise ``StorageReadOnly`` (a bucket opened ``as_of`` a past time, a restore source).
    read_only: bool = False
    #: Deletes may be refused with ``ObjectLocked``, and ``retention`` may answer (S3 Object Lock).
    object_lock: bool = False
    #: Can be opened as it was at a past time (``open_storage(url, as_of=...)``: a versioned bucket).
    versioned: bool = False
    #: The directory whose files the objects are, when the location is one on this machine (``local``);
    #: what only a directory has (a cached index, a state file, markers beside the objects) lives there.
    local_root: Path | None = None


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float


class ObjectWriter(Protocol):
    def write(self, data: bytes) -> None: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


class Storage(Protocol):
    """The operations every backup location offers."""

    location: str
    features: Features

    def writer(self, key: str) -> ObjectWriter: ...
    def open(self, key: str) -> BinaryIO: ...
    def read_bytes(self, key: str) -> bytes: ...
    def read_tail(self, key: str, count: int) -> bytes: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def put_new(self, key: str, data: bytes) -> bool: ...
    def exists(self, key: str) -> bool: ...
    def size(self, key: str) -> int: ...
    def list(self, prefix: str = "", *, recursive: bool = True) -> list[ObjectInfo]: ...
    def delete(self, key: str) -> None: ...
    def delete_many(self, keys: Iterable[str]) -> dict[str, StorageError]: ...
    def retention(self, key: str) -> datetime | None: ...
    def clear_partials(self, prefix: str = "") -> list[str]: ...


def in_listing(key: str, prefix: str, *, recursive: bool) -> bool:
    """Whether ``list(prefix, recursive=...)`` includes the finished object ``key`` (the contract's rule)."""
    if not key.startswith(prefix) or not key or key.endswith("/"):
        return False
    return recursive or "/" not in key[len(prefix):]


def delete_each(storage: Storage, keys: Iterable[str]) -> dict[str, StorageError]:
    """``delete_many`` for a location with no batch request: ``delete`` per key, failures collected, not raised."""
    failures: dict[str, StorageError] = {}
    for key in dict.fromkeys(keys):  # each key once, in the caller's order
        try:
            storage.delete(key)
        except StorageError as exc:
            failures[key] = exc
    return failures


def is_partial(key: str) -> bool:
    """Whether ``key`` names an object still being written (never listed, only ``clear_partials`` sees it)."""
    return PARTIAL_MARK in key.rsplit("/", 1)[-1]


def storage_error(exc: OSError, action: str, where: str) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(f"no space left on device while {action} {where}; free space or point "
                           f"BACKUP_DIR elsewhere (the partial file was removed)")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageError(f"permission denied while {action} {where}: {exc.strerror}")
    return StorageError(f"{action} {where} failed: {exc.strerror or exc}")


def members(storage: Storage) -> tuple[Storage, ...]:
    """The individual locations behind ``storage``: a mirrored storage's ``members``, else itself."""
    found: tuple[Storage, ...] | None = getattr(storage, "members", None)
    return found if found else (storage,)
