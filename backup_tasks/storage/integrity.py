"""Is a stored object what its manifest says? Size and sha256 in each location, and the first good copy.

``check_locations`` checks every location, so verify can say which one is damaged and which one is
still good; ``first_good`` is where a restore reads from; ``probe`` answers ``check``'s question (is
this location reachable and writable?). ``HashingWriter`` computes the manifest's view of an
object while it is written.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from backup_tasks.errors import BackupCorrupt, BackupError, ObjectLocked, ObjectMissing, StorageAuthFailed, StorageError
from backup_tasks.storage.base import ObjectWriter, Storage, members
from backup_tasks.storage.objectlock import BucketProtection

log = logging.getLogger(__name__)

CHUNK = 1 << 20
#: The object ``probe`` writes and deletes. One fixed key: in a locked bucket each probe leaves a
#: version the lock holds, and a later probe deletes those whose lock has ended.
PROBE_KEY = ".backup-tasks-probe"


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
        if isinstance(exc, ObjectMissing):  # every driver says "missing" this way, and only when it is
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
            missing = isinstance(exc, ObjectMissing)
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


def listing_by_location(storage: Storage, prefix: str = "", *, recursive: bool = False) -> dict[str, list[str]]:
    """key -> locations holding it, with one listing per location (what ``list`` needs for many backups).

    Backups sit at the top of their location, so by default the listing does not walk the WAL archive.
    """
    where: dict[str, list[str]] = {}
    for member in members(storage):
        for obj in member.list(prefix, recursive=recursive):
            where.setdefault(obj.key, []).append(member.location)
    return where


@dataclass
class LocationStatus:
    location: str
    role: str  # "primary" or "copy"
    reachable: bool
    writable: bool
    seconds: float
    error: str | None = None
    error_type: str | None = None
    #: A bucket's "Enabled", "Suspended" or "Off"; None for a directory, or a store that would not say.
    versioning: str | None = None
    #: Whether the bucket has Object Lock enabled; None as for ``versioning``.
    object_lock: bool | None = None
    #: The retention backup-tasks gives what it writes here ("GOVERNANCE, 30 days"), or None.
    lock: str | None = None
    #: The bucket's own default retention, or None.
    default_retention: str | None = None
    #: Why the probe object written could not be deleted again (a lock holds it, or append-only
    #: credentials): writes work, and deleting is prune's business, with its own credentials.
    delete_refused: str | None = None


def probe(storage: Storage, *, role: str = "primary") -> LocationStatus:
    """List, then write and delete a tiny object: reachable and writable, or the reason why not.

    For a bucket also what it enforces (versioning, Object Lock); a lock it cannot keep makes the
    write fail with the ``ConfigError`` naming what to enable.
    """
    started = time.monotonic()
    status = LocationStatus(storage.location, role, False, False, 0.0)
    lock = getattr(storage, "lock", None)
    status.lock = lock.describe() if lock is not None else None
    try:
        storage.list(f"{PROBE_KEY}-none", recursive=False)
        status.reachable = True
        protection: Callable[[], BucketProtection] | None = getattr(storage, "protection", None)
        if protection is not None:
            found = protection()
            status.versioning, status.object_lock = found.versioning, found.object_lock
            status.default_retention = found.default_retention
        storage.put_bytes(PROBE_KEY, b"backup-tasks probe\n")
        status.writable = True
        try:
            storage.delete(PROBE_KEY)
        except (ObjectLocked, StorageAuthFailed) as exc:
            status.delete_refused = str(exc)
    except BackupError as exc:
        status.error, status.error_type = str(exc), type(exc).__name__
    status.seconds = round(time.monotonic() - started, 3)
    return status


def probe_all(storage: Storage) -> list[LocationStatus]:
    return [probe(member, role="primary" if i == 0 else "copy") for i, member in enumerate(members(storage))]
