"""Translating what botocore raises into the typed ``backup_tasks.errors``, with secrets scrubbed.

One translator per location (``ErrorTranslator``): every message names the bucket, the key and the
server's error code, and says what to do; none carries a secret key, a session token or a signed
URL. The error codes are grouped here so that every module of the driver reads them the same way.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, NoReturn

from backup_tasks.errors import (
    BackupError,
    BucketMissing,
    ConfigError,
    ObjectMissing,
    StorageAuthFailed,
    StorageError,
    StorageUnavailable,
)

if TYPE_CHECKING:
    from backup_tasks.storage.s3.config import S3Clients, S3Location


AUTH_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken",
                        "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled", "InvalidClientTokenId",
                        "AuthorizationHeaderMalformed", "RequestTimeTooSkewed", "UnrecognizedClientException",
                        "403"})


UNAVAILABLE_CODES = frozenset({"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout",
                               "503", "500", "502", "504", "Throttling", "RequestLimitExceeded"})


MISSING_OBJECT_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


#: A version id that no longer exists (deleted meanwhile): for a delete, what the caller wanted.
MISSING_VERSION_CODES = frozenset({"NoSuchVersion", *MISSING_OBJECT_CODES})


#: What a store answers to a locked write it cannot take (no Object Lock on the bucket, a missing checksum).
LOCK_SETUP_CODES = frozenset({"InvalidRequest", "InvalidArgument", "MissingUploadObjectWithObjectLockHeaders"})


#: GetObjectLockConfiguration's answer for a bucket without Object Lock.
NO_LOCK_CONFIGURATION = "ObjectLockConfigurationNotFoundError"


#: A conditional write lost to an existing object (``If-None-Match: *``).
TAKEN_CODES = frozenset({"PreconditionFailed", "412"})


#: A conditional write that raced another write of the same key still in flight: S3 says to retry.
CONFLICT_CODES = frozenset({"ConditionalRequestConflict", "409"})


def error_code(exc: Exception) -> str:
    """The server's error code of ``exc`` (or its HTTP status); ``""`` for an error that never reached it."""
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code") or "")
    if not code:
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = str(status or "")
    return code


def server_message(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Message") or "").strip()


class ErrorTranslator:
    """Turns a failed request on one location into the ``BackupError`` a user can act on."""

    def __init__(self, where: S3Location, clients: S3Clients, *, setting: str) -> None:
        self.where = where
        self.clients = clients
        self.location = where.url
        self.setting = setting  # named in messages: BACKUP_DIR or BACKUP_COPY_TO

    def scrub(self, text: str) -> str:
        """``text`` without the secrets in use, nor the signature of a presigned URL."""
        for secret in self.clients.secrets():
            text = text.replace(secret, "***")
        # Presigned-URL query parameters, should a server ever echo one back.
        return re.sub(r"(?i)(X-Amz-(?:Signature|Credential|Security-Token)|Signature|AWSAccessKeyId)=[^&\s\"']+",
                      r"\1=***", text)

    def fail(self, exc: Exception, action: str, key: str | None = None) -> NoReturn:
        raise self.translate(exc, action, key) from None

    def translate(self, exc: Exception, action: str, key: str | None = None) -> BackupError:
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
                f"the S3 endpoint {self.clients.endpoint} did not answer while {action} {what} "
                f"({type(exc).__name__}, after {self.clients.options.max_attempts} attempt(s)); check "
                f"AWS_ENDPOINT_URL and the network")
        if isinstance(exc, ClientError):
            code = error_code(exc)
            detail = self.scrub(server_message(exc))
            suffix = f": {code}" + (f" ({detail})" if detail else "")
            if code in LOCK_SETUP_CODES and re.search(r"object ?lock", f"{code} {detail}", re.IGNORECASE):
                # A locked write the bucket cannot take ("Bucket is missing Object Lock Configuration"),
                # or a store that wants another checksum than Content-MD5: the setup, not a passing fault.
                return ConfigError(f"{self.clients.endpoint} refused {action} {what} with an Object Lock "
                                   f"retention{suffix}; check that bucket {self.where.bucket} has Object Lock "
                                   f"enabled (and versioning), or unset BACKUP_OBJECT_LOCK_DAYS")
            if code == "NoSuchBucket":
                return BucketMissing(f"bucket {self.where.bucket!r} does not exist at {self.clients.endpoint} "
                                     f"(while {action} {what}); create it or fix {self.setting}")
            if code in AUTH_CODES:
                return StorageAuthFailed(f"{self.clients.endpoint} rejected the credentials while {action} "
                                         f"{what}{suffix}; check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the "
                                         f"profile's permissions on the bucket")
            if code in MISSING_OBJECT_CODES:
                return ObjectMissing(f"{key if key is not None else what} is missing from {self.location}")
            if code in UNAVAILABLE_CODES:
                return StorageUnavailable(f"{self.clients.endpoint} is unavailable while {action} {what}{suffix}")
            return StorageError(f"{action} {what} failed{suffix}")
        if isinstance(exc, OSError):
            return StorageUnavailable(f"{action} {what} failed: {type(exc).__name__}: {exc.strerror or ''}".rstrip())
        return StorageError(f"{action} {what} failed: {type(exc).__name__}")

    def bucket_missing(self) -> BucketMissing:
        return BucketMissing(f"bucket {self.where.bucket!r} does not exist at {self.clients.endpoint}; create it or "
                             f"fix {self.setting}")

    def refused_delete(self, key: str, code: str, detail: str) -> StorageError:
        """A key the server would not delete, not for a lock: who refused and what to do."""
        suffix = f": {code}" + (f" ({detail})" if detail else "")
        if code in AUTH_CODES:
            return StorageAuthFailed(f"{self.clients.endpoint} refused to delete {key} from {self.location}{suffix}; "
                                     f"these credentials may not delete (append-only ones may not: prune runs with "
                                     f"its own, BACKUP_PRUNE_AWS_PROFILE)")
        return StorageError(f"deleting {key} from {self.location} failed{suffix}")
