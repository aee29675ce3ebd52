"""Opening the storage the settings name: ``BACKUP_DIR`` (a path or ``s3://``), mirrored to ``BACKUP_COPY_TO``.

A bucket is opened with the Object Lock of ``BACKUP_OBJECT_LOCK_DAYS`` / ``_MODE``, read here from the
environment of the process each time (as boto3 reads the ``AWS_*`` variables), so that every
process writing to a bucket locks what it writes, ``wal-push`` included, which PostgreSQL starts
with nothing but its own environment and the arguments of archive_command (see ``objectlock``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from backup_tasks.errors import ConfigError
from backup_tasks.storage.base import (
    Storage,
)
from backup_tasks.storage.local import LocalStorage
from backup_tasks.storage.mirrored import MirroredStorage
from backup_tasks.storage.objectlock import object_lock_from_env

if TYPE_CHECKING:
    from datetime import datetime

    from backup_tasks.storage.s3 import S3Credentials

log = logging.getLogger(__name__)


def open_storage(location: str, *, setting: str = "BACKUP_DIR", as_of: datetime | None = None,
                 credentials: S3Credentials | None = None) -> Storage:
    """The storage for ``BACKUP_DIR`` (or ``BACKUP_COPY_TO``): a local path or an ``s3://bucket/prefix`` URL.

    ``as_of``: read a versioned bucket as it was then (read-only); a ``ConfigError`` for a directory,
    which keeps no history. ``credentials``: other than the default AWS chain (prune's own).
    """
    if location.startswith("s3://"):
        from backup_tasks.storage.s3 import S3Storage  # boto3 is imported only when a bucket is used

        return S3Storage.from_url(location, setting=setting, lock=object_lock_from_env(os.environ), as_of=as_of,
                                  credentials=credentials)
    if "://" in location:
        raise ConfigError(f"{setting} must be a local directory path or an s3://BUCKET/PREFIX URL, got: {location}")
    if as_of is not None:
        raise ConfigError(f"--as-of needs a versioned s3:// location: {setting} is the directory {location}, which "
                          f"keeps no earlier versions of what it holds")
    return LocalStorage(Path(location))


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
    return stores[0] if len(stores) == 1 else MirroredStorage(stores[0], stores[1])


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
