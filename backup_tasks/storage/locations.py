"""Opening the storage the settings name: ``BACKUP_DIR`` (a path or ``s3://``), mirrored to ``BACKUP_COPY_TO``."""

from __future__ import annotations

from pathlib import Path

from backup_tasks.errors import ConfigError
from backup_tasks.storage.base import (
    Storage,
)
from backup_tasks.storage.local import LocalStorage
from backup_tasks.storage.mirrored import MirroredStorage


def open_storage(location: str, *, setting: str = "BACKUP_DIR") -> Storage:
    """The storage for ``BACKUP_DIR`` (or ``BACKUP_COPY_TO``): a local path or an ``s3://bucket/prefix`` URL."""
    if location.startswith("s3://"):
        from backup_tasks.storage.s3 import S3Storage  # boto3 is imported only when a bucket is used

        return S3Storage.from_url(location, setting=setting)
    if "://" in location:
        raise ConfigError(f"{setting} must be a local directory path or an s3://BUCKET/PREFIX URL, got: {location}")
    return LocalStorage(Path(location))


def open_locations(backup_dir: str, copy_to: str | None = None) -> Storage:
    """``BACKUP_DIR``, mirrored to ``BACKUP_COPY_TO`` when that is set."""
    primary = open_storage(backup_dir)
    if not copy_to:
        return primary
    return MirroredStorage(primary, open_storage(copy_to, setting="BACKUP_COPY_TO"))


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
