"""The WAL archive read straight from a bucket: disaster recovery when the local archive is gone.

The deployment archives into a local directory and copies every object to ``<BACKUP_COPY_TO>/wal``
under the same keys (``wal.archive``). After losing the host only the bucket is left; pointing
``BACKUP_DIR`` at the old ``BACKUP_COPY_TO`` and leaving ``WAL_ARCHIVE_DIR`` unset means "the archive
is ``<BACKUP_DIR>/wal``, read-only" (``Settings.wal_archive_url``).

Read-only on purpose: writers (wal-push) keep their local archive. The costs are kept to what
planning needs: one paginated listing of ``wal/`` (cached) answers ``segment_names``, ``exists`` and
gaps; a trailer is a ranged GET of the object's last bytes, made only when asked for (coverage needs
the end segment's, the commit scan a few). boto3 is imported on the first request only.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backup_tasks.errors import ConfigError, ObjectMissing, WalArchiveError, WalCorrupt, WalGap, WalMissing
from backup_tasks.wal.archive import (
    COPY_SUBDIR,
    HISTORY_DIR,
    INCOMING_MARK,
    SUFFIX,
    TRAILER_SIZE,
    PushResult,
    Trailer,
    WalArchive,
    object_key,
    parse_trailer,
)
from backup_tasks.wal.names import HISTORY_RE, SEGMENT_RE, kind_of, position

if TYPE_CHECKING:
    from backup_tasks.storage.base import ObjectInfo, Storage

#: A root that is never a directory: code that looks for local files (restore points) finds none.
NO_LOCAL_ROOT = Path(os.devnull) / "bucket-wal-archive"


def archive_url(backup_dir: str) -> str:
    """Where the WAL lives under a ``BACKUP_DIR`` URL (as ``BACKUP_COPY_TO``'s copy: ``<url>/wal``)."""
    return f"{backup_dir.rstrip('/')}/{COPY_SUBDIR}"


def archive_for_reading(settings: Any) -> WalArchive:
    """The archive restores read: the bucket's ``wal/`` when ``Settings.wal_archive_url`` says so, else local.

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
        return RemoteWalArchive(url, identity_file=settings.decrypt_identity_file, as_of=as_of)
    return WalArchive.for_settings(settings)


def read_tail(storage: Storage, key: str, count: int) -> bytes:
    """The last ``count`` bytes of an object: a ranged GET in a bucket (as of its ``as_of``), a seek in a file."""
    from backup_tasks.storage.s3 import S3Storage  # the driver's module; boto3 is imported by its client only

    if isinstance(storage, S3Storage):
        return storage.read_tail(key, count)
    with storage.open(key) as fh:
        if fh.seekable():
            fh.seek(0, io.SEEK_END)
            fh.seek(max(0, fh.tell() - count))
            return fh.read()
        return fh.read()[-count:]


class RemoteWalArchive(WalArchive):
    """A read-only view of ``<url>`` (a ``wal/`` prefix in a bucket, or any storage location) as a WAL archive."""

    def __init__(self, url: str, *, identity_file: str | Path | None = None, storage: Storage | None = None,
                 as_of: datetime | None = None) -> None:
        super().__init__(NO_LOCAL_ROOT, None, identity_file=identity_file)
        self.url = url.rstrip("/")
        self.as_of = as_of  # read the bucket as it was then (``--as-of``: a versioned bucket)
        self._storage = storage
        self._listing: dict[str, ObjectInfo] | None = None
        self._trailers: dict[str, Trailer] = {}

    def __repr__(self) -> str:
        return f"RemoteWalArchive({self.url!r})"

    @property
    def location(self) -> str:
        return self.url

    @property
    def storage(self) -> Storage:
        if self._storage is None:
            from backup_tasks.storage.locations import open_storage  # boto3 on first use only

            self._storage = open_storage(self.url, setting="BACKUP_DIR", as_of=self.as_of)
        return self._storage

    def available(self) -> bool:
        return True

    # the listing: one paginated request for the whole archive, cached -----------------------------

    def listing(self) -> dict[str, ObjectInfo]:
        if self._listing is None:
            self._listing = {info.key: info for info in self.storage.list("", recursive=True)}
        return self._listing

    def refresh(self) -> None:
        self._listing = None

    def _listed(self, pattern: re.Pattern[str], directory: str | None) -> list[str]:
        found = []
        for key in self.listing():
            folder, _, entry = key.rpartition("/")
            if not entry.endswith(SUFFIX) or INCOMING_MARK in entry:
                continue
            if directory is None and not (len(folder) == 16 and re.fullmatch(r"[0-9A-F]{16}", folder)):
                continue
            if directory is not None and folder != directory:
                continue
            base = entry[:-len(SUFFIX)]
            if pattern.match(base):
                found.append(base)
        return found

    def segment_names(self) -> list[str]:
        return sorted(self._listed(SEGMENT_RE, None), key=lambda n: (position(n), n[:8]))

    def names(self) -> list[str]:
        anything = re.compile(r".")
        return sorted(self._listed(anything, None) + self._listed(anything, HISTORY_DIR))

    def history_names(self) -> list[str]:
        return sorted(self._listed(HISTORY_RE, HISTORY_DIR))

    def exists(self, name: str) -> bool:
        return object_key(name) in self.listing()

    def size_of(self, name: str) -> int:
        info = self.listing().get(object_key(name))
        return info.size if info else 0

    def later_segment_exists(self, name: str) -> bool:
        tli, pos = name[:8], position(name)
        return any(n[:8] == tli and position(n) > pos for n in self.segment_names())

    # reading objects --------------------------------------------------------------------------------

    def trailer(self, name: str) -> Trailer:
        if name not in self._trailers:
            key = object_key(name)
            try:
                tail = read_tail(self.storage, key, TRAILER_SIZE)
            except ObjectMissing:
                raise WalMissing(f"{name} is not in the WAL archive {self.url}") from None
            if len(tail) < TRAILER_SIZE:
                raise WalCorrupt(f"archived {name} in {self.url} is damaged: only {len(tail)} bytes")
            self._trailers[name] = parse_trailer(tail, f"archived {name} in {self.url}")
        return self._trailers[name]

    def raw_object(self, name: str) -> bytes:
        """The archived object of ``name`` as stored (compressed, maybe encrypted, with its trailer)."""
        try:
            return self.storage.read_bytes(object_key(name))
        except ObjectMissing:
            if kind_of(name) == "segment" and self.later_segment_exists(name):
                raise WalGap(f"WAL segment {name} is missing from the archive {self.url} although later "
                             f"segments of its timeline are there: recovery cannot go past this gap") from None
            raise WalMissing(f"{name} is not in the WAL archive {self.url}") from None

    def verified_chunks(self, name: str, digest: hashlib._Hash) -> Iterator[bytes]:
        data = self.raw_object(name)
        yield from self._verified_stream(io.BytesIO(data), len(data), name, digest)

    def fetch(self, name: str, destination: Path) -> int:
        kind_of(name)
        data = self.raw_object(name)  # before the destination is touched: a missing file leaves nothing
        return self._write_atomically(name, destination,
                                      self._verified_stream(io.BytesIO(data), len(data), name, hashlib.sha256()))

    # never written through this view --------------------------------------------------------------------

    def push(self, source: Path, *, level: int = 1) -> PushResult:
        raise WalArchiveError(f"the WAL archive {self.url} is read here for a restore only; wal-push writes to a "
                              f"local WAL_ARCHIVE_DIR (and copies to BACKUP_COPY_TO)")

    def delete(self, name: str) -> None:
        raise WalArchiveError(f"the WAL archive {self.url} is read-only here")
