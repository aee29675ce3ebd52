"""The memory driver: the reference implementation of the storage contract, and a fast catalog for tests.

Like WAL-G's ``memory`` storage or Dramatiq's stub broker: every rule of ``base`` in a few lines of
plain Python and no I/O, so the catalog, retention, prune and health run in milliseconds without a
disk, a bucket or PostgreSQL. It is thread-safe (one lock around the object table), and it fails
with the same error types as the other drivers (``ObjectMissing`` for an absent key,
``StorageError`` for a key outside the location or a writer whose partial object was cleared).

A writer's bytes live in a partial object named like a local one (``<dir>/.<name>.partial-<hex>``):
``list``, ``open`` and ``exists`` never see it; ``commit`` publishes it in one step under the lock,
``abort`` drops it, and ``clear_partials`` removes those a dead writer left (callers hold the lock
that excludes live writers, as for the other drivers).

With ``lock`` it is also the reference for a bucket with S3 Object Lock: every object written is held
until ``lock.days`` after its write (a rewrite holds it until the later date, as S3 keeps the older,
locked version), ``delete`` of a held key raises ``ObjectLocked`` with that date, and ``retention``
says it. ``clock`` (aware UTC) lets a test step past the date.
"""

from __future__ import annotations

import io
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import BinaryIO

from backup_tasks.clock import isoformat, utcnow
from backup_tasks.errors import ObjectLocked, ObjectMissing, StorageError
from backup_tasks.storage.base import PARTIAL_MARK, Features, ObjectInfo, delete_each, in_listing
from backup_tasks.storage.objectlock import ObjectLock


@dataclass(frozen=True)
class _Object:
    data: bytes
    mtime: float
    #: With a lock: until when a delete is refused (the latest retention of every write of the key).
    retain_until: datetime | None = None


class MemoryWriter:
    """Collects bytes in a partial object; ``commit`` publishes them under the key atomically."""

    def __init__(self, storage: MemoryStorage, key: str) -> None:
        self.storage = storage
        self.key = key
        directory, slash, name = key.rpartition("/")
        self.partial_key = f"{directory}{slash}.{name}{PARTIAL_MARK}{uuid.uuid4().hex[:12]}"
        self._buffer: bytearray | None = bytearray()
        self.bytes_written = 0
        storage._start_partial(self.partial_key, key, self)

    def write(self, data: bytes) -> None:
        assert self._buffer is not None, "writer already closed"
        self._buffer += data
        self.bytes_written += len(data)

    def commit(self) -> None:
        self._publish(replace=True)

    def _publish(self, *, replace: bool) -> bool:
        assert self._buffer is not None, "writer already closed"
        data, self._buffer = bytes(self._buffer), None
        return self.storage._publish(self.partial_key, self.key, data, replace=replace)

    def abort(self) -> None:
        if self._buffer is None:
            return
        self._buffer = None
        self.storage._drop_partial(self.partial_key)

    def __enter__(self) -> MemoryWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if self._buffer is not None:
            self.abort()


class MemoryStorage:
    """Objects in a dict, behind the ``Storage`` interface (``memory://<name>``)."""

    def __init__(self, name: str | None = None, *, lock: ObjectLock | None = None,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.location = f"memory://{name or uuid.uuid4().hex[:8]}"
        self.lock = lock
        self.clock = clock
        self.features = Features(object_lock=lock is not None)
        self._lock = threading.Lock()
        self._objects: dict[str, _Object] = {}
        #: partial key -> the key its writer will publish (what ``clear_partials`` reports).
        self._partials: dict[str, str] = {}
        #: partial key -> its writer while that writer exists (a live writer's partial is never cleared).
        self._writers: dict[str, weakref.ref[MemoryWriter]] = {}

    def _check(self, key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise StorageError(f"refusing an object key outside the backup location: {key!r}")
        return key

    # --- writers ----------------------------------------------------------------------------------

    def writer(self, key: str) -> MemoryWriter:
        return MemoryWriter(self, self._check(key))

    def _start_partial(self, partial_key: str, key: str, writer: MemoryWriter) -> None:
        with self._lock:
            self._partials[partial_key] = key
            self._writers[partial_key] = weakref.ref(writer)

    def _drop_partial(self, partial_key: str) -> None:
        with self._lock:
            self._partials.pop(partial_key, None)
            self._writers.pop(partial_key, None)

    def _publish(self, partial_key: str, key: str, data: bytes, *, replace: bool) -> bool:
        with self._lock:
            self._writers.pop(partial_key, None)
            if self._partials.pop(partial_key, None) is None:
                raise StorageError(f"saving {key} in {self.location} failed: its partial object was removed")
            if not replace and key in self._objects:
                return False
            self._objects[key] = self._new_object(key, data)
            return True

    def _new_object(self, key: str, data: bytes) -> _Object:
        """The object written now under ``key`` (the caller holds ``_lock``), held as a locked bucket would."""
        retain_until = None
        if self.lock is not None:
            retain_until = self.lock.retain_until(self.clock())
            previous = self._objects.get(key)
            if previous is not None and previous.retain_until is not None:
                retain_until = max(retain_until, previous.retain_until)
        return _Object(bytes(data), time.time(), retain_until)

    # --- the Storage interface --------------------------------------------------------------------

    def _get(self, key: str) -> _Object:
        with self._lock:
            found = self._objects.get(self._check(key))
        if found is None:
            raise ObjectMissing(f"{key} is missing from {self.location}")
        return found

    def open(self, key: str) -> BinaryIO:
        return io.BytesIO(self._get(key).data)

    def read_bytes(self, key: str) -> bytes:
        return self._get(key).data

    def read_tail(self, key: str, count: int) -> bytes:
        data = self._get(key).data
        return data[len(data) - min(max(count, 0), len(data)):]

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._lock:
            self._objects[self._check(key)] = self._new_object(key, data)

    def put_new(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if it does not exist: True if written, False (existing object untouched) if it did."""
        with self._lock:
            if self._check(key) in self._objects:
                return False
            self._objects[key] = self._new_object(key, data)
            return True

    def exists(self, key: str) -> bool:
        with self._lock:
            return self._check(key) in self._objects

    def size(self, key: str) -> int:
        return len(self._get(key).data)

    def list(self, prefix: str = "", *, recursive: bool = True) -> list[ObjectInfo]:
        with self._lock:
            items = list(self._objects.items())
        return sorted((ObjectInfo(key, len(obj.data), obj.mtime) for key, obj in items
                       if in_listing(key, prefix, recursive=recursive)), key=lambda o: o.key)

    def delete(self, key: str) -> None:
        with self._lock:
            found = self._objects.get(self._check(key))
            if found is not None and found.retain_until is not None and found.retain_until > self.clock():
                raise ObjectLocked(f"{key} in {self.location} is locked until {isoformat(found.retain_until)}; it "
                                   f"can be deleted after that", found.retain_until)
            self._objects.pop(key, None)

    def delete_many(self, keys: Iterable[str]) -> dict[str, StorageError]:
        # Through ``delete``, key by key: the reference semantics, and a subclass overriding ``delete``
        # (a test recording or failing deletes) sees every key prune removes.
        return delete_each(self, keys)

    def retention(self, key: str) -> datetime | None:
        with self._lock:
            found = self._objects.get(self._check(key))
        if found is None or found.retain_until is None or found.retain_until <= self.clock():
            return None
        return found.retain_until

    def clear_partials(self, prefix: str = "") -> list[str]:
        """Drop partial objects whose key or file name starts with ``prefix``; the keys they were for."""
        removed = []
        with self._lock:
            for partial_key, key in list(self._partials.items()):
                name = partial_key.rsplit("/", 1)[-1].lstrip(".")
                live = self._writers.get(partial_key)
                if live is not None and live() is not None:
                    continue  # its writer still exists: not left behind, whatever the caller's lock says
                if partial_key.startswith(prefix) or name.startswith(prefix) or key.startswith(prefix):
                    del self._partials[partial_key]
                    self._writers.pop(partial_key, None)
                    removed.append(key)
        return sorted(removed)
