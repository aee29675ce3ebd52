"""Several backup locations seen as one: ``BACKUP_DIR`` plus the optional ``BACKUP_COPY_TO``.

Every finished backup, manifest and WAL segment goes to both, in the same relative layout
(``MirroredStorage.writer`` tees one stream into two writers and publishes in both or neither).
Reads prefer the primary and fall back to the copy when an object is missing there or fails
its checksum (``first_good``); ``check_locations`` checks every location, so verify can say
which one is damaged and which one is still good; ``holders`` says where a backup lives, for
``list``. ``probe`` answers ``check``'s question: is this location reachable and writable?
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

from .errors import BackupCorrupt, BackupError, ConfigError, ObjectMissing, StorageError
from .storage import ObjectInfo, ObjectWriter, Storage, open_storage

log = logging.getLogger(__name__)

CHUNK = 1 << 20


# --- a writer that knows what it stored -------------------------------------------------------------

class HashingWriter:
    """Passes bytes to ``inner`` and keeps their sha256 and count: the manifest's view of the stored object."""

    def __init__(self, inner: ObjectWriter) -> None:
        self.inner = inner
        self.digest = hashlib.sha256()
        self.bytes_written = 0

    def write(self, data: bytes) -> None:
        self.digest.update(data)
        self.inner.write(data)
        self.bytes_written += len(data)

    def hexdigest(self) -> str:
        return self.digest.hexdigest()

    def commit(self) -> None:
        self.inner.commit()

    def abort(self) -> None:
        self.inner.abort()


# --- two locations as one ---------------------------------------------------------------------------

class TeeWriter:
    """Writes one stream to two locations; commit publishes in both or in neither."""

    def __init__(self, primary: ObjectWriter, copy: ObjectWriter, *, key: str, copy_location: str) -> None:
        self.primary = primary
        self.copy = copy
        self.key = key
        self.copy_location = copy_location
        self.bytes_written = 0
        self._closed = False

    def write(self, data: bytes) -> None:
        try:
            self.primary.write(data)
            self.copy.write(data)
        except BaseException:
            self.abort()
            raise
        self.bytes_written += len(data)

    def commit(self) -> None:
        # The copy first: if the primary then fails, the copy is deleted again; either way no location
        # keeps an object the other lacks, and a manifest is only written after both succeeded.
        try:
            self.copy.commit()
        except BaseException:
            self._closed = True
            self.primary.abort()
            raise
        try:
            self.primary.commit()
        except BaseException:
            self._closed = True
            self._after_primary_failed()
            raise
        self._closed = True

    def _after_primary_failed(self) -> None:
        delete = getattr(self, "delete_copy", None)
        if delete is not None:
            try:
                delete()
            except Exception as exc:
                log.warning("could not remove %s from %s after the primary write failed: %s",
                            self.key, self.copy_location, exc)

    def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        for writer in (self.primary, self.copy):
            try:
                writer.abort()
            except Exception:
                pass

    def __enter__(self) -> TeeWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if not self._closed:
            self.abort()


class MirroredStorage:
    """``BACKUP_DIR`` plus ``BACKUP_COPY_TO`` behind the ``Storage`` interface.

    Writes and deletes go to both. Reads come from the primary, or from the copy when the
    primary lacks the object (checksum fallback needs the manifest: see ``first_good``). ``list``
    is the union, each key once.
    """

    def __init__(self, primary: Storage, copy: Storage) -> None:
        if primary.location == copy.location:
            raise ConfigError(f"BACKUP_COPY_TO must name a different location than BACKUP_DIR ({copy.location})")
        self.primary = primary
        self.copy = copy
        self.location = primary.location
        self.members: tuple[Storage, ...] = (primary, copy)

    def writer(self, key: str) -> TeeWriter:
        primary = self.primary.writer(key)
        try:
            copy = self.copy.writer(key)
        except BaseException:
            primary.abort()
            raise
        tee = TeeWriter(primary, copy, key=key, copy_location=self.copy.location)
        tee.delete_copy = lambda: self.copy.delete(key)  # type: ignore[attr-defined]
        return tee

    def open(self, key: str) -> BinaryIO:
        # Missing, or the primary location itself broken (a dead disk is what the copy is for).
        try:
            return self.primary.open(key)
        except StorageError as primary_error:
            log.warning("cannot read %s from %s (%s); reading it from %s", key, self.primary.location,
                        primary_error, self.copy.location)
            try:
                return self.copy.open(key)
            except StorageError:
                raise primary_error from None

    def read_bytes(self, key: str) -> bytes:
        with self.open(key) as fh:
            return fh.read()

    def put_bytes(self, key: str, data: bytes) -> None:
        self.copy.put_bytes(key, data)
        self.primary.put_bytes(key, data)

    def exists(self, key: str) -> bool:
        return self.primary.exists(key) or self.copy.exists(key)

    def size(self, key: str) -> int:
        if self.primary.exists(key):
            return self.primary.size(key)
        return self.copy.size(key)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        seen = {obj.key: obj for obj in self.copy.list(prefix)}
        seen.update({obj.key: obj for obj in self.primary.list(prefix)})
        return sorted(seen.values(), key=lambda o: o.key)

    def delete(self, key: str) -> None:
        # Both, even when one fails: then raise the first failure.
        failure: StorageError | None = None
        for member in self.members:
            try:
                member.delete(key)
            except StorageError as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    def clear_partials(self, prefix: str = "") -> list[str]:
        return [*self.primary.clear_partials(prefix), *self.copy.clear_partials(prefix)]

    def holders(self, key: str) -> list[str]:
        return holders(self.members, key)


def open_locations(backup_dir: str, copy_to: str | None = None) -> Storage:
    """``BACKUP_DIR``, mirrored to ``BACKUP_COPY_TO`` when that is set."""
    primary = open_storage(backup_dir)
    if not copy_to:
        return primary
    return MirroredStorage(primary, open_storage(copy_to, setting="BACKUP_COPY_TO"))


def members(storage: Storage) -> tuple[Storage, ...]:
    """The individual locations behind ``storage`` (itself when it is a single one)."""
    return storage.members if isinstance(storage, MirroredStorage) else (storage,)


# --- integrity across locations ---------------------------------------------------------------------

@dataclass
class LocationCheck:
    """One location's copy of one object, checked against the manifest."""

    location: str
    state: str  # "ok", "missing", "damaged" (size or checksum differ) or "unreadable" (storage error)
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.state == "ok"


def check_object(storage: Storage, key: str, *, size: int, sha256: str) -> LocationCheck:
    """Stream ``key`` from one location through sha256 and compare with the manifest's size and digest."""
    digest = hashlib.sha256()
    got = 0
    try:
        with storage.open(key) as fh:
            while chunk := fh.read(CHUNK):
                digest.update(chunk)
                got += len(chunk)
    except BackupError as exc:
        try:
            missing = isinstance(exc, ObjectMissing) or not storage.exists(key)
        except BackupError:
            missing = False
        if missing:
            return LocationCheck(storage.location, "missing", f"{key} is missing from {storage.location}")
        return LocationCheck(storage.location, "unreadable", f"{key} cannot be read from {storage.location}: {exc}")
    if got != size:
        return LocationCheck(storage.location, "damaged", f"{key} in {storage.location} is {got} bytes but its "
                                                          f"manifest says {size}: truncated or overwritten")
    if digest.hexdigest() != sha256:
        return LocationCheck(storage.location, "damaged", f"{key} in {storage.location} fails its checksum (sha256 "
                                                          f"{digest.hexdigest()[:16]}… instead of {sha256[:16]}…): "
                                                          f"damaged")
    return LocationCheck(storage.location, "ok")


def check_locations(storage: Storage, key: str, *, size: int, sha256: str) -> list[LocationCheck]:
    """Check ``key`` in every location (verify: exit 1 unless every one is ok)."""
    return [check_object(member, key, size=size, sha256=sha256) for member in members(storage)]


def summarize(checks: Sequence[LocationCheck]) -> str:
    """One line for verify and errors: what is wrong where, and which location is still good."""
    good = [c.location for c in checks if c.ok]
    bad = [c.problem or f"{c.location}: {c.state}" for c in checks if not c.ok]
    if not bad:
        return f"intact in {', '.join(good)}"
    return "; ".join(bad) + (f"; still good in {', '.join(good)}" if good else "; no location holds a good copy")


def _none_good(key: str, checks: Sequence[LocationCheck]) -> BackupError:
    if all(c.state == "missing" for c in checks):
        return ObjectMissing(f"{key} is missing from every location ({', '.join(c.location for c in checks)})")
    if any(c.state == "damaged" for c in checks):
        return BackupCorrupt(summarize(checks))
    return StorageError(summarize(checks))


def first_good(storage: Storage, key: str, *, size: int, sha256: str) -> tuple[Storage, list[LocationCheck]]:
    """The first location (primary first) whose ``key`` matches the manifest, and what was found on the way.

    Raises ``ObjectMissing``, ``BackupCorrupt`` or ``StorageError`` when no location has a good
    copy. Restore reads from the returned location only (checksum first, then the restore).
    """
    checks: list[LocationCheck] = []
    for member in members(storage):
        check = check_object(member, key, size=size, sha256=sha256)
        checks.append(check)
        if check.ok:
            if len(checks) > 1:
                log.warning("reading %s from %s: %s", key, member.location, summarize(checks))
            return member, checks
    raise _none_good(key, checks)


def read_first_good(storage: Storage, key: str, *, size: int, sha256: str) -> bytes:
    """A small object (a WAL segment) from the first location where it matches: one download per location tried."""
    checks: list[LocationCheck] = []
    for member in members(storage):
        try:
            data = member.read_bytes(key)
        except BackupError as exc:
            try:
                missing = isinstance(exc, ObjectMissing) or not member.exists(key)
            except BackupError:
                missing = False
            checks.append(LocationCheck(member.location, "missing" if missing else "unreadable",
                                        f"{key} is missing from {member.location}" if missing else
                                        f"{key} cannot be read from {member.location}: {exc}"))
            continue
        if len(data) == size and hashlib.sha256(data).hexdigest() == sha256:
            if checks:
                log.warning("reading %s from %s: %s", key, member.location, summarize(checks))
            return data
        checks.append(LocationCheck(member.location, "damaged", f"{key} in {member.location} fails its checksum"))
    raise _none_good(key, checks)


def holders(stores: Sequence[Storage], key: str) -> list[str]:
    """The locations that hold ``key`` (by existence; checksums are verify's business)."""
    found = []
    for member in stores:
        try:
            if member.exists(key):
                found.append(member.location)
        except BackupError:
            continue
    return found


def listing_by_location(storage: Storage, prefix: str = "") -> dict[str, list[str]]:
    """key -> locations holding it, with one listing per location (what ``list`` needs for many backups)."""
    where: dict[str, list[str]] = {}
    for member in members(storage):
        for obj in member.list(prefix):
            where.setdefault(obj.key, []).append(member.location)
    return where


# --- check: reachable and writable ------------------------------------------------------------------

@dataclass
class LocationStatus:
    location: str
    role: str  # "primary" or "copy"
    reachable: bool
    writable: bool
    seconds: float
    error: str | None = None
    error_type: str | None = None


def probe(storage: Storage, *, role: str = "primary") -> LocationStatus:
    """List, then write and delete a tiny object: reachable and writable, or the reason why not."""
    started = time.monotonic()
    key = f".backup-tasks-probe-{uuid.uuid4().hex[:12]}"
    reachable = writable = False
    try:
        storage.list(".backup-tasks-probe-none")
        reachable = True
        storage.put_bytes(key, b"backup-tasks probe\n")
        storage.delete(key)
        writable = True
    except BackupError as exc:
        return LocationStatus(storage.location, role, reachable, writable, round(time.monotonic() - started, 3),
                              str(exc), type(exc).__name__)
    return LocationStatus(storage.location, role, reachable, writable, round(time.monotonic() - started, 3))


def probe_all(storage: Storage) -> list[LocationStatus]:
    return [probe(member, role="primary" if i == 0 else "copy") for i, member in enumerate(members(storage))]


# --- settings -------------------------------------------------------------------------------------

def check_location_setting(value: str, setting: str, *, other: str | None = None) -> str:
    """Validate ``BACKUP_DIR``/``BACKUP_COPY_TO`` without touching the network; the normalized value.

    A local path is expanded (``~``); an ``s3://`` URL must name a bucket; any other URL is a
    ``ConfigError``. With ``other``, the two settings must not name the same place.
    """
    from pathlib import Path

    from .storage_s3 import S3Location

    value = value.strip()
    if value.startswith("s3://"):
        normalized = S3Location.parse(value, setting=setting).url
    elif "://" in value:
        raise ConfigError(f"{setting} must be a local directory path or an s3://BUCKET/PREFIX URL, got: {value}")
    else:
        normalized = str(Path(value).expanduser().resolve())
    if other is not None:
        other_normalized = check_location_setting(other, "BACKUP_DIR")
        if other_normalized == normalized:
            raise ConfigError(f"{setting} names the same location as BACKUP_DIR ({normalized}); a copy must live "
                              f"somewhere else")
    return value if value.startswith("s3://") else str(Path(value).expanduser())
