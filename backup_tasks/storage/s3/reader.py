"""Reading objects: a streaming GET that resumes where a broken connection left it, and ranged reads.

``S3ReadStream`` reads one object with a single GET; a connection lost midway resumes with a ranged
GET of the same object (``If-Match`` its ETag, so a rewrite meanwhile is an error, never a mix of
two objects), at most ``READ_RESUMES`` times. ``S3Reader.read_tail`` reads the last bytes of an
object in one ranged GET (a WAL file's trailer). With ``as_of`` both read the version current then.

The reader is handed what it uses (the clients, ``VersionedReads``, the error translator), never
the storage that made it.
"""

from __future__ import annotations

import io
import logging
from typing import TYPE_CHECKING, Any, BinaryIO

from backup_tasks.errors import StorageError
from backup_tasks.storage.s3.config import MIB
from backup_tasks.storage.s3.errors import MISSING_VERSION_CODES, error_code

if TYPE_CHECKING:
    from backup_tasks.storage.s3.config import S3Clients, S3Location
    from backup_tasks.storage.s3.errors import ErrorTranslator
    from backup_tasks.storage.s3.versioned import VersionedReads


log = logging.getLogger(__name__)


READ_RESUMES = 3


class S3Reader:
    """The reads of one location (as of its ``as_of``, when set)."""

    def __init__(self, where: S3Location, clients: S3Clients, versions: VersionedReads,
                 errors: ErrorTranslator) -> None:
        self.where = where
        self.clients = clients
        self.versions = versions
        self.errors = errors

    def open(self, key: str) -> BinaryIO:
        raw = S3ReadStream(key, where=self.where, clients=self.clients, versions=self.versions, errors=self.errors)
        return io.BufferedReader(raw, buffer_size=MIB)  # type: ignore[return-value]

    def read_tail(self, key: str, count: int) -> bytes:
        """The last ``count`` bytes of ``key`` (a WAL file's trailer) in one ranged GET."""
        version = self.versions.version_args(key)
        try:
            response = self.clients.client.get_object(Bucket=self.where.bucket, Key=self.where.object_key(key),
                                                      Range=f"bytes=-{count}", **version)
            return bytes(response["Body"].read())
        except Exception as exc:
            if error_code(exc) in MISSING_VERSION_CODES:
                raise self.versions.missing(key) from None
            self.errors.fail(exc, "reading the end of", key)


class S3ReadStream(io.RawIOBase):
    """A streaming GET; a connection lost midway resumes with a ranged GET of the same version."""

    def __init__(self, key: str, *, where: S3Location, clients: S3Clients, versions: VersionedReads,
                 errors: ErrorTranslator) -> None:
        super().__init__()
        self.key = key
        self.where = where
        self.clients = clients
        self.versions = versions
        self.errors = errors
        self._pos = 0
        self._etag: str | None = None
        self._size: int | None = None
        self._resumes = 0
        self._body: Any = self._get()

    def _get(self) -> Any:
        args: dict[str, Any] = {"Bucket": self.where.bucket, "Key": self.where.object_key(self.key),
                                **self.versions.version_args(self.key)}
        if self._etag is not None:
            args.update(Range=f"bytes={self._pos}-", IfMatch=self._etag)
        try:
            response = self.clients.client.get_object(**args)
        except Exception as exc:
            code = error_code(exc)
            if code in MISSING_VERSION_CODES:
                raise self.versions.missing(self.key) from None
            if code in ("PreconditionFailed", "412"):
                raise StorageError(f"{self.key} in {self.where.url} changed while it was being read") from None
            self.errors.fail(exc, "reading", self.key)
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
                    self.errors.fail(exc, "reading", self.key)
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
