"""What a bucket enforces (Object Lock, versioning), and what each write must carry there.

``BucketGuard`` asks the bucket once (GetObjectLockConfiguration, GetBucketVersioning) and then:

- the write guard (``before_write``), once per storage before its first write: a lock on a bucket
  without Object Lock or versioning is a ``ConfigError``; so is a write *without* a lock into a
  bucket that has Object Lock enabled but no default retention, which is how a process started
  without ``BACKUP_OBJECT_LOCK_DAYS`` (a wal-push whose archive_command lacks it) would otherwise
  store unlocked objects. A storage opened ``as_of`` a past time refuses every write here too.
- what a write carries (``write_args``, ``checksum_args``): the retention (mode, and a retain-until
  date N days from the write) on every PutObject and CreateMultipartUpload, and a Content-MD5 on
  every PutObject and UploadPart where the bucket locks what it stores (what S3 demands of locked
  writes, and what every S3-compatible store accepts); ``lock_completed`` sets the retention of a
  completed multipart upload again, from the moment it completed.
- deletes (``deletes_versions``, ``locked_until``): in a bucket with Object Lock a delete without a
  version id only adds a delete marker and frees nothing, so versions are deleted; what a lock
  still holds is told by each version's retain-until date and legal hold.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from backup_tasks.clock import isoformat, utcnow
from backup_tasks.errors import ConfigError, StorageReadOnly
from backup_tasks.storage.objectlock import DAYS_SETTING, MODE_SETTING, BucketProtection, ObjectLock
from backup_tasks.storage.s3.errors import (
    AUTH_CODES,
    MISSING_VERSION_CODES,
    NO_LOCK_CONFIGURATION,
    UNAVAILABLE_CODES,
    ErrorTranslator,
    error_code,
)

if TYPE_CHECKING:
    from backup_tasks.storage.s3.config import S3Clients, S3Location
    from backup_tasks.storage.versions import ObjectVersion


log = logging.getLogger(__name__)


def content_md5(data: bytes) -> str:
    """The Content-MD5 header of ``data``: what S3 (and every S3-compatible store) accepts on a locked write."""
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


class BucketGuard:
    """The Object Lock and versioning of one bucket, asked once, and the rules every write follows there."""

    def __init__(self, where: S3Location, clients: S3Clients, errors: ErrorTranslator, *,
                 lock: ObjectLock | None, as_of: datetime | None) -> None:
        self.where = where
        self.clients = clients
        self.errors = errors
        #: The retention every write carries (None: none of ours; the bucket's default may still apply).
        self.lock = lock
        #: The storage reads the bucket as it was then, and refuses every write.
        self.as_of = as_of
        self._probe_lock = threading.Lock()
        #: (Object Lock enabled, default retention) of the bucket, asked once; see ``lock_configuration``.
        self._lock_config: tuple[bool | None, str | None] | None = None
        self._versioning_status: str | None = None
        self._versioning_asked = False
        #: Set by the write guard: send Content-MD5 with every write (the bucket locks what it stores).
        self._checksums = False
        self._write_checked = False

    # --- what the bucket says --------------------------------------------------------------------

    def lock_configuration(self) -> tuple[bool | None, str | None]:
        """(Object Lock enabled, the bucket's default retention), asked once; None where the store will not say."""
        with self._probe_lock:
            if self._lock_config is None:
                self._lock_config = self._ask_lock_configuration()
            return self._lock_config

    def _ask_lock_configuration(self) -> tuple[bool | None, str | None]:
        try:
            answer = self.clients.client.get_object_lock_configuration(Bucket=self.where.bucket)
        except Exception as exc:
            code = error_code(exc)
            if code == NO_LOCK_CONFIGURATION:
                return False, None
            if not code or code == "NoSuchBucket" or code in UNAVAILABLE_CODES:
                self.errors.fail(exc, "checking the Object Lock configuration of the bucket")
            # No permission to ask, or a store without the API: the first locked write says more, if anything.
            log.debug("%s does not say whether bucket %s has Object Lock (%s)", self.clients.endpoint,
                      self.where.bucket, code)
            return None, None
        config = answer.get("ObjectLockConfiguration") or {}
        retention = (config.get("Rule") or {}).get("DefaultRetention") or {}
        default = None
        if retention.get("Days") or retention.get("Years"):
            span = f"{retention['Days']} days" if retention.get("Days") else f"{retention['Years']} years"
            default = f"{retention.get('Mode', 'GOVERNANCE')}, {span}"
        return config.get("ObjectLockEnabled") == "Enabled", default

    def versioning(self) -> str | None:
        """"Enabled", "Suspended" or "Off" (never enabled), asked once; None where the store will not say."""
        with self._probe_lock:
            if not self._versioning_asked:
                self._versioning_status = self._ask_versioning()
                self._versioning_asked = True
            return self._versioning_status

    def _ask_versioning(self) -> str | None:
        try:
            answer = self.clients.client.get_bucket_versioning(Bucket=self.where.bucket)
        except Exception as exc:
            code = error_code(exc)
            if not code or code == "NoSuchBucket" or code in UNAVAILABLE_CODES:
                self.errors.fail(exc, "checking the versioning of the bucket")
            log.debug("%s does not say whether bucket %s keeps versions (%s)", self.clients.endpoint,
                      self.where.bucket, code)
            return None
        return str(answer.get("Status") or "Off")

    def protection(self) -> BucketProtection:
        """What the bucket enforces (``check`` reports it per location)."""
        enabled, default = self.lock_configuration()
        return BucketProtection(self.where.bucket, self.versioning(), enabled, default)

    # --- writes ------------------------------------------------------------------------------------

    def refuse_if_read_only(self, action: str, key: str | None = None) -> None:
        if self.as_of is not None:
            raise StorageReadOnly(f"{self.where.url} is opened as of {isoformat(self.as_of)} (--as-of), which only "
                                  f"reads: refusing {action} {key if key is not None else 'it'}")

    def before_write(self, action: str, key: str) -> None:
        """The write guard, once per storage before its first write: the bucket must keep what is promised.

        With a lock: Object Lock and versioning must be on. Without one: a bucket with Object Lock on
        and no default retention is refused, since what this process writes would be its only
        unlocked objects (a wal-push whose archive_command lacks BACKUP_OBJECT_LOCK_DAYS, say).
        """
        self.refuse_if_read_only(action, key)
        if self._write_checked:
            return
        enabled, default = self.lock_configuration()
        if self.lock is not None:
            problems = BucketProtection(self.where.bucket, self.versioning(), enabled, default).problems(self.lock)
            if problems:
                raise ConfigError("; ".join(problems))
        elif enabled and default is None:
            raise ConfigError(
                f"bucket {self.where.bucket} has Object Lock enabled but no default retention, and "
                f"{DAYS_SETTING} is not set for this process, so what it writes to {self.where.url} would not be "
                f"locked: set {DAYS_SETTING} (and {MODE_SETTING}) here too (wal-push runs in PostgreSQL's "
                f"environment: put them in front of the command in archive_command), or give the bucket a "
                f"default retention")
        # A bucket that locks what it stores (our lock or its default) demands a checksum with every write.
        self._checksums = self.lock is not None or bool(enabled)
        self._write_checked = True

    def checksum_args(self, data: bytes) -> dict[str, str]:
        """The Content-MD5 a PutObject body or an UploadPart carries where the bucket locks what it stores."""
        return {"ContentMD5": content_md5(data)} if self._checksums else {}

    def write_args(self, data: bytes | None = None) -> dict[str, Any]:
        """What a PutObject (with ``data``) or CreateMultipartUpload carries: the retention from now, Content-MD5."""
        args: dict[str, Any] = {}
        if self.lock is not None:
            args.update(ObjectLockMode=self.lock.mode, ObjectLockRetainUntilDate=self.lock.retain_until())
        if data is not None:
            args.update(self.checksum_args(data))
        return args

    def lock_completed(self, key: str, full_key: str, version_id: str | None) -> None:
        """Set the retention of an object a multipart upload just completed, counted from now (with a lock).

        S3 applies the retention given to CreateMultipartUpload, counted from the upload's start;
        this makes it N days from when the object exists, and locks it on stores that ignore the
        retention of a multipart upload (moto's server among them).

        The object is complete and committed before this: a failure here is a warning, not a failed
        write (which would leave a stored object no manifest names); it keeps the retention its upload
        was created with.
        """
        if self.lock is None:
            return
        version = {"VersionId": version_id} if version_id else {}
        try:
            self.clients.client.put_object_retention(Bucket=self.where.bucket, Key=full_key, **version, Retention={
                "Mode": self.lock.mode, "RetainUntilDate": self.lock.retain_until()})
        except Exception as exc:
            log.warning("%s is stored, but setting its Object Lock retention again failed (%s): it keeps the "
                        "retention its upload was created with", key, type(exc).__name__)

    # --- deletes -----------------------------------------------------------------------------------

    def deletes_versions(self) -> bool:
        """In a bucket with Object Lock, a delete must remove versions: a delete marker frees nothing."""
        return self.lock is not None or self.lock_configuration()[0] is True

    def locked_until(self, versions: list[ObjectVersion]) -> tuple[datetime | None, bool]:
        """(the latest retain-until date still ahead among ``versions``, whether one has a legal hold)."""
        now = utcnow()
        until: datetime | None = None
        held = False
        for version in versions:
            if version.deleted:
                continue  # a delete marker is never locked
            try:
                head = self.clients.client.head_object(Bucket=self.where.bucket, Key=version.key,
                                                       VersionId=version.version_id)
            except Exception as exc:
                if error_code(exc) in MISSING_VERSION_CODES | AUTH_CODES:
                    continue  # deleted meanwhile, or these credentials may not look: no date to give
                self.errors.fail(exc, "looking up the Object Lock of", self.where.relative(version.key))
            held = held or head.get("ObjectLockLegalHoldStatus") == "ON"
            retain = head.get("ObjectLockRetainUntilDate")
            if isinstance(retain, datetime) and retain > now:
                retain = retain.astimezone(UTC)
                until = retain if until is None else max(until, retain)
        return until, held
