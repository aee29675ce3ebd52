"""Which WAL archive a restore reads: the local one, or a bucket's ``wal/`` alone (disaster recovery).

The deployment archives into a local directory and copies every object to ``<BACKUP_COPY_TO>/wal``
under the same keys (``wal.archive``). After losing the host only the bucket is left; pointing
``BACKUP_DIR`` at the old ``BACKUP_COPY_TO`` and leaving ``WAL_ARCHIVE_DIR`` unset means "the archive
is ``<BACKUP_DIR>/wal``, read-only" (``Settings.wal_archive_url``); ``--as-of`` reads a bucket's
``wal/`` as it was then.

That archive is the same ``WalArchive``, over the bucket's ``wal/`` opened read-only: writers
(wal-push) keep their local archive. The costs stay what planning needs (``wal.contents``): one
paginated listing answers the names, existence and gaps; a trailer is one ranged read, made only
when asked for. boto3 is imported on the first request only.

The local archive of a deployment with ``BACKUP_COPY_TO`` is read together with its copy, as one
archive (``wal.contents.UnionContents``: a segment or history file the local archive lost is
found in the copy, and planning pays one listing of the copy); a bucket read alone has no copy.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from backup_tasks.errors import ConfigError
from backup_tasks.storage.locations import open_storage
from backup_tasks.wal.archive import WalArchive
from backup_tasks.wal.layout import COPY_SUBDIR


def archive_url(backup_dir: str) -> str:
    """Where the WAL lives under a ``BACKUP_DIR`` URL (as ``BACKUP_COPY_TO``'s copy: ``<url>/wal``)."""
    return f"{backup_dir.rstrip('/')}/{COPY_SUBDIR}"


def archive_at(url: str, *, identity_file: str | Path | None = None, as_of: datetime | None = None) -> WalArchive:
    """The WAL archive at ``url`` (a bucket's ``wal/``, or any location) alone, read-only; as of ``as_of``."""
    return WalArchive(open_storage(url.rstrip("/"), setting="BACKUP_DIR", as_of=as_of, read_only=True),
                      identity_file=identity_file)


def archive_for_reading(settings: Any, *, copy_on_gap: bool = False) -> WalArchive:
    """The archive restores read: the bucket's ``wal/`` when ``Settings.wal_archive_url`` says so, else local.

    ``copy_on_gap``: the local archive's copy is read only once a reader finds a hole (``WalArchive``).

    With ``--as-of`` (``settings.as_of``) the WAL is read from a bucket as it was then: BACKUP_DIR's
    ``wal/`` when it is a bucket, else BACKUP_COPY_TO's (a local archive keeps no earlier versions).
    """
    as_of = getattr(settings, "as_of", None)
    url = getattr(settings, "wal_archive_url", None)
    if as_of is not None:
        bucket = next((u for u in (settings.backup_dir, settings.copy_to) if u and u.startswith("s3://")), None)
        if bucket is None:
            raise ConfigError("--as-of needs a versioned s3:// location (BACKUP_DIR or BACKUP_COPY_TO): a local "
                              "WAL archive keeps no earlier versions")
        url = archive_url(bucket)
    if url:
        return archive_at(url, identity_file=settings.decrypt_identity_file, as_of=as_of)
    return WalArchive.for_settings(settings, copy_on_gap=copy_on_gap)
