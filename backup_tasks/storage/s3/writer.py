"""The multipart uploader: one object written as parts uploaded in the background, published on commit.

A writer starts a multipart upload once the first part (8 MiB by default) is full; parts upload on
background threads while the producer keeps producing, with at most ``max_concurrency`` parts in
flight, so memory is bounded by ``(max_concurrency + 1) * part_size`` whatever the object size.
``commit`` completes the upload: only then does the object exist under its key, so an interrupted
writer never leaves anything that looks like a backup. An object smaller than one part goes up as a
single PutObject, which is atomic too. ``abort`` aborts the multipart upload; a killed process
cannot, so ``uploads.UnfinishedUploads.clear`` aborts what dead writers left.

The writer is handed what it uses (the clients, the bucket's ``BucketGuard``, the error translator),
never the storage that made it.
"""

from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from backup_tasks.errors import StorageError
from backup_tasks.storage.s3.config import MIB
from backup_tasks.storage.s3.uploads import LIVE_UPLOADS

if TYPE_CHECKING:
    from backup_tasks.storage.s3.config import S3Clients
    from backup_tasks.storage.s3.errors import ErrorTranslator
    from backup_tasks.storage.s3.protection import BucketGuard


log = logging.getLogger(__name__)


#: S3's maximum number of parts per upload.
MAX_PARTS = 10_000


#: Parts double in size every this many parts (8 MiB parts reach 7.8 GiB, then 16 MiB...), so an upload of
#: unknown length never runs out of part numbers below ~5 TiB; memory grows only for such giant objects.
PARTS_PER_SIZE_STEP = 1_000


MAX_PART_SIZE = 5 * 1024 * MIB


class S3Writer:
    """One object being written: buffered into parts, uploaded in the background, published on commit."""

    def __init__(self, key: str, full_key: str, *, bucket: str, clients: S3Clients, guard: BucketGuard,
                 errors: ErrorTranslator) -> None:
        self.key = key
        self.full_key = full_key
        self.bucket = bucket
        self.clients = clients
        self.guard = guard
        self.errors = errors
        self.bytes_written = 0
        self.part_size = clients.options.part_size
        self.max_concurrency = clients.options.max_concurrency
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
                self.guard.before_write("writing", self.key)
                body = bytes(self._buffer)
                self.clients.client.put_object(Bucket=self.bucket, Key=self.full_key, Body=body,
                                               **self.guard.write_args(body))
            else:
                if self._buffer:
                    self._submit(bytes(self._buffer))
                self._buffer = bytearray()
                while self._pending:
                    self._parts.append(self._pending.popleft().result())
                completed = self.clients.client.complete_multipart_upload(
                    Bucket=self.bucket, Key=self.full_key, UploadId=self._upload_id,
                    MultipartUpload={"Parts": sorted(self._parts, key=lambda p: p["PartNumber"])})
        except BaseException as exc:
            self.abort()
            if isinstance(exc, Exception):
                self.errors.fail(exc, "saving", self.key)
            raise
        self._finish()
        if completed is not None:
            self.guard.lock_completed(self.key, self.full_key, completed.get("VersionId"))

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
            self.clients.cleanup.abort_multipart_upload(Bucket=self.bucket, Key=self.full_key, UploadId=upload_id)
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
            LIVE_UPLOADS.discard(self._upload_id)

    def __enter__(self) -> S3Writer:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if not self._closed:
            self.abort()

    # The uploading side -----------------------------------------------------------------------

    def _submit(self, part: bytes) -> None:
        try:
            if self._upload_id is None:
                self.guard.before_write("writing", self.key)
                created = self.clients.client.create_multipart_upload(Bucket=self.bucket, Key=self.full_key,
                                                                      **self.guard.write_args())
                self._upload_id = str(created["UploadId"])
                LIVE_UPLOADS.add(self._upload_id)
                self._pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="s3-part")
            number = len(self._parts) + len(self._pending) + 1
            if number > MAX_PARTS:
                raise StorageError(f"{self.key} needs more than {MAX_PARTS} parts; raise the part size")
            if number % PARTS_PER_SIZE_STEP == 0:
                self.part_size = min(self.part_size * 2, MAX_PART_SIZE)
            # Back-pressure: wait for the oldest part before queueing more than max_concurrency.
            while len(self._pending) >= self.max_concurrency:
                self._parts.append(self._pending.popleft().result())
            assert self._pool is not None
            self._pending.append(self._pool.submit(self._upload_part, number, part))
        except BaseException as exc:
            self.abort()
            if isinstance(exc, Exception):
                self.errors.fail(exc, "uploading", self.key)
            raise

    def _upload_part(self, number: int, data: bytes) -> dict[str, Any]:
        response = self.clients.client.upload_part(Bucket=self.bucket, Key=self.full_key, UploadId=self._upload_id,
                                                   PartNumber=number, Body=data, **self.guard.checksum_args(data))
        return {"PartNumber": number, "ETag": response["ETag"]}
