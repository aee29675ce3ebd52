"""Backups in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW, Cloudflare R2...), same interface as LocalStorage.

``BACKUP_DIR=s3://bucket/prefix``. Credentials, region and endpoint come from the standard AWS
environment and credential chain (``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, instance roles), resolved by boto3.

A writer is a multipart upload started once the first part (8 MiB by default) is full; parts
upload on background threads while the producer keeps producing, with at most
``max_concurrency`` parts in flight, so memory is bounded by ``(max_concurrency + 1) * part_size``
whatever the object size. ``commit`` completes the upload: only then does the object exist under
its key, so an interrupted writer never leaves anything that looks like a backup. An object
smaller than one part goes up as a single PutObject, which is atomic too. ``abort`` aborts the
multipart upload; a killed process cannot, so ``clear_partials`` aborts what dead writers left.

Every call is bounded: connect and read timeouts and a small number of attempts, so an endpoint
that does not answer fails in well under two minutes (see ``S3Options.worst_case_seconds``).
Errors become ``StorageError`` subclasses whose messages carry the bucket, key and the server's
error code, never a secret key, a session token or a signed URL.

Object Lock (``lock``, see ``objectlock``): every PutObject and CreateMultipartUpload carries the
retention (mode, and a retain-until date N days from the write), every PutObject and UploadPart a
Content-MD5 (what S3 demands of locked writes, and what every S3-compatible store accepts), and a
completed multipart upload gets its retention set again from the moment it completed. The first
write of a storage checks the bucket once ("write guard"): a lock on a bucket without Object Lock or
versioning is a ``ConfigError``; so is a write *without* a lock into a bucket that has Object Lock
enabled but no default retention, which is how a process started without ``BACKUP_OBJECT_LOCK_DAYS``
(a wal-push whose archive_command lacks it) would otherwise store unlocked objects.

Deletes in a bucket with Object Lock delete versions: a delete without a version id there only adds
a delete marker and frees nothing. Every version of the key is deleted by id, then its delete
markers; a version the lock still holds is reported as ``ObjectLocked`` with its date, the key left
as it was. ``delete_many`` returns such typed failures per key.

``as_of``: a storage that reads the bucket as it was at that time (the object versions current
then: backups deleted or overwritten since are read as they were). It only reads.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn
from urllib.parse import urlsplit

from backup_tasks.clock import isoformat, utcnow
from backup_tasks.errors import (
    BackupError,
    BucketMissing,
    ConfigError,
    ObjectLocked,
    ObjectMissing,
    StorageAuthFailed,
    StorageError,
    StorageReadOnly,
    StorageUnavailable,
)
from backup_tasks.storage.base import ObjectInfo, in_listing
from backup_tasks.storage.objectlock import DAYS_SETTING, MODE_SETTING, BucketProtection, ObjectLock
from backup_tasks.storage.versions import ObjectVersion, by_directory, current_at, versions_in_page

if TYPE_CHECKING:  # boto3 costs ~0.3 s to import: only S3 users pay for it, at first use
    from botocore.client import BaseClient


log = logging.getLogger(__name__)


MIB = 1 << 20


DEFAULT_PART_SIZE = 8 * MIB


#: S3's minimum size for every part but the last.
MIN_PART_SIZE = 5 * MIB


#: S3's maximum number of parts per upload.
MAX_PARTS = 10_000


#: Parts double in size every this many parts (8 MiB parts reach 7.8 GiB, then 16 MiB...), so an upload of
#: unknown length never runs out of part numbers below ~5 TiB; memory grows only for such giant objects.
PARTS_PER_SIZE_STEP = 1_000


MAX_PART_SIZE = 5 * 1024 * MIB


READ_RESUMES = 3


_AUTH_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken",
                         "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled", "InvalidClientTokenId",
                         "AuthorizationHeaderMalformed", "RequestTimeTooSkewed", "UnrecognizedClientException",
                         "403"})


_UNAVAILABLE_CODES = frozenset({"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout",
                                "503", "500", "502", "504", "Throttling", "RequestLimitExceeded"})


_MISSING_OBJECT_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


#: A version id that no longer exists (deleted meanwhile): for a delete, what the caller wanted.
_MISSING_VERSION_CODES = frozenset({"NoSuchVersion", *_MISSING_OBJECT_CODES})


#: What a store answers to a locked write it cannot take (no Object Lock on the bucket, a missing checksum).
_LOCK_SETUP_CODES = frozenset({"InvalidRequest", "InvalidArgument", "MissingUploadObjectWithObjectLockHeaders"})


#: GetObjectLockConfiguration's answer for a bucket without Object Lock.
_NO_LOCK_CONFIGURATION = "ObjectLockConfigurationNotFoundError"


#: A conditional write lost to an existing object (``If-None-Match: *``).
_TAKEN_CODES = frozenset({"PreconditionFailed", "412"})


#: A conditional write that raced another write of the same key still in flight: S3 says to retry.
_CONFLICT_CODES = frozenset({"ConditionalRequestConflict", "409"})


PUT_NEW_ATTEMPTS = 4


#: S3's limit of keys per DeleteObjects request.
DELETE_BATCH = 1000


# Upload ids of writers alive in this process: clear_partials never aborts them.
_live_uploads: set[str] = set()
#: An unfinished upload that moved this recently is left alone by clear_partials: twice the lock's expiry.
LIVE_UPLOAD_SECONDS = 240


_live_lock = threading.Lock()


@dataclass(frozen=True)
class S3Location:
    """``s3://bucket/prefix`` split into bucket and key prefix (``""`` or ending in ``/``)."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str, *, setting: str = "BACKUP_DIR") -> S3Location:
        url = url.strip()
        try:
            parts = urlsplit(url)
        except ValueError:
            raise ConfigError(f"{setting} is not a valid s3:// URL") from None
        if parts.scheme != "s3":
            raise ConfigError(f"{setting} must look like s3://BUCKET/PREFIX")
        if "@" in parts.netloc or parts.query or parts.fragment:
            # Never echo it: whatever sits before the @ may be a secret key.
            raise ConfigError(f"{setting} must be s3://BUCKET/PREFIX with nothing else in it; credentials "
                              f"come from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile, not the URL")
        bucket = parts.netloc
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{2,254}", bucket or ""):
            raise ConfigError(f"{setting} names no valid bucket (s3://BUCKET/PREFIX): {url}")
        segments = [s for s in parts.path.split("/") if s]
        if any(s in (".", "..") for s in segments):
            raise ConfigError(f"{setting} has '.' or '..' in its prefix: {url}")
        return cls(bucket=bucket, prefix="".join(f"{s}/" for s in segments))

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/") if self.prefix else f"s3://{self.bucket}"

    def full_key(self, key: str) -> str:
        return f"{self.prefix}{key}"


@dataclass(frozen=True)
class S3Options:
    """Tuning and the time bound. Defaults give up on a dead endpoint within 99 s, under two minutes."""

    part_size: int = DEFAULT_PART_SIZE
    max_concurrency: int = 2
    connect_timeout: float = 10.0
    read_timeout: float = 20.0
    max_attempts: int = 3  # in total, the first one included (botocore's total_max_attempts)

    def __post_init__(self) -> None:
        if self.part_size < MIN_PART_SIZE:
            raise ConfigError(f"the S3 part size must be at least 5 MiB (S3's minimum), got {self.part_size}")
        if self.max_concurrency < 1 or self.max_attempts < 1:
            raise ConfigError("S3 concurrency and attempts must be at least 1")

    @property
    def worst_case_seconds(self) -> float:
        """Longest one call can take against an endpoint that never answers.

        Per attempt: the connect timeout, one second waiting for ``100 Continue`` before a body is
        sent, and the read timeout; between attempts, standard mode's jittered backoff (≤ 2^n s).
        """
        backoff = sum(min(2.0**n, 20.0) for n in range(1, self.max_attempts))
        return self.max_attempts * (self.connect_timeout + 1.0 + self.read_timeout) + backoff


@dataclass(frozen=True)
class S3Credentials:
    """Credentials other than the default chain's: a profile, or a key pair (prune's own, BACKUP_PRUNE_AWS_*)."""

    profile: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)
    #: The setting they came from, named in messages.
    setting: str = "BACKUP_PRUNE_AWS_PROFILE"

    def session_args(self) -> dict[str, str]:
        if self.profile:
            return {"profile_name": self.profile}
        return {"aws_access_key_id": self.access_key_id or "", "aws_secret_access_key": self.secret_access_key or ""}


def content_md5(data: bytes) -> str:
    """The Content-MD5 header of ``data``: what S3 (and every S3-compatible store) accepts on a locked write."""
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code") or "")
    if not code:
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = str(status or "")
    return code


def _server_message(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Message") or "").strip()


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
        self.options = options or S3Options()
        self.location = location.url
        #: The retention every write carries (None: none of ours; the bucket's default may still apply).
        self.lock = lock
        #: Read the bucket as it was at this time (read-only), or None for now.
        self.as_of = as_of
        self.credentials = credentials
        self._client: BaseClient | None = None
        self._cleanup_client: BaseClient | None = None
        self._client_lock = threading.Lock()
        self._secrets: list[str] = []
        self._bucket_checked = False
        self._probe_lock = threading.Lock()
        #: (Object Lock enabled, default retention) of the bucket, asked once; see ``_lock_configuration``.
        self._lock_config: tuple[bool | None, str | None] | None = None
        self._versioning_status: str | None = None
        self._versioning_asked = False
        #: Set by the write guard: send Content-MD5 with every write (the bucket locks what it stores).
        self._checksums = False
        self._write_checked = False
        #: as_of: full key -> the version id current then (None: the key did not exist then).
        self._version_ids: dict[str, str | None] = {}
        self._history_checked = False

    @classmethod
    def from_url(cls, url: str, options: S3Options | None = None, *, setting: str = "BACKUP_DIR",
                 lock: ObjectLock | None = None, as_of: datetime | None = None,
                 credentials: S3Credentials | None = None) -> S3Storage:
        return cls(S3Location.parse(url, setting=setting), options, setting=setting, lock=lock, as_of=as_of,
                   credentials=credentials)

    # --- clients ---------------------------------------------------------------------------------

    def _make_client(self, *, attempts: int, connect_timeout: float, read_timeout: float) -> BaseClient:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ProfileNotFound

        try:
            session = boto3.session.Session(**(self.credentials.session_args() if self.credentials else {}))
            config = Config(connect_timeout=connect_timeout, read_timeout=read_timeout,
                            retries={"total_max_attempts": attempts, "mode": "standard"},
                            max_pool_connections=max(10, self.options.max_concurrency + 4),
                            user_agent_extra="backup-tasks")
            client = session.client("s3", config=config)
        except ProfileNotFound as exc:
            source = self.credentials.setting if self.credentials and self.credentials.profile else "AWS_PROFILE"
            raise ConfigError(f"AWS profile {exc.kwargs.get('profile')!r} ({source}) is not in the AWS "
                              f"config files") from None
        except (BotoCoreError, ValueError) as exc:
            raise ConfigError(f"the AWS settings for {self.location} are not usable: "
                              f"{type(exc).__name__}") from None
        try:
            credentials = session.get_credentials()
            if credentials is not None:
                frozen = credentials.get_frozen_credentials()
                self._secrets = [s for s in (frozen.secret_key, frozen.token) if s]
        except Exception:
            pass  # only wanted for scrubbing; the first request reports unusable credentials properly
        return client

    @property
    def client(self) -> BaseClient:
        with self._client_lock:
            if self._client is None:
                opts = self.options
                self._client = self._make_client(attempts=opts.max_attempts, connect_timeout=opts.connect_timeout,
                                                 read_timeout=opts.read_timeout)
            return self._client

    @property
    def cleanup_client(self) -> BaseClient:
        """One quick attempt: aborting after a failure must not add another full timeout budget."""
        with self._client_lock:
            if self._cleanup_client is None:
                self._cleanup_client = self._make_client(
                    attempts=1, connect_timeout=min(5.0, self.options.connect_timeout),
                    read_timeout=min(10.0, self.options.read_timeout))
            return self._cleanup_client

    @property
    def endpoint(self) -> str:
        """Where requests go (``scheme://host:port``), for messages; never carries credentials."""
        try:
            parts = urlsplit(self.client.meta.endpoint_url)
            return f"{parts.scheme}://{parts.hostname}{':' + str(parts.port) if parts.port else ''}"
        except Exception:
            return "the S3 endpoint"

    def secrets(self) -> list[str]:
        """The secret key and session token in use, for scrubbing outgoing text (Sentry, logs)."""
        return list(self._secrets)

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        # Presigned-URL query parameters, should a server ever echo one back.
        return re.sub(r"(?i)(X-Amz-(?:Signature|Credential|Security-Token)|Signature|AWSAccessKeyId)=[^&\s\"']+",
                      r"\1=***", text)

    # --- errors ----------------------------------------------------------------------------------

    def _fail(self, exc: Exception, action: str, key: str | None = None) -> NoReturn:
        raise self._translate(exc, action, key) from None

    def _translate(self, exc: Exception, action: str, key: str | None = None) -> BackupError:
        from botocore.exceptions import (
            ClientError,
            CredentialRetrievalError,
            HTTPClientError,
            IncompleteReadError,
            NoCredentialsError,
            PartialCredentialsError,
        )
        from botocore.exceptions import ConnectionError as BotoConnectionError

        if isinstance(exc, BackupError):
            return exc  # already ours (a ConfigError from the AWS settings, a StorageError from a part)
        what = f"s3://{self.where.bucket}/{self.where.full_key(key)}" if key is not None else self.location
        if isinstance(exc, NoCredentialsError | PartialCredentialsError | CredentialRetrievalError):
            return StorageAuthFailed(f"no usable AWS credentials for {self.location} while {action} {what}: set "
                                     f"AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE "
                                     f"({type(exc).__name__})")
        if isinstance(exc, HTTPClientError | BotoConnectionError | IncompleteReadError):
            return StorageUnavailable(
                f"the S3 endpoint {self.endpoint} did not answer while {action} {what} "
                f"({type(exc).__name__}, after {self.options.max_attempts} attempt(s)); check AWS_ENDPOINT_URL "
                f"and the network")
        if isinstance(exc, ClientError):
            code = _error_code(exc)
            detail = self._scrub(_server_message(exc))
            suffix = f": {code}" + (f" ({detail})" if detail else "")
            if code in _LOCK_SETUP_CODES and re.search(r"object ?lock", f"{code} {detail}", re.IGNORECASE):
                # A locked write the bucket cannot take ("Bucket is missing Object Lock Configuration"),
                # or a store that wants another checksum than Content-MD5: the setup, not a passing fault.
                return ConfigError(f"{self.endpoint} refused {action} {what} with an Object Lock retention{suffix}; "
                                   f"check that bucket {self.where.bucket} has Object Lock enabled (and versioning), "
                                   f"or unset BACKUP_OBJECT_LOCK_DAYS")
            if code == "NoSuchBucket":
                return BucketMissing(f"bucket {self.where.bucket!r} does not exist at {self.endpoint} "
                                     f"(while {action} {what}); create it or fix {self.setting}")
            if code in _AUTH_CODES:
                return StorageAuthFailed(f"{self.endpoint} rejected the credentials while {action} {what}{suffix}; "
                                         f"check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the profile's "
                                         f"permissions on the bucket")
            if code in _MISSING_OBJECT_CODES:
                return ObjectMissing(f"{key if key is not None else what} is missing from {self.location}")
            if code in _UNAVAILABLE_CODES:
                return StorageUnavailable(f"{self.endpoint} is unavailable while {action} {what}{suffix}")
            return StorageError(f"{action} {what} failed{suffix}")
        if isinstance(exc, OSError):
            return StorageUnavailable(f"{action} {what} failed: {type(exc).__name__}: {exc.strerror or ''}".rstrip())
        return StorageError(f"{action} {what} failed: {type(exc).__name__}")

    def _check_bucket(self) -> None:
        """A 404 from HEAD cannot say whether the key or the bucket is missing; ask once."""
        if self._bucket_checked:
            return
        try:
            self.client.head_bucket(Bucket=self.where.bucket)
        except Exception as exc:
            if _error_code(exc) in ("404", "NoSuchBucket", "NotFound"):
                raise BucketMissing(f"bucket {self.where.bucket!r} does not exist at {self.endpoint}; create it or "
                                    f"fix {self.setting}") from None
            self._fail(exc, "checking the bucket")
        self._bucket_checked = True

    def _key(self, key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise StorageError(f"refusing an object key outside the backup location: {key!r}")
        return self.where.full_key(key)

    # --- what the bucket enforces: Object Lock, versioning ------------------------------------------

    def _lock_configuration(self) -> tuple[bool | None, str | None]:
        """(Object Lock enabled, the bucket's default retention), asked once; None where the store will not say."""
        with self._probe_lock:
            if self._lock_config is None:
                self._lock_config = self._ask_lock_configuration()
            return self._lock_config

    def _ask_lock_configuration(self) -> tuple[bool | None, str | None]:
        try:
            answer = self.client.get_object_lock_configuration(Bucket=self.where.bucket)
        except Exception as exc:
            code = _error_code(exc)
            if code == _NO_LOCK_CONFIGURATION:
                return False, None
            if not code or code == "NoSuchBucket" or code in _UNAVAILABLE_CODES:
                self._fail(exc, "checking the Object Lock configuration of the bucket")
            # No permission to ask, or a store without the API: the first locked write says more, if anything.
            log.debug("%s does not say whether bucket %s has Object Lock (%s)", self.endpoint, self.where.bucket, code)
            return None, None
        config = answer.get("ObjectLockConfiguration") or {}
        retention = (config.get("Rule") or {}).get("DefaultRetention") or {}
        default = None
        if retention.get("Days") or retention.get("Years"):
            span = f"{retention['Days']} days" if retention.get("Days") else f"{retention['Years']} years"
            default = f"{retention.get('Mode', 'GOVERNANCE')}, {span}"
        return config.get("ObjectLockEnabled") == "Enabled", default

    def _versioning(self) -> str | None:
        """"Enabled", "Suspended" or "Off" (never enabled), asked once; None where the store will not say."""
        with self._probe_lock:
            if not self._versioning_asked:
                self._versioning_status = self._ask_versioning()
                self._versioning_asked = True
            return self._versioning_status

    def _ask_versioning(self) -> str | None:
        try:
            answer = self.client.get_bucket_versioning(Bucket=self.where.bucket)
        except Exception as exc:
            code = _error_code(exc)
            if not code or code == "NoSuchBucket" or code in _UNAVAILABLE_CODES:
                self._fail(exc, "checking the versioning of the bucket")
            log.debug("%s does not say whether bucket %s keeps versions (%s)", self.endpoint, self.where.bucket, code)
            return None
        return str(answer.get("Status") or "Off")

    def protection(self) -> BucketProtection:
        """What the bucket enforces (``check`` reports it per location)."""
        enabled, default = self._lock_configuration()
        return BucketProtection(self.where.bucket, self._versioning(), enabled, default)

    def _refuse_if_past(self, action: str, key: str | None = None) -> None:
        if self.as_of is not None:
            raise StorageReadOnly(f"{self.location} is opened as of {isoformat(self.as_of)} (--as-of), which only "
                                  f"reads: refusing {action} {key if key is not None else 'it'}")

    def _before_write(self, action: str, key: str) -> None:
        """The write guard, once per storage before its first write: the bucket must keep what is promised.

        With a lock: Object Lock and versioning must be on. Without one: a bucket with Object Lock on
        and no default retention is refused, since what this process writes would be its only
        unlocked objects (a wal-push whose archive_command lacks BACKUP_OBJECT_LOCK_DAYS, say).
        """
        self._refuse_if_past(action, key)
        if self._write_checked:
            return
        enabled, default = self._lock_configuration()
        if self.lock is not None:
            problems = BucketProtection(self.where.bucket, self._versioning(), enabled, default).problems(self.lock)
            if problems:
                raise ConfigError("; ".join(problems))
        elif enabled and default is None:
            raise ConfigError(
                f"bucket {self.where.bucket} has Object Lock enabled but no default retention, and "
                f"{DAYS_SETTING} is not set for this process, so what it writes to {self.location} would not be "
                f"locked: set {DAYS_SETTING} (and {MODE_SETTING}) here too (wal-push runs in PostgreSQL's "
                f"environment: put them in front of the command in archive_command), or give the bucket a "
                f"default retention")
        # A bucket that locks what it stores (our lock or its default) demands a checksum with every write.
        self._checksums = self.lock is not None or bool(enabled)
        self._write_checked = True

    def _write_args(self, data: bytes | None = None) -> dict[str, Any]:
        """What a PutObject (with ``data``) or CreateMultipartUpload carries: the retention from now, Content-MD5."""
        args: dict[str, Any] = {}
        if self.lock is not None:
            args.update(ObjectLockMode=self.lock.mode, ObjectLockRetainUntilDate=self.lock.retain_until())
        if data is not None and self._checksums:
            args["ContentMD5"] = content_md5(data)
        return args

    def _lock_completed(self, key: str, full_key: str, version_id: str | None) -> None:
        """Set the retention of an object a multipart upload just completed, counted from now.

        S3 applies the retention given to CreateMultipartUpload, counted from the upload's start;
        this makes it N days from when the object exists, and locks it on stores that ignore the
        retention of a multipart upload (moto's server among them).

        The object is complete and committed before this: a failure here is a warning, not a failed
        write (which would leave a stored object no manifest names); it keeps the retention its upload
        was created with.
        """
        assert self.lock is not None
        version = {"VersionId": version_id} if version_id else {}
        try:
            self.client.put_object_retention(Bucket=self.where.bucket, Key=full_key, **version, Retention={
                "Mode": self.lock.mode, "RetainUntilDate": self.lock.retain_until()})
        except Exception as exc:
            log.warning("%s is stored, but setting its Object Lock retention again failed (%s): it keeps the "
                        "retention its upload was created with", key, type(exc).__name__)

    def _deletes_versions(self) -> bool:
        """In a bucket with Object Lock, a delete must remove versions: a delete marker frees nothing."""
        return self.lock is not None or self._lock_configuration()[0] is True

    # --- object versions -----------------------------------------------------------------------------

    def _iter_versions(self, full_prefix: str, *, recursive: bool = True) -> Iterator[ObjectVersion]:
        extra = {} if recursive else {"Delimiter": "/"}
        try:
            paginator = self.client.get_paginator("list_object_versions")
            for page in paginator.paginate(Bucket=self.where.bucket, Prefix=full_prefix, **extra):
                yield from versions_in_page(page)
        except Exception as exc:
            self._fail(exc, "listing the object versions under", full_prefix[len(self.where.prefix):] or None)

    def _histories(self, full_keys: Iterable[str]) -> dict[str, list[ObjectVersion]]:
        """Every version and delete marker of each key: one listing per directory, not one request per key."""
        found: dict[str, list[ObjectVersion]] = {}
        for directory, members in by_directory(full_keys).items():
            wanted = set(members)
            for version in self._iter_versions(directory, recursive=False):
                if version.key in wanted:
                    found.setdefault(version.key, []).append(version)
        return found

    def _require_history(self) -> None:
        """Reading as of a time needs a bucket that kept versions (checked once)."""
        if self._history_checked:
            return
        if self._versioning() == "Off":
            raise ConfigError(f"--as-of reads the object versions current at a past time, but bucket "
                              f"{self.where.bucket} has never had versioning enabled, so it kept none: only "
                              f"what is in it now can be read (without --as-of)")
        self._history_checked = True

    def _version_at(self, key: str) -> str | None:
        """as_of: the version id of ``key`` current then, or None if it did not exist then."""
        assert self.as_of is not None
        full_key = self._key(key)
        if full_key not in self._version_ids:
            self._require_history()
            current = current_at((v for v in self._iter_versions(full_key) if v.key == full_key), self.as_of)
            found = current.get(full_key)
            self._version_ids[full_key] = found.version_id if found else None
        return self._version_ids[full_key]

    def _version_args(self, key: str) -> dict[str, str]:
        """The request arguments that read ``key`` as of ``as_of`` (none without it); ``ObjectMissing`` when it did
        not exist then."""
        if self.as_of is None:
            return {}
        version_id = self._version_at(key)
        if version_id is None:
            raise self._missing(key)
        return {"VersionId": version_id}

    def _missing(self, key: str) -> ObjectMissing:
        when = f" as of {isoformat(self.as_of)}" if self.as_of is not None else ""
        return ObjectMissing(f"{key} is missing from {self.location}{when}")

    # --- the Storage interface -------------------------------------------------------------------

    def writer(self, key: str) -> S3Writer:
        self._refuse_if_past("writing", key)  # the write guard runs with its first request (a part, or commit)
        return S3Writer(self, key)

    def open(self, key: str) -> BinaryIO:
        raw = S3ReadStream(self, key)
        return io.BufferedReader(raw, buffer_size=MIB)  # type: ignore[return-value]

    def read_bytes(self, key: str) -> bytes:
        with self.open(key) as fh:
            return fh.read()

    def read_tail(self, key: str, count: int) -> bytes:
        """The last ``count`` bytes of ``key`` (a WAL file's trailer) in one ranged GET; as of ``as_of``, if set."""
        version = self._version_args(key)
        try:
            response = self.client.get_object(Bucket=self.where.bucket, Key=self._key(key), Range=f"bytes=-{count}",
                                              **version)
            return bytes(response["Body"].read())
        except Exception as exc:
            if _error_code(exc) in _MISSING_VERSION_CODES:
                raise self._missing(key) from None
            self._fail(exc, "reading the end of", key)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._before_write("writing", key)
        try:
            self.client.put_object(Bucket=self.where.bucket, Key=self._key(key), Body=data, **self._write_args(data))
        except Exception as exc:
            self._fail(exc, "writing", key)

    def put_new(self, key: str, data: bytes) -> bool:
        """Create ``key`` only if it does not exist (``If-None-Match: *``): True if written, False if it was there.

        What ``wal-push`` needs: a segment already archived is never overwritten, even by a
        concurrent writer (AWS S3, MinIO and moto honour the condition). A 409 means another write
        of the key was in flight: retried (as S3 asks), so False always means "an object is there".
        """
        self._before_write("writing", key)
        full_key = self._key(key)
        attempt = 0
        while True:
            attempt += 1
            try:
                self.client.put_object(Bucket=self.where.bucket, Key=full_key, Body=data, IfNoneMatch="*",
                                       **self._write_args(data))
            except Exception as exc:
                code = _error_code(exc)
                if code in _TAKEN_CODES:
                    return False
                if code not in _CONFLICT_CODES:
                    self._fail(exc, "writing", key)
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
            version = self._version_args(key)
        except ObjectMissing:
            return None
        try:
            return self.client.head_object(Bucket=self.where.bucket, Key=self._key(key), **version)  # type: ignore[no-any-return]
        except Exception as exc:
            if _error_code(exc) in _MISSING_OBJECT_CODES:
                self._check_bucket()
                return None
            self._fail(exc, "looking up", key)

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def size(self, key: str) -> int:
        found = self.head(key)
        if found is None:
            raise self._missing(key)
        return int(found["ContentLength"])

    def _iter_objects(self, full_prefix: str, *, recursive: bool = True) -> Iterator[dict[str, Any]]:
        # Not recursive: Delimiter="/" folds every deeper key into CommonPrefixes, which are not read.
        extra = {} if recursive else {"Delimiter": "/"}
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.where.bucket, Prefix=full_prefix, **extra):
                yield from page.get("Contents", [])
        except Exception as exc:
            self._fail(exc, "listing", full_prefix[len(self.where.prefix):] or None)

    def list(self, prefix: str = "", *, recursive: bool = True) -> list[ObjectInfo]:
        if self.as_of is not None:
            return self._list_as_of(prefix, recursive=recursive)
        found = []
        for obj in self._iter_objects(self.where.full_key(prefix), recursive=recursive):
            key = obj["Key"][len(self.where.prefix):]
            if in_listing(key, prefix, recursive=recursive):
                found.append(ObjectInfo(key, int(obj["Size"]), obj["LastModified"].timestamp()))
        return sorted(found, key=lambda o: o.key)

    def _list_as_of(self, prefix: str, *, recursive: bool) -> list[ObjectInfo]:
        """The objects current at ``as_of``, with the time each version was written; remembers their version ids."""
        assert self.as_of is not None
        self._require_history()
        found = []
        current = current_at(self._iter_versions(self.where.full_key(prefix), recursive=recursive), self.as_of)
        for full_key, version in current.items():
            self._version_ids[full_key] = version.version_id if version else None
            key = full_key[len(self.where.prefix):]
            if version is not None and in_listing(key, prefix, recursive=recursive):
                found.append(ObjectInfo(key, version.size, version.modified.timestamp()))
        return sorted(found, key=lambda o: o.key)

    def retention(self, key: str) -> datetime | None:
        """When the last Object Lock retention on ``key``'s versions ends, if still ahead; None when none holds it."""
        if not self._deletes_versions():
            return None  # no Object Lock in this bucket: nothing is ever held
        full_key = self._key(key)  # listed by its own prefix: one small request, whatever the directory holds
        return self._locked_until([v for v in self._iter_versions(full_key) if v.key == full_key])[0]

    def delete(self, key: str) -> None:
        self._refuse_if_past("deleting", key)
        if self._deletes_versions():
            failure = self._delete_versions([key]).get(key)
            if failure is not None:
                raise failure
            return
        try:
            self.client.delete_object(Bucket=self.where.bucket, Key=self._key(key))
        except Exception as exc:
            if _error_code(exc) in _MISSING_OBJECT_CODES:
                return
            self._fail(exc, "deleting", key)

    def delete_many(self, keys: Iterable[str]) -> dict[str, StorageError]:
        """DeleteObjects, ``DELETE_BATCH`` keys per request (quiet: the answer lists only the keys that failed).

        20,000 expired WAL objects are 20 requests, not 20,000. A key the server refuses comes back
        in the result with its error (``ObjectLocked`` when a retention holds it, ``StorageAuthFailed``
        when the credentials may not delete); a request that fails as a whole raises (earlier batches
        stay deleted, so running again finishes the job). With Object Lock, versions are deleted.
        """
        self._refuse_if_past("deleting", "objects")
        if self._deletes_versions():
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
                wanted[self._key(key)] = key
            except StorageError as exc:
                refused[key] = exc
        return wanted, refused

    def _delete_batch(self, batch: dict[str, str], failures: dict[str, StorageError]) -> None:
        try:
            response = self.client.delete_objects(
                Bucket=self.where.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
        except Exception as exc:
            first = next(iter(batch.values()))
            self._fail(exc, f"deleting {len(batch)} objects (in one DeleteObjects request) starting with", first)
        for error in response.get("Errors", []):
            code = str(error.get("Code") or "")
            if code in _MISSING_OBJECT_CODES:
                continue  # already gone: what the caller wanted
            key = batch.get(str(error.get("Key")), str(error.get("Key")))
            failures[key] = self._refused(key, code, self._scrub(str(error.get("Message") or "").strip()))

    def _refused(self, key: str, code: str, detail: str) -> StorageError:
        """A key the server would not delete, not for a lock: who refused and what to do."""
        suffix = f": {code}" + (f" ({detail})" if detail else "")
        if code in _AUTH_CODES:
            return StorageAuthFailed(f"{self.endpoint} refused to delete {key} from {self.location}{suffix}; these "
                                     f"credentials may not delete (append-only ones may not: prune runs with its "
                                     f"own, BACKUP_PRUNE_AWS_PROFILE)")
        return StorageError(f"deleting {key} from {self.location} failed{suffix}")

    def _delete_versions(self, keys: Iterable[str]) -> dict[str, StorageError]:
        """Delete every version of each key, then its delete markers; the keys that stay, each with why.

        Markers go last, and only for keys none of whose versions stayed: removing the marker over a
        version the lock kept would make a deleted backup reappear.
        """
        wanted, failures = self._full_keys(keys)
        history = self._histories(wanted)
        objects = [v for versions in history.values() for v in versions if not v.deleted]
        for full_key, (code, detail) in self._delete_version_batches(objects).items():
            key = wanted.get(full_key, full_key)
            failures[key] = self._why_kept(key, history.get(full_key, []), code, detail)
        markers = [v for full_key, versions in history.items() if wanted[full_key] not in failures
                   for v in versions if v.deleted]
        for full_key, (code, detail) in self._delete_version_batches(markers).items():
            key = wanted.get(full_key, full_key)
            failures[key] = self._refused(key, code, detail)
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
                self._fail(exc, f"deleting {len(batch)} object versions (in one DeleteObjects request) starting with",
                           batch[0].key[len(self.where.prefix):])
            for error in response.get("Errors", []):
                code = str(error.get("Code") or "")
                if code not in _MISSING_VERSION_CODES:  # a version already gone is what the caller wanted
                    refused.setdefault(str(error.get("Key")), (code, self._scrub(str(error.get("Message") or ""))))
        return refused

    def _why_kept(self, key: str, versions: list[ObjectVersion], code: str, detail: str) -> StorageError:
        until, held = self._locked_until(versions)
        if until is not None:
            return ObjectLocked(f"{key} in {self.location} is locked until {isoformat(until)} (S3 Object Lock); it "
                                f"can be deleted after that", until)
        if held:
            return StorageError(f"{key} in {self.location} is under an Object Lock legal hold; it can be deleted "
                                f"once the hold is removed")
        return self._refused(key, code, detail.strip())

    def _locked_until(self, versions: list[ObjectVersion]) -> tuple[datetime | None, bool]:
        """(the latest retain-until date still ahead among ``versions``, whether one has a legal hold)."""
        now = utcnow()
        until: datetime | None = None
        held = False
        for version in versions:
            if version.deleted:
                continue  # a delete marker is never locked
            try:
                head = self.client.head_object(Bucket=self.where.bucket, Key=version.key, VersionId=version.version_id)
            except Exception as exc:
                if _error_code(exc) in _MISSING_VERSION_CODES | _AUTH_CODES:
                    continue  # deleted meanwhile, or these credentials may not look: no date to give
                self._fail(exc, "looking up the Object Lock of", version.key[len(self.where.prefix):])
            held = held or head.get("ObjectLockLegalHoldStatus") == "ON"
            retain = head.get("ObjectLockRetainUntilDate")
            if isinstance(retain, datetime) and retain > now:
                retain = retain.astimezone(UTC)
                until = retain if until is None else max(until, retain)
        return until, held

    def unfinished_uploads(self, prefix: str = "") -> list[tuple[str, str, float]]:
        """(relative key, upload id, initiated epoch) of every multipart upload not completed nor aborted."""
        found = []
        try:
            paginator = self.client.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=self.where.bucket, Prefix=self.where.prefix):
                for upload in page.get("Uploads", []):
                    key = upload["Key"][len(self.where.prefix):]
                    name = key.rsplit("/", 1)[-1]
                    if key.startswith(prefix) or name.startswith(prefix):
                        found.append((key, upload["UploadId"], upload["Initiated"].timestamp()))
        except Exception as exc:
            self._fail(exc, "listing unfinished uploads under", prefix or None)
        return found

    def _recently_active(self, key: str, upload_id: str, initiated: float) -> bool:
        """Whether the upload started or received a part within ``LIVE_UPLOAD_SECONDS`` (a writer in another
        process feeds it at least every few seconds; one stalled longer has lost its lock and will abort)."""
        newest = initiated
        try:
            parts = self.client.list_parts(Bucket=self.where.bucket, Key=self._key(key), UploadId=upload_id)
            newest = max([newest, *(part["LastModified"].timestamp() for part in parts.get("Parts", []))])
        except Exception as exc:
            if _error_code(exc) == "NoSuchUpload":
                return False
            self._fail(exc, "inspecting an unfinished upload of", key)
        return time.time() - newest < LIVE_UPLOAD_SECONDS

    def clear_partials(self, prefix: str = "") -> list[str]:
        """Abort every unfinished multipart upload under ``prefix`` that no writer in this process owns.

        As with ``LocalStorage``, the caller holds the lock that excludes writers in other processes
        for this prefix (the per-database dump lock): an unfinished upload it finds was left by a
        run that died. ``prefix`` matches like LocalStorage's: the key or its file name starts with it.

        Credentials that may write but not list or abort uploads (append-only workers) only get a
        warning: the parts stay until the bucket's lifecycle rule (AbortIncompleteMultipartUpload)
        removes them, and the backup that called this goes on.
        """
        self._refuse_if_past("clearing unfinished uploads under", prefix or None)
        aborted = []
        try:
            uploads = self.unfinished_uploads(prefix)
        except StorageAuthFailed as exc:
            log.warning("cannot look for unfinished uploads in %s (%s); parts left by interrupted runs stay until a "
                        "lifecycle rule (AbortIncompleteMultipartUpload) removes them", self.location, exc)
            return []
        for key, upload_id, initiated in uploads:
            with _live_lock:
                if upload_id in _live_uploads:
                    continue
            try:
                if self._recently_active(key, upload_id, initiated):
                    log.warning("left the unfinished upload of %s alone: it moved within the last %ds, so its writer "
                                "may still be alive", key, LIVE_UPLOAD_SECONDS)
                    continue
                self.client.abort_multipart_upload(Bucket=self.where.bucket, Key=self._key(key), UploadId=upload_id)
            except Exception as exc:
                code = _error_code(exc)
                if code == "NoSuchUpload":
                    continue  # finished or aborted meanwhile
                if isinstance(exc, StorageAuthFailed) or code in _AUTH_CODES:
                    log.warning("may not abort the unfinished upload of %s left by an interrupted run (%s); a "
                                "lifecycle rule (AbortIncompleteMultipartUpload) removes it", key, code or exc)
                    continue
                self._fail(exc, "aborting an unfinished upload of", key)
            log.info("aborted unfinished multipart upload of %s left by an interrupted run", key)
            aborted.append(key)
        return aborted


class S3Writer:
    """One object being written: buffered into parts, uploaded in the background, published on commit."""

    def __init__(self, storage: S3Storage, key: str) -> None:
        self.storage = storage
        self.key = key
        self.full_key = storage._key(key)
        self.bytes_written = 0
        self.part_size = storage.options.part_size
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._pending: deque[Future[dict[str, Any]]] = deque()
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False

    # The producer's side --------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        assert not self._closed, "writer already closed"
        self._buffer += data
        self.bytes_written += len(data)
        while len(self._buffer) >= self.part_size:
            with memoryview(self._buffer) as view:  # one copy of the part, not two
                part = bytes(view[:self.part_size])
            del self._buffer[:self.part_size]
            self._submit(part)

    def commit(self) -> None:
        assert not self._closed, "writer already closed"
        completed: dict[str, Any] | None = None
        try:
            if self._upload_id is None:
                # Smaller than one part: a single PutObject, atomic like a completed upload.
                self.storage._before_write("writing", self.key)
                body = bytes(self._buffer)
                self.storage.client.put_object(Bucket=self.storage.where.bucket, Key=self.full_key, Body=body,
                                               **self.storage._write_args(body))
            else:
                if self._buffer:
                    self._submit(bytes(self._buffer))
                self._buffer = bytearray()
                while self._pending:
                    self._parts.append(self._pending.popleft().result())
                completed = self.storage.client.complete_multipart_upload(
                    Bucket=self.storage.where.bucket, Key=self.full_key, UploadId=self._upload_id,
                    MultipartUpload={"Parts": sorted(self._parts, key=lambda p: p["PartNumber"])})
        except BaseException as exc:
            self.abort()
            if isinstance(exc, Exception):
                self.storage._fail(exc, "saving", self.key)
            raise
        self._finish()
        if completed is not None and self.storage.lock is not None:
            self.storage._lock_completed(self.key, self.full_key, completed.get("VersionId"))

    def abort(self) -> None:
        """Drop everything written so far; never raises (a failed abort is cleared by the next run)."""
        if self._closed:
            return
        for future in self._pending:
            future.cancel()
        upload_id = self._upload_id
        self._finish()
        if upload_id is None:
            return
        try:
            self.storage.cleanup_client.abort_multipart_upload(Bucket=self.storage.where.bucket, Key=self.full_key,
                                                               UploadId=upload_id)
        except Exception as exc:
            log.warning("could not abort the multipart upload of %s (%s); the next run clears it",
                        self.key, type(exc).__name__)

    def _finish(self) -> None:
        self._closed = True
        self._buffer = bytearray()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending.clear()
        if self._upload_id is not None:
            with _live_lock:
                _live_uploads.discard(self._upload_id)

    def __enter__(self) -> S3Writer:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if not self._closed:
            self.abort()

    # The uploading side -----------------------------------------------------------------------

    def _submit(self, part: bytes) -> None:
        try:
            if self._upload_id is None:
                self.storage._before_write("writing", self.key)
                created = self.storage.client.create_multipart_upload(Bucket=self.storage.where.bucket,
                                                                      Key=self.full_key, **self.storage._write_args())
                self._upload_id = str(created["UploadId"])
                with _live_lock:
                    _live_uploads.add(self._upload_id)
                self._pool = ThreadPoolExecutor(max_workers=self.storage.options.max_concurrency,
                                                thread_name_prefix="s3-part")
            number = len(self._parts) + len(self._pending) + 1
            if number > MAX_PARTS:
                raise StorageError(f"{self.key} needs more than {MAX_PARTS} parts; raise the part size")
            if number % PARTS_PER_SIZE_STEP == 0:
                self.part_size = min(self.part_size * 2, MAX_PART_SIZE)
            # Back-pressure: wait for the oldest part before queueing more than max_concurrency.
            while len(self._pending) >= self.storage.options.max_concurrency:
                self._parts.append(self._pending.popleft().result())
            assert self._pool is not None
            self._pending.append(self._pool.submit(self._upload_part, number, part))
        except BaseException as exc:
            self.abort()
            if isinstance(exc, Exception):
                self.storage._fail(exc, "uploading", self.key)
            raise

    def _upload_part(self, number: int, data: bytes) -> dict[str, Any]:
        checksum = {"ContentMD5": content_md5(data)} if self.storage._checksums else {}
        response = self.storage.client.upload_part(Bucket=self.storage.where.bucket, Key=self.full_key,
                                                   UploadId=self._upload_id, PartNumber=number, Body=data, **checksum)
        return {"PartNumber": number, "ETag": response["ETag"]}


class S3ReadStream(io.RawIOBase):
    """A streaming GET; a connection lost midway resumes with a ranged GET of the same version."""

    def __init__(self, storage: S3Storage, key: str) -> None:
        super().__init__()
        self.storage = storage
        self.key = key
        self._pos = 0
        self._etag: str | None = None
        self._size: int | None = None
        self._resumes = 0
        self._body: Any = self._get()

    def _get(self) -> Any:
        args: dict[str, Any] = {"Bucket": self.storage.where.bucket, "Key": self.storage._key(self.key),
                                **self.storage._version_args(self.key)}
        if self._etag is not None:
            args.update(Range=f"bytes={self._pos}-", IfMatch=self._etag)
        try:
            response = self.storage.client.get_object(**args)
        except Exception as exc:
            code = _error_code(exc)
            if code in _MISSING_VERSION_CODES:
                raise self.storage._missing(self.key) from None
            if code in ("PreconditionFailed", "412"):
                raise StorageError(f"{self.key} in {self.storage.location} changed while it was being read") from None
            self.storage._fail(exc, "reading", self.key)
        if self._etag is None:
            self._etag = response.get("ETag")
            self._size = int(response.get("ContentLength", 0))
        return response["Body"]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError, IncompleteReadError
        from urllib3.exceptions import HTTPError as Urllib3Error

        view = memoryview(buffer).cast("B")
        while True:
            try:
                data = self._body.read(len(view))
                break
            except (HTTPClientError, BotoConnectionError, IncompleteReadError, Urllib3Error, OSError) as exc:
                self._resumes += 1
                if self._resumes > READ_RESUMES:
                    self.storage._fail(exc, "reading", self.key)
                log.warning("reading %s broke off at byte %d (%s); resuming", self.key, self._pos, type(exc).__name__)
                self._close_body()
                self._body = self._get()
        view[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def _close_body(self) -> None:
        try:
            self._body.close()
        except Exception:
            pass

    def close(self) -> None:
        if not self.closed:
            self._close_body()
        super().close()
