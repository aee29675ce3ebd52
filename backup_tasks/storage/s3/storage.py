"""``S3Storage``: a bucket (and optional key prefix) behind the ``Storage`` interface, made of the driver's parts.

It owns the requests of the contract itself (head, list, put, conditional put, deletes) and hands
each part what it needs: ``S3Clients`` (config), ``ErrorTranslator`` (errors), ``BucketGuard``
(protection), ``VersionedReads`` (versioned), ``UnfinishedUploads`` (uploads), ``S3Reader`` (reader);
every ``writer`` is an ``S3Writer`` given the same collaborators.

Deletes in a bucket with Object Lock delete versions: a delete without a version id there only adds
a delete marker and frees nothing. Every version of the key is deleted by id, then its delete
markers; a version the lock still holds is reported as ``ObjectLocked`` with its date, the key left
as it was. ``delete_many`` returns such typed failures per key.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any, BinaryIO

from backup_tasks.clock import isoformat
from backup_tasks.errors import ConfigError, ObjectLocked, ObjectMissing, StorageError, StorageUnavailable
from backup_tasks.storage.base import Features, ObjectInfo, in_listing
from backup_tasks.storage.s3.config import S3Clients, S3Credentials, S3Location, S3Options
from backup_tasks.storage.s3.errors import (
    CONFLICT_CODES,
    MISSING_OBJECT_CODES,
    MISSING_VERSION_CODES,
    TAKEN_CODES,
    ErrorTranslator,
    error_code,
)
from backup_tasks.storage.s3.protection import BucketGuard
from backup_tasks.storage.s3.reader import S3Reader
from backup_tasks.storage.s3.uploads import UnfinishedUploads
from backup_tasks.storage.s3.versioned import VersionedReads
from backup_tasks.storage.s3.writer import S3Writer

if TYPE_CHECKING:
    from botocore.client import BaseClient

    from backup_tasks.storage.objectlock import BucketProtection, ObjectLock
    from backup_tasks.storage.versions import ObjectVersion


PUT_NEW_ATTEMPTS = 4


#: S3's limit of keys per DeleteObjects request.
DELETE_BATCH = 1000


class S3Storage:
    """A bucket (and optional key prefix) behind the ``Storage`` interface."""

    def __init__(self, location: S3Location, options: S3Options | None = None, *, setting: str = "BACKUP_DIR",
                 lock: ObjectLock | None = None, as_of: datetime | None = None,
                 credentials: S3Credentials | None = None) -> None:
        if as_of is not None and as_of.tzinfo is None:
            raise ConfigError(f"reading {location.url} as of {as_of.isoformat()} needs a time with a timezone "
                              f"(e.g. 2026-11-27T10:00:00Z)")
        self.where = location
        self.setting = setting  # named in messages: BACKUP_DIR or BACKUP_COPY_TO
        self.location = location.url
        self.credentials = credentials
        # The parts, each given what it uses; none makes a request before it is needed.
        self.clients = S3Clients(location, options or S3Options(), credentials)
        self.errors = ErrorTranslator(location, self.clients, setting=setting)
        self.guard = BucketGuard(location, self.clients, self.errors, lock=lock, as_of=as_of)
        self.versions = VersionedReads(location, self.clients, self.errors, self.guard, as_of=as_of)
        self.uploads = UnfinishedUploads(location, self.clients, self.errors)
        self.reader = S3Reader(location, self.clients, self.versions, self.errors)
        self._bucket_checked = False

    @classmethod
    def from_url(cls, url: str, options: S3Options | None = None, *, setting: str = "BACKUP_DIR",
                 lock: ObjectLock | None = None, as_of: datetime | None = None,
                 credentials: S3Credentials | None = None) -> S3Storage:
        return cls(S3Location.parse(url, setting=setting), options, setting=setting, lock=lock, as_of=as_of,
                   credentials=credentials)

    # --- clients, and what the bucket is ---------------------------------------------------------

    @property
    def options(self) -> S3Options:
        return self.clients.options

    @property
    def lock(self) -> ObjectLock | None:
        """The retention every write carries (None: none of ours; the bucket's default may still apply)."""
        return self.guard.lock

    @property
    def as_of(self) -> datetime | None:
        """Read the bucket as it was at this time (read-only), or None for now."""
        return self.versions.as_of

    @property
    def client(self) -> BaseClient:
        return self.clients.client

    @property
    def cleanup_client(self) -> BaseClient:
        """One quick attempt: aborting after a failure must not add another full timeout budget."""
        return self.clients.cleanup

    @property
    def endpoint(self) -> str:
        """Where requests go (``scheme://host:port``), for messages; never carries credentials."""
        return self.clients.endpoint

    def secrets(self) -> list[str]:
        """The secret key and session token in use, for scrubbing outgoing text (Sentry, logs)."""
        return self.clients.secrets()

    @property
    def features(self) -> Features:
        """What this location can do, asked of the bucket at first use (at most GetObjectLockConfiguration and
        GetBucketVersioning, each once per storage; never when it is made). Raises ``StorageError`` as any
        request does when the bucket cannot be reached.

        ``object_lock``: deletes remove versions and may be refused (our lock, or Object Lock on the bucket).
        ``versioned``: ``as_of`` can read it (it kept versions; Object Lock implies versioning).
        """
        # Object Lock is only ever enabled on a versioned bucket, which cannot suspend versioning: no need to ask.
        versioned = self.guard.lock_configuration()[0] is True or self.versions.readable_in_the_past()
        return Features(read_only=self.as_of is not None, object_lock=self.guard.deletes_versions(),
                        versioned=versioned)

    def protection(self) -> BucketProtection:
        """What the bucket enforces (``check`` reports it per location)."""
        return self.guard.protection()

    def _check_bucket(self) -> None:
        """A 404 from HEAD cannot say whether the key or the bucket is missing; ask once."""
        if self._bucket_checked:
            return
        try:
            self.client.head_bucket(Bucket=self.where.bucket)
        except Exception as exc:
            if error_code(exc) in ("404", "NoSuchBucket", "NotFound"):
                raise self.errors.bucket_missing() from None
            self.errors.fail(exc, "checking the bucket")
        self._bucket_checked = True

    # --- the Storage interface -------------------------------------------------------------------

    def writer(self, key: str) -> S3Writer:
        # The write guard itself runs with the writer's first request (a part, or commit).
        self.guard.refuse_if_read_only("writing", key)
        return S3Writer(key, self.where.object_key(key), bucket=self.where.bucket, clients=self.clients,
                        guard=self.guard, errors=self.errors)

    def open(self, key: str) -> BinaryIO:
        return self.reader.open(key)

    def read_bytes(self, key: str) -> bytes:
        with self.open(key) as fh:
            return fh.read()

    def read_tail(self, key: str, count: int) -> bytes:
        """The last ``count`` bytes of ``key`` (a WAL file's trailer) in one ranged GET; as of ``as_of``, if set."""
        return self.reader.read_tail(key, count)

    def put_bytes(self, key: str, data: bytes) -> None:
        self.guard.before_write("writing", key)
        try:
            self.client.put_object(Bucket=self.where.bucket, Key=self.where.object_key(key), Body=data,
                                   **self.guard.write_args(data))
        except Exception as exc:
            self.errors.fail(exc, "writing", key)

    def put_new(self, key: str, data: bytes) -> bool:
        """Create ``key`` only if it does not exist (``If-None-Match: *``): True if written, False if it was there.

        What ``wal-push`` needs: a segment already archived is never overwritten, even by a
        concurrent writer (AWS S3, MinIO and moto honour the condition). A 409 means another write
        of the key was in flight: retried (as S3 asks), so False always means "an object is there".
        """
        self.guard.before_write("writing", key)
        full_key = self.where.object_key(key)
        attempt = 0
        while True:
            attempt += 1
            try:
                self.client.put_object(Bucket=self.where.bucket, Key=full_key, Body=data, IfNoneMatch="*",
                                       **self.guard.write_args(data))
            except Exception as exc:
                code = error_code(exc)
                if code in TAKEN_CODES:
                    return False
                if code not in CONFLICT_CODES:
                    self.errors.fail(exc, "writing", key)
                if attempt < PUT_NEW_ATTEMPTS:
                    time.sleep(0.1 * attempt)
                    continue
                if self.exists(key):
                    return False
                raise StorageUnavailable(f"writing {key} to {self.location} kept conflicting with concurrent "
                                         f"writes of the same key ({code}); try again") from None
            return True

    def head(self, key: str) -> dict[str, Any] | None:
        try:
            version = self.versions.version_args(key)
        except ObjectMissing:
            return None
        try:
            return self.client.head_object(Bucket=self.where.bucket, Key=self.where.object_key(key), **version)  # type: ignore[no-any-return]
        except Exception as exc:
            if error_code(exc) in MISSING_OBJECT_CODES:
                self._check_bucket()
                return None
            self.errors.fail(exc, "looking up", key)

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def size(self, key: str) -> int:
        found = self.head(key)
        if found is None:
            raise self.versions.missing(key)
        return int(found["ContentLength"])

    def _iter_objects(self, full_prefix: str, *, recursive: bool = True) -> Iterator[dict[str, Any]]:
        # Not recursive: Delimiter="/" folds every deeper key into CommonPrefixes, which are not read.
        extra = {} if recursive else {"Delimiter": "/"}
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.where.bucket, Prefix=full_prefix, **extra):
                yield from page.get("Contents", [])
        except Exception as exc:
            self.errors.fail(exc, "listing", self.where.relative(full_prefix) or None)

    def list(self, prefix: str = "", *, recursive: bool = True) -> list[ObjectInfo]:
        if self.as_of is not None:
            return self.versions.list_as_of(prefix, recursive=recursive)
        found = []
        for obj in self._iter_objects(self.where.full_key(prefix), recursive=recursive):
            key = self.where.relative(obj["Key"])
            if in_listing(key, prefix, recursive=recursive):
                found.append(ObjectInfo(key, int(obj["Size"]), obj["LastModified"].timestamp()))
        return sorted(found, key=lambda o: o.key)

    def retention(self, key: str) -> datetime | None:
        """When the last Object Lock retention on ``key``'s versions ends, if still ahead; None when none holds it."""
        if not self.guard.deletes_versions():
            return None  # no Object Lock in this bucket: nothing is ever held
        return self.guard.locked_until(self.versions.key_versions(self.where.object_key(key)))[0]

    # --- deletes ------------------------------------------------------------------------------------

    def delete(self, key: str) -> None:
        self.guard.refuse_if_read_only("deleting", key)
        if self.guard.deletes_versions():
            failure = self._delete_versions([key]).get(key)
            if failure is not None:
                raise failure
            return
        try:
            self.client.delete_object(Bucket=self.where.bucket, Key=self.where.object_key(key))
        except Exception as exc:
            if error_code(exc) in MISSING_OBJECT_CODES:
                return
            self.errors.fail(exc, "deleting", key)

    def delete_many(self, keys: Iterable[str]) -> dict[str, StorageError]:
        """DeleteObjects, ``DELETE_BATCH`` keys per request (quiet: the answer lists only the keys that failed).

        20,000 expired WAL objects are 20 requests, not 20,000. A key the server refuses comes back
        in the result with its error (``ObjectLocked`` when a retention holds it, ``StorageAuthFailed``
        when the credentials may not delete); a request that fails as a whole raises (earlier batches
        stay deleted, so running again finishes the job). With Object Lock, versions are deleted.
        """
        self.guard.refuse_if_read_only("deleting", "objects")
        if self.guard.deletes_versions():
            return self._delete_versions(keys)
        wanted, failures = self._full_keys(keys)
        items = list(wanted.items())
        for start in range(0, len(items), DELETE_BATCH):
            self._delete_batch(dict(items[start:start + DELETE_BATCH]), failures)
        return failures

    def _full_keys(self, keys: Iterable[str]) -> tuple[dict[str, str], dict[str, StorageError]]:
        """Each key once, in the caller's order, as ``{full key in the bucket: our key}``; the keys refused."""
        wanted: dict[str, str] = {}
        refused: dict[str, StorageError] = {}
        for key in dict.fromkeys(keys):
            try:
                wanted[self.where.object_key(key)] = key
            except StorageError as exc:
                refused[key] = exc
        return wanted, refused

    def _delete_batch(self, batch: dict[str, str], failures: dict[str, StorageError]) -> None:
        try:
            response = self.client.delete_objects(
                Bucket=self.where.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
        except Exception as exc:
            first = next(iter(batch.values()))
            self.errors.fail(exc, f"deleting {len(batch)} objects (in one DeleteObjects request) starting with", first)
        for error in response.get("Errors", []):
            code = str(error.get("Code") or "")
            if code in MISSING_OBJECT_CODES:
                continue  # already gone: what the caller wanted
            key = batch.get(str(error.get("Key")), str(error.get("Key")))
            detail = self.errors.scrub(str(error.get("Message") or "").strip())
            failures[key] = self.errors.refused_delete(key, code, detail)

    def _delete_versions(self, keys: Iterable[str]) -> dict[str, StorageError]:
        """Delete every version of each key, then its delete markers; the keys that stay, each with why.

        Markers go last, and only for keys none of whose versions stayed: removing the marker over a
        version the lock kept would make a deleted backup reappear.
        """
        wanted, failures = self._full_keys(keys)
        history = self.versions.histories(wanted)
        objects = [v for versions in history.values() for v in versions if not v.deleted]
        for full_key, (code, detail) in self._delete_version_batches(objects).items():
            key = wanted.get(full_key, full_key)
            failures[key] = self._why_kept(key, history.get(full_key, []), code, detail)
        markers = [v for full_key, versions in history.items() if wanted[full_key] not in failures
                   for v in versions if v.deleted]
        for full_key, (code, detail) in self._delete_version_batches(markers).items():
            key = wanted.get(full_key, full_key)
            failures[key] = self.errors.refused_delete(key, code, detail)
        return failures

    def _delete_version_batches(self, versions: list[ObjectVersion]) -> dict[str, tuple[str, str]]:
        """DeleteObjects by version id, ``DELETE_BATCH`` a request; full key -> (code, message) of each refusal."""
        refused: dict[str, tuple[str, str]] = {}
        for start in range(0, len(versions), DELETE_BATCH):
            batch = versions[start:start + DELETE_BATCH]
            try:
                response = self.client.delete_objects(Bucket=self.where.bucket, Delete={
                    "Objects": [{"Key": v.key, "VersionId": v.version_id} for v in batch], "Quiet": True})
            except Exception as exc:
                self.errors.fail(exc, f"deleting {len(batch)} object versions (in one DeleteObjects request) "
                                 f"starting with", self.where.relative(batch[0].key))
            for error in response.get("Errors", []):
                code = str(error.get("Code") or "")
                if code not in MISSING_VERSION_CODES:  # a version already gone is what the caller wanted
                    refused.setdefault(str(error.get("Key")),
                                       (code, self.errors.scrub(str(error.get("Message") or ""))))
        return refused

    def _why_kept(self, key: str, versions: list[ObjectVersion], code: str, detail: str) -> StorageError:
        until, held = self.guard.locked_until(versions)
        if until is not None:
            return ObjectLocked(f"{key} in {self.location} is locked until {isoformat(until)} (S3 Object Lock); it "
                                f"can be deleted after that", until)
        if held:
            return StorageError(f"{key} in {self.location} is under an Object Lock legal hold; it can be deleted "
                                f"once the hold is removed")
        return self.errors.refused_delete(key, code, detail.strip())

    # --- unfinished uploads ------------------------------------------------------------------------

    def unfinished_uploads(self, prefix: str = "") -> list[tuple[str, str, float]]:
        """(relative key, upload id, initiated epoch) of every multipart upload not completed nor aborted."""
        return self.uploads.under(prefix)

    def clear_partials(self, prefix: str = "") -> list[str]:
        """Abort every unfinished multipart upload under ``prefix`` that no writer in this process owns.

        As with ``LocalStorage``, the caller holds the lock that excludes writers in other processes
        for this prefix (the per-database dump lock): an unfinished upload it finds was left by a
        run that died. ``prefix`` matches like LocalStorage's: the key or its file name starts with it.

        Credentials that may write but not list or abort uploads (append-only workers) only get a
        warning: the parts stay until the bucket's lifecycle rule (AbortIncompleteMultipartUpload)
        removes them, and the backup that called this goes on.
        """
        self.guard.refuse_if_read_only("clearing unfinished uploads under", prefix or None)
        return self.uploads.clear(prefix)
