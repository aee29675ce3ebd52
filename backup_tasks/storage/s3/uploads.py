"""Multipart uploads in flight: those of writers alive in this process, and those dead writers left behind.

A writer's upload exists in the bucket from its first part until ``commit`` completes it or
``abort`` aborts it; a killed process does neither, so its parts stay (invisible to ``list``, but
paid for) until ``UnfinishedUploads.clear`` aborts them. It never aborts an upload a writer in this
process owns (``LIVE_UPLOADS``), nor one that moved within ``LIVE_UPLOAD_SECONDS``, whose writer
may be alive in another process.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from backup_tasks.errors import StorageAuthFailed
from backup_tasks.storage.s3.errors import AUTH_CODES, ErrorTranslator, error_code

if TYPE_CHECKING:
    from backup_tasks.storage.s3.config import S3Clients, S3Location


log = logging.getLogger(__name__)


#: An unfinished upload that moved this recently is left alone by clear_partials: twice the lock's expiry.
LIVE_UPLOAD_SECONDS = 240


class LiveUploads:
    """Upload ids of writers alive in this process (thread-safe): ``clear`` never aborts them."""

    def __init__(self) -> None:
        self._ids: set[str] = set()
        self._lock = threading.Lock()

    def add(self, upload_id: str) -> None:
        with self._lock:
            self._ids.add(upload_id)

    def discard(self, upload_id: str) -> None:
        with self._lock:
            self._ids.discard(upload_id)

    def __contains__(self, upload_id: object) -> bool:
        with self._lock:
            return upload_id in self._ids


#: The writers alive in this process, whatever storage object they were opened from.
LIVE_UPLOADS = LiveUploads()


class UnfinishedUploads:
    """The multipart uploads under one location that were neither completed nor aborted."""

    def __init__(self, where: S3Location, clients: S3Clients, errors: ErrorTranslator) -> None:
        self.where = where
        self.clients = clients
        self.errors = errors

    def under(self, prefix: str = "") -> list[tuple[str, str, float]]:
        """(relative key, upload id, initiated epoch) of every multipart upload not completed nor aborted."""
        found = []
        try:
            paginator = self.clients.client.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=self.where.bucket, Prefix=self.where.prefix):
                for upload in page.get("Uploads", []):
                    key = self.where.relative(upload["Key"])
                    name = key.rsplit("/", 1)[-1]
                    if key.startswith(prefix) or name.startswith(prefix):
                        found.append((key, upload["UploadId"], upload["Initiated"].timestamp()))
        except Exception as exc:
            self.errors.fail(exc, "listing unfinished uploads under", prefix or None)
        return found

    def _recently_active(self, key: str, upload_id: str, initiated: float) -> bool:
        """Whether the upload started or received a part within ``LIVE_UPLOAD_SECONDS`` (a writer in another
        process feeds it at least every few seconds; one stalled longer has lost its lock and will abort)."""
        newest = initiated
        try:
            parts = self.clients.client.list_parts(Bucket=self.where.bucket, Key=self.where.object_key(key),
                                                   UploadId=upload_id)
            newest = max([newest, *(part["LastModified"].timestamp() for part in parts.get("Parts", []))])
        except Exception as exc:
            if error_code(exc) == "NoSuchUpload":
                return False
            self.errors.fail(exc, "inspecting an unfinished upload of", key)
        return time.time() - newest < LIVE_UPLOAD_SECONDS

    def clear(self, prefix: str = "") -> list[str]:
        """Abort every unfinished upload under ``prefix`` that no live writer owns; the keys aborted.

        ``prefix`` matches like LocalStorage's: the key or its file name starts with it. Credentials
        that may write but not list or abort uploads (append-only workers) only get a warning: the
        parts stay until the bucket's lifecycle rule (AbortIncompleteMultipartUpload) removes them.
        """
        aborted = []
        try:
            uploads = self.under(prefix)
        except StorageAuthFailed as exc:
            log.warning("cannot look for unfinished uploads in %s (%s); parts left by interrupted runs stay until a "
                        "lifecycle rule (AbortIncompleteMultipartUpload) removes them", self.where.url, exc)
            return []
        for key, upload_id, initiated in uploads:
            if upload_id in LIVE_UPLOADS:
                continue
            try:
                if self._recently_active(key, upload_id, initiated):
                    log.warning("left the unfinished upload of %s alone: it moved within the last %ds, so its writer "
                                "may still be alive", key, LIVE_UPLOAD_SECONDS)
                    continue
                self.clients.client.abort_multipart_upload(Bucket=self.where.bucket, Key=self.where.object_key(key),
                                                           UploadId=upload_id)
            except Exception as exc:
                code = error_code(exc)
                if code == "NoSuchUpload":
                    continue  # finished or aborted meanwhile
                if isinstance(exc, StorageAuthFailed) or code in AUTH_CODES:
                    log.warning("may not abort the unfinished upload of %s left by an interrupted run (%s); a "
                                "lifecycle rule (AbortIncompleteMultipartUpload) removes it", key, code or exc)
                    continue
                self.errors.fail(exc, "aborting an unfinished upload of", key)
            log.info("aborted unfinished multipart upload of %s left by an interrupted run", key)
            aborted.append(key)
        return aborted
