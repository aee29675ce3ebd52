"""The S3 driver: backups in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW, Cloudflare R2...).

``BACKUP_DIR=s3://bucket/prefix``, same interface as ``LocalStorage``. Credentials, region and
endpoint come from the standard AWS environment and credential chain (``AWS_ENDPOINT_URL``,
``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, instance
roles), resolved by boto3, which is imported only when a first request needs a client: importing
this package never loads it (``wal-push``'s fast path imports ``backup_tasks.storage``).

Every call is bounded: connect and read timeouts and a small number of attempts, so an endpoint
that does not answer fails in well under two minutes (``S3Options.worst_case_seconds``). Errors
become ``StorageError`` subclasses whose messages carry the bucket, key and the server's error
code, never a secret key, a session token or a signed URL.

Split by role, as WAL-G's ``pkg/storages/s3`` (imports point down this list, checked by an
import-linter contract; only ``storage`` sees them all):

- ``config``: ``S3Location`` (``s3://bucket/prefix``), ``S3Options`` (parts, concurrency, timeouts),
  ``S3Credentials`` (other than the default chain), ``S3Clients`` (the boto3 clients, made at first use).
- ``errors``: ``ErrorTranslator``, botocore errors to the typed ``backup_tasks.errors``, secrets scrubbed.
- ``protection``: ``BucketGuard``, what the bucket enforces (Object Lock, versioning), the write
  guard, the retention and Content-MD5 every write carries there.
- ``versioned``: ``VersionedReads``, object versions, and reading ``as_of`` a time (the versions
  current then); such a storage only reads.
- ``uploads``: multipart uploads of live writers (``LIVE_UPLOADS``) and those dead writers left.
- ``writer``: ``S3Writer``, the multipart uploader (published on commit, nothing on abort).
- ``reader``: ``S3Reader`` and ``S3ReadStream``, streaming GETs that resume, ranged reads.
- ``storage``: ``S3Storage``, the ``Storage`` contract over the parts above (and the deletes).
"""

from backup_tasks.storage.s3.config import (
    DEFAULT_PART_SIZE,
    MIB,
    MIN_PART_SIZE,
    S3Clients,
    S3Credentials,
    S3Location,
    S3Options,
)
from backup_tasks.storage.s3.errors import ErrorTranslator
from backup_tasks.storage.s3.protection import BucketGuard, content_md5
from backup_tasks.storage.s3.reader import S3Reader, S3ReadStream
from backup_tasks.storage.s3.storage import S3Storage
from backup_tasks.storage.s3.versioned import VersionedReads
from backup_tasks.storage.s3.writer import S3Writer

__all__ = [
    "DEFAULT_PART_SIZE",
    "MIB",
    "MIN_PART_SIZE",
    "BucketGuard",
    "ErrorTranslator",
    "S3Clients",
    "S3Credentials",
    "S3Location",
    "S3Options",
    "S3ReadStream",
    "S3Reader",
    "S3Storage",
    "S3Writer",
    "VersionedReads",
    "content_md5",
]
