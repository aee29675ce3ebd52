"""Opening the storage the settings name: ``BACKUP_DIR`` (a path or ``s3://``), mirrored to ``BACKUP_COPY_TO``.

The one place outside the drivers that knows them: everything else opens a location here and asks
it what it can do (``base.Features``), never which driver it is.

A bucket is opened with the Object Lock of ``BACKUP_OBJECT_LOCK_DAYS`` / ``_MODE``, read here from the
environment of the process each time (as boto3 reads the ``AWS_*`` variables), so that every
process writing to a bucket locks what it writes, ``wal-push`` included, which PostgreSQL starts
with nothing but its own environment and the arguments of archive_command (see ``objectlock``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from backup_tasks.errors import ConfigError
from backup_tasks.storage.base import Features, ObjectInfo, ObjectWriter, Storage
from backup_tasks.storage.files import PRIVATE_MODES, Modes
from backup_tasks.storage.local import LocalStorage

if TYPE_CHECKING:
    from datetime import datetime

    from backup_tasks.errors import StorageError
    from backup_tasks.storage.s3 import S3Credentials

log = logging.getLogger(__name__)


def open_storage(location: str, *, setting: str = "BACKUP_DIR", as_of: datetime | None = None,
                 credentials: S3Credentials | None = None, read_only: bool = False,
                 modes: Modes = PRIVATE_MODES, when_used: bool = False) -> Storage:
    """The storage for ``BACKUP_DIR`` (or ``BACKUP_COPY_TO``): a local path or an ``s3://bucket/prefix`` URL.

    ``as_of``: read a versioned bucket as it was then (read-only); a ``ConfigError`` for a directory,
    which keeps no history. ``credentials``: other than the default AWS chain (prune's own).
    ``read_only``: writes and deletes refused (``readonly.ReadOnlyStorage``). ``modes``: of what a
    directory location creates (``files.WAL_MODES`` for the WAL archive). ``when_used``: a bucket's
    driver is only imported and made at its first use (a ``wal-push`` acknowledged without its copy
    never pays for it); the URL is checked then too.
    """
    if location.startswith("s3://") and when_used:
        return DeferredStorage(location.strip().rstrip("/"), lambda: open_storage(
            location, setting=setting, as_of=as_of, credentials=credentials, read_only=read_only))
    storage: Storage
    if location.startswith("s3://"):
        from backup_tasks.storage.objectlock import object_lock_from_env
        from backup_tasks.storage.s3 import S3Storage  # boto3 is imported only when a bucket is used

        storage = S3Storage.from_url(location, setting=setting, lock=object_lock_from_env(os.environ), as_of=as_of,
                                     credentials=credentials)
    elif "://" in location:
        raise ConfigError(f"{setting} must be a local directory path or an s3://BUCKET/PREFIX URL, got: {location}")
    elif as_of is not None:
        raise ConfigError(f"--as-of needs a versioned s3:// location: {setting} is the directory {location}, which "
                          f"keeps no earlier versions of what it holds")
    else:
        storage = LocalStorage(Path(location), modes=modes)
    if not read_only:
        return storage
    from backup_tasks.storage.readonly import ReadOnlyStorage  # restores only: not on wal-push's path

    return ReadOnlyStorage(storage, "read here for a restore only")


class DeferredStorage:
    """A location opened at its first use: ``location`` is known at once, the driver is made when needed.

    Thread-safe: threads sharing it (push-ahead) open it once.
    """

    def __init__(self, location: str, opener: Callable[[], Storage]) -> None:
        self.location = location
        self._opener = opener
        self._opened: Storage | None = None
        self._lock = threading.Lock()

    @property
    def storage(self) -> Storage:
        with self._lock:
            if self._opened is None:
                self._opened = self._opener()
            return self._opened

    @property
    def features(self) -> Features:
        return self.storage.features

    def writer(self, key: str) -> ObjectWriter:
        return self.storage.writer(key)

    def open(self, key: str) -> BinaryIO:
        return self.storage.open(key)

    def read_bytes(self, key: str) -> bytes:
        return self.storage.read_bytes(key)

    def read_tail(self, key: str, count: int) -> bytes:
        return self.storage.read_tail(key, count)

    def put_bytes(self, key: str, data: bytes) -> None:
        self.storage.put_bytes(key, data)

    def put_new(self, key: str, data: bytes) -> bool:
        return self.storage.put_new(key, data)

    def exists(self, key: str) -> bool:
        return self.storage.exists(key)

    def size(self, key: str) -> int:
        return self.storage.size(key)

    def list(self, prefix: str = "", *, recursive: bool = True) -> list[ObjectInfo]:
        return self.storage.list(prefix, recursive=recursive)

    def delete(self, key: str) -> None:
        self.storage.delete(key)

    def delete_many(self, keys: Iterable[str]) -> dict[str, StorageError]:
        return self.storage.delete_many(keys)

    def retention(self, key: str) -> datetime | None:
        return self.storage.retention(key)

    def clear_partials(self, prefix: str = "") -> list[str]:
        return self.storage.clear_partials(prefix)


def open_locations(backup_dir: str, copy_to: str | None = None, *, as_of: datetime | None = None,
                   credentials: S3Credentials | None = None) -> Storage:
    """``BACKUP_DIR``, mirrored to ``BACKUP_COPY_TO`` when that is set.

    With ``as_of`` only the ``s3://`` locations are read (as they were then): a directory beside a
    bucket cannot say what it held at that time, so it is left out with a warning; with no bucket
    at all, ``--as-of`` is a ``ConfigError``.
    """
    named = [(backup_dir, "BACKUP_DIR"), *([(copy_to, "BACKUP_COPY_TO")] if copy_to else [])]
    if as_of is not None and any(url.startswith("s3://") for url, _ in named):
        for url, setting in named:
            if not url.startswith("s3://"):
                log.warning("--as-of reads only the s3:// locations: %s (%s) keeps no earlier versions and is "
                            "left out", setting, url)
        named = [(url, setting) for url, setting in named if url.startswith("s3://")]
    stores = [open_storage(url, setting=setting, as_of=as_of, credentials=credentials) for url, setting in named]
    if len(stores) == 1:
        return stores[0]
    from backup_tasks.storage.mirrored import MirroredStorage  # not on wal-push's path: it opens one location

    return MirroredStorage(stores[0], stores[1])


def check_location_setting(value: str, setting: str, *, other: str | None = None) -> str:
    """Validate ``BACKUP_DIR``/``BACKUP_COPY_TO`` without touching the network; the normalized value.

    A local path is expanded (``~``); an ``s3://`` URL must name a bucket; any other URL is a
    ``ConfigError``. With ``other``, the two settings must not name the same place.
    """
    from pathlib import Path

    from backup_tasks.storage.s3 import S3Location

    value = value.strip()
    if value.startswith("s3://"):
        normalized = S3Location.parse(value, setting=setting).url
    elif "://" in value:
        raise ConfigError(f"{setting} must be a local directory path or an s3://BUCKET/PREFIX URL, got: {value}")
    else:
        normalized = str(Path(value).expanduser().resolve())
    if other is not None:
        other_normalized = check_location_setting(other, "BACKUP_DIR")
        if other_normalized == normalized:
            raise ConfigError(f"{setting} names the same location as BACKUP_DIR ({normalized}); a copy must live "
                              f"somewhere else")
    return value if value.startswith("s3://") else str(Path(value).expanduser())
