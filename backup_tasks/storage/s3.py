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
"""

from __future__ import annotations

import io
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn
from urllib.parse import urlsplit

from backup_tasks.errors import (
    BackupError,
    BucketMissing,
    ConfigError,
    ObjectMissing,
    StorageAuthFailed,
    StorageError,
    StorageUnavailable,
)
from backup_tasks.storage.base import ObjectInfo, in_listing

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

    def __init__(self, location: S3Location, options: S3Options | None = None, *, setting: str = "BACKUP_DIR") -> None:
        self.where = location
        self.setting = setting  # named in messages: BACKUP_DIR or BACKUP_COPY_TO
        self.options = options or S3Options()
        self.location = location.url
        self._client: BaseClient | None = None
        self._cleanup_client: BaseClient | None = None
        self._client_lock = threading.Lock()
        self._secrets: list[str] = []
        self._bucket_checked = False

    @classmethod
    def from_url(cls, url: str, options: S3Options | None = None, *, setting: str = "BACKUP_DIR") -> S3Storage:
        return cls(S3Location.parse(url, setting=setting), options, setting=setting)

    # --- clients ---------------------------------------------------------------------------------

    def _make_client(self, *, attempts: int, connect_timeout: float, read_timeout: float) -> BaseClient:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ProfileNotFound

        try:
            session = boto3.session.Session()
            config = Config(connect_timeout=connect_timeout, read_timeout=read_timeout,
                            retries={"total_max_attempts": attempts, "mode": "standard"},
                            max_pool_connections=max(10, self.options.max_concurrency + 4),
                            user_agent_extra="backup-tasks")
            client = session.client("s3", config=config)
        except ProfileNotFound as exc:
            raise ConfigError(f"AWS profile {exc.kwargs.get('profile')!r} (AWS_PROFILE) is not in the AWS "
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

    # --- the Storage interface -------------------------------------------------------------------

    def writer(self, key: str) -> S3Writer:
        return S3Writer(self, key)

    def open(self, key: str) -> BinaryIO:
        raw = S3ReadStream(self, key)
        return io.BufferedReader(raw, buffer_size=MIB)  # type: ignore[return-value]

    def read_bytes(self, key: str) -> bytes:
        with self.open(key) as fh:
            return fh.read()

    def put_bytes(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.where.bucket, Key=self._key(key), Body=data)
        except Exception as exc:
            self._fail(exc, "writing", key)

    def put_new(self, key: str, data: bytes) -> bool:
        """Create ``key`` only if it does not exist (``If-None-Match: *``): True if written, False if it was there.

        What ``wal-push`` needs: a segment already archived is never overwritten, even by a
        concurrent writer (AWS S3, MinIO and moto honour the condition). A 409 means another write
        of the key was in flight: retried (as S3 asks), so False always means "an object is there".
        """
        full_key = self._key(key)
        attempt = 0
        while True:
            attempt += 1
            try:
                self.client.put_object(Bucket=self.where.bucket, Key=full_key, Body=data, IfNoneMatch="*")
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
            return self.client.head_object(Bucket=self.where.bucket, Key=self._key(key))  # type: ignore[no-any-return]
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
            raise ObjectMissing(f"{key} is missing from {self.location}")
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
        found = []
        for obj in self._iter_objects(self.where.full_key(prefix), recursive=recursive):
            key = obj["Key"][len(self.where.prefix):]
            if in_listing(key, prefix, recursive=recursive):
                found.append(ObjectInfo(key, int(obj["Size"]), obj["LastModified"].timestamp()))
        return sorted(found, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.where.bucket, Key=self._key(key))
        except Exception as exc:
            if _error_code(exc) in _MISSING_OBJECT_CODES:
                return
            self._fail(exc, "deleting", key)

    def delete_many(self, keys: Iterable[str]) -> dict[str, str]:
        """DeleteObjects, ``DELETE_BATCH`` keys per request (quiet: the answer lists only the keys that failed).

        20,000 expired WAL objects are 20 requests, not 20,000. A key the server refuses comes back
        in the result with its error code; a request that fails as a whole raises (earlier batches
        stay deleted, so running again finishes the job).
        """
        failures: dict[str, str] = {}
        batch: dict[str, str] = {}  # full key -> our key
        for key in dict.fromkeys(keys):
            try:
                batch[self._key(key)] = key
            except StorageError as exc:
                failures[key] = str(exc)
            if len(batch) == DELETE_BATCH:
                self._delete_batch(batch, failures)
                batch = {}
        if batch:
            self._delete_batch(batch, failures)
        return failures

    def _delete_batch(self, batch: dict[str, str], failures: dict[str, str]) -> None:
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
            detail = self._scrub(str(error.get("Message") or "").strip())
            failures[key] = f"deleting {key} from {self.location} failed: {code}" + (f" ({detail})" if detail else "")

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
        """
        aborted = []
        for key, upload_id, initiated in self.unfinished_uploads(prefix):
            with _live_lock:
                if upload_id in _live_uploads:
                    continue
            if self._recently_active(key, upload_id, initiated):
                log.warning("left the unfinished upload of %s alone: it moved within the last %ds, so its writer "
                            "may still be alive", key, LIVE_UPLOAD_SECONDS)
                continue
            try:
                self.client.abort_multipart_upload(Bucket=self.where.bucket, Key=self._key(key), UploadId=upload_id)
            except Exception as exc:
                if _error_code(exc) == "NoSuchUpload":
                    continue  # finished or aborted meanwhile
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
        try:
            if self._upload_id is None:
                # Smaller than one part: a single PutObject, atomic like a completed upload.
                self.storage.client.put_object(Bucket=self.storage.where.bucket, Key=self.full_key,
                                               Body=bytes(self._buffer))
            else:
                if self._buffer:
                    self._submit(bytes(self._buffer))
                self._buffer = bytearray()
                while self._pending:
                    self._parts.append(self._pending.popleft().result())
                self.storage.client.complete_multipart_upload(
                    Bucket=self.storage.where.bucket, Key=self.full_key, UploadId=self._upload_id,
                    MultipartUpload={"Parts": sorted(self._parts, key=lambda p: p["PartNumber"])})
        except BaseException as exc:
            self.abort()
            if isinstance(exc, Exception):
                self.storage._fail(exc, "saving", self.key)
            raise
        self._finish()

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
                created = self.storage.client.create_multipart_upload(Bucket=self.storage.where.bucket,
                                                                      Key=self.full_key)
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
        response = self.storage.client.upload_part(Bucket=self.storage.where.bucket, Key=self.full_key,
                                                   UploadId=self._upload_id, PartNumber=number, Body=data)
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
        args: dict[str, Any] = {"Bucket": self.storage.where.bucket, "Key": self.storage._key(self.key)}
        if self._etag is not None:
            args.update(Range=f"bytes={self._pos}-", IfMatch=self._etag)
        try:
            response = self.storage.client.get_object(**args)
        except Exception as exc:
            code = _error_code(exc)
            if code in _MISSING_OBJECT_CODES:
                raise ObjectMissing(f"{self.key} is missing from {self.storage.location}") from None
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
