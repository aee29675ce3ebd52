"""A bucket's object versions: listed for deletes, and read ``as_of`` a time (the versions current then).

``VersionedReads`` lists versions (``ListObjectVersions``, one listing per directory for many keys)
and, for a storage opened ``as_of``, tells which version of each key to read (``version_args``) and
what the location held then (``list_as_of``): backups deleted or overwritten since are read as they
were. The rules for "current at a time" are the pure functions of ``storage.versions``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING

from backup_tasks.clock import isoformat
from backup_tasks.errors import ConfigError, ObjectMissing
from backup_tasks.storage.base import ObjectInfo, in_listing
from backup_tasks.storage.versions import ObjectVersion, by_directory, current_at, versions_in_page

if TYPE_CHECKING:
    from backup_tasks.storage.s3.config import S3Clients, S3Location
    from backup_tasks.storage.s3.errors import ErrorTranslator
    from backup_tasks.storage.s3.protection import BucketGuard


class VersionedReads:
    """The object versions of one location, and the version of each key current ``as_of`` (when set)."""

    def __init__(self, where: S3Location, clients: S3Clients, errors: ErrorTranslator, guard: BucketGuard, *,
                 as_of: datetime | None) -> None:
        self.where = where
        self.clients = clients
        self.errors = errors
        self.guard = guard
        #: Read the bucket as it was at this time, or None for now.
        self.as_of = as_of
        #: as_of: full key -> the version id current then (None: the key did not exist then).
        self._version_ids: dict[str, str | None] = {}
        self._history_checked = False

    def iter_versions(self, full_prefix: str, *, recursive: bool = True) -> Iterator[ObjectVersion]:
        extra = {} if recursive else {"Delimiter": "/"}
        try:
            paginator = self.clients.client.get_paginator("list_object_versions")
            for page in paginator.paginate(Bucket=self.where.bucket, Prefix=full_prefix, **extra):
                yield from versions_in_page(page)
        except Exception as exc:
            self.errors.fail(exc, "listing the object versions under", self.where.relative(full_prefix) or None)

    def key_versions(self, full_key: str) -> list[ObjectVersion]:
        """Every version and delete marker of one key, listed by its own prefix (one small request)."""
        return [v for v in self.iter_versions(full_key) if v.key == full_key]

    def histories(self, full_keys: Iterable[str]) -> dict[str, list[ObjectVersion]]:
        """Every version and delete marker of each key: one listing per directory, not one request per key."""
        found: dict[str, list[ObjectVersion]] = {}
        for directory, members in by_directory(full_keys).items():
            wanted = set(members)
            for version in self.iter_versions(directory, recursive=False):
                if version.key in wanted:
                    found.setdefault(version.key, []).append(version)
        return found

    def readable_in_the_past(self) -> bool:
        """Whether the bucket can be read as of a past time: it kept versions (or will not say it did not)."""
        return self.guard.versioning() != "Off"

    def _require_history(self) -> None:
        """Reading as of a time needs a bucket that kept versions (checked once)."""
        if self._history_checked:
            return
        if not self.readable_in_the_past():
            raise ConfigError(f"--as-of reads the object versions current at a past time, but bucket "
                              f"{self.where.bucket} has never had versioning enabled, so it kept none: only "
                              f"what is in it now can be read (without --as-of)")
        self._history_checked = True

    def _version_at(self, key: str) -> str | None:
        """as_of: the version id of ``key`` current then, or None if it did not exist then."""
        assert self.as_of is not None
        full_key = self.where.object_key(key)
        if full_key not in self._version_ids:
            self._require_history()
            current = current_at(self.key_versions(full_key), self.as_of)
            found = current.get(full_key)
            self._version_ids[full_key] = found.version_id if found else None
        return self._version_ids[full_key]

    def version_args(self, key: str) -> dict[str, str]:
        """The request arguments that read ``key`` as of ``as_of`` (none without it); ``ObjectMissing`` when it did
        not exist then."""
        if self.as_of is None:
            return {}
        version_id = self._version_at(key)
        if version_id is None:
            raise self.missing(key)
        return {"VersionId": version_id}

    def missing(self, key: str) -> ObjectMissing:
        when = f" as of {isoformat(self.as_of)}" if self.as_of is not None else ""
        return ObjectMissing(f"{key} is missing from {self.where.url}{when}")

    def list_as_of(self, prefix: str, *, recursive: bool) -> list[ObjectInfo]:
        """The objects current at ``as_of``, with the time each version was written; remembers their version ids."""
        assert self.as_of is not None
        self._require_history()
        found = []
        current = current_at(self.iter_versions(self.where.full_key(prefix), recursive=recursive), self.as_of)
        for full_key, version in current.items():
            self._version_ids[full_key] = version.version_id if version else None
            key = self.where.relative(full_key)
            if version is not None and in_listing(key, prefix, recursive=recursive):
                found.append(ObjectInfo(key, version.size, version.modified.timestamp()))
        return sorted(found, key=lambda o: o.key)
