"""The catalog: one JSON manifest beside every backup, and nothing else.

``<id>.manifest.json`` sits next to the backup object it describes, at the top of the backup
location (in every version of this tool), so reading the catalog lists only that one level and never
walks the WAL archive beside it: ``list``, ``health``, ``verify``'s newest, ``existing_for_day`` and
prune's plan cost the number of backups, not of archived segments. A manifest is written only once
its backup is complete and durable, and create-only (``save_new``): the presence of a manifest means
"this backup exists", and a second backup under the same id cannot replace it. Verification results
are recorded by rewriting the manifest atomically (``save``). Listing, verifying, pruning and
restoring need no other state.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from typing import Any

from backup_tasks.clock import isoformat, parse_time, utcnow  # noqa: F401 (part of the catalog's vocabulary)
from backup_tasks.errors import BackupError, BackupIdTaken, BackupNotFound, ObjectMissing, StorageError
from backup_tasks.storage.base import Storage

log = logging.getLogger(__name__)

MANIFEST_SUFFIX = ".manifest.json"
FORMAT_VERSION = 1


@dataclass
class Verification:
    """The outcome of one restore-and-compare."""

    ok: bool
    verified_at: str
    duration_seconds: float
    method: str  # "throwaway-cluster" or "scratch-database"
    checked: list[str]  # what was compared: "sha256", "restore", "row-counts", "amcheck"
    tables_compared: int = 0
    indexes_checked: int = 0
    problems: list[str] = field(default_factory=list)
    server_version: str | None = None
    #: Extra facts of a snapshot verification or PITR drill (recovery end reached, target, timings).
    details: dict[str, Any] | None = None


@dataclass
class Manifest:
    id: str
    kind: str  # "dump" (snapshots add "snapshot")
    database: str
    server: str  # host:port, never credentials
    server_version: str
    started_at: str
    finished_at: str
    path: str  # relative to the backup directory
    size_bytes: int
    sha256: str
    compression: str
    format: str = "pg_dump-custom"
    tables: dict[str, int] = field(default_factory=dict)
    verification: Verification | None = None
    state: str = "complete"
    trading_day: str | None = None
    pg_dump_version: str | None = None
    encryption: dict[str, Any] | None = None
    tool: str = "backup-tasks"
    format_version: int = FORMAT_VERSION
    # --- snapshots (kind "snapshot"); None for dumps -------------------------------------------
    #: Every stored object of the backup: key -> {"size", "sha256", "role"}; ``path`` is the main one.
    files: dict[str, dict[str, Any]] | None = None
    start_lsn: str | None = None
    stop_lsn: str | None = None
    timeline: int | None = None
    system_identifier: str | None = None
    wal_segment_size: int | None = None
    start_segment: str | None = None  # first WAL segment recovery needs (from the archive or the snapshot)
    stop_segment: str | None = None  # segment holding the end of the backup: consistent from here
    restorable_from: str | None = None  # earliest recovery target time (ISO 8601, microseconds)
    restorable_until: str | None = None  # latest, as last seen in the WAL archive (refreshed by verify/prune)
    snapshot: dict[str, Any] | None = None  # source facts: superuser, archive settings, warnings...
    pitr_drill: dict[str, Any] | None = None  # the last point-in-time drill from this snapshot

    @property
    def key(self) -> str:
        return manifest_key(self.id)

    @property
    def started(self) -> datetime:
        return parse_time(self.started_at)

    @property
    def verified_ok(self) -> bool:
        return self.verification is not None and self.verification.ok

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if values.get("verification") is not None:
            vknown = {f.name for f in fields(Verification)}
            values["verification"] = Verification(**{k: v for k, v in values["verification"].items() if k in vknown})
        return cls(**values)


def manifest_key(backup_id: str) -> str:
    return f"{backup_id}{MANIFEST_SUFFIX}"


def save(storage: Storage, manifest: Manifest) -> None:
    """Write (or rewrite, atomically) the manifest: for updates such as a verification result."""
    storage.put_bytes(manifest.key, manifest.to_json().encode())


def save_new(storage: Storage, manifest: Manifest) -> None:
    """Record a new backup: create-only, so an existing backup with the same id is never overwritten.

    Raises ``BackupIdTaken`` (the existing manifest untouched) when the id is taken.
    """
    if not storage.put_new(manifest.key, manifest.to_json().encode()):
        raise BackupIdTaken(f"a backup named {manifest.id} is already in the catalog at {storage.location}; its "
                           f"manifest was left untouched and this one was not recorded")


def publish(storage: Storage, manifest: Manifest, *, data_keys: list[str]) -> None:
    """Record a finished backup (create-only; fenced when ``storage`` is a lease's); on failure neither its
    data nor a manifest remains."""
    try:
        save_new(storage, manifest)
    except BackupIdTaken:
        raise  # that manifest (and whatever is under the key) belongs to another run: touch nothing
    except BaseException:
        # Neither half may survive alone (a mirrored location may hold one manifest already).
        for key in [*data_keys, manifest_key(manifest.id)]:
            try:
                storage.delete(key)
            except BackupError as exc:
                log.warning("could not remove %s after a failed backup: %s", key, exc)
        raise


def load(storage: Storage, backup_id: str) -> Manifest:
    key = manifest_key(backup_id)
    try:
        return _parse(storage, key)
    except ObjectMissing:
        raise BackupNotFound(f"no backup {backup_id!r} in {storage.location} (see `backup-tasks list`)") from None


def _parse(storage: Storage, key: str) -> Manifest:
    try:
        return Manifest.from_dict(json.loads(storage.read_bytes(key)))
    except (ValueError, TypeError) as exc:
        raise StorageError(f"manifest {key} in {storage.location} is unreadable: {exc}") from None


def catalog(storage: Storage, *, kind: str | None = None, database: str | None = None) -> list[Manifest]:
    """Every readable manifest, oldest first. Unreadable manifests are skipped, not fatal.

    Only the top level of the location is listed (``recursive=False``): manifests live there.
    """
    found = []
    for obj in storage.list(recursive=False):
        if not obj.key.endswith(MANIFEST_SUFFIX):
            continue
        try:
            manifest = _parse(storage, obj.key)
        except StorageError:
            continue
        if (kind is None or manifest.kind == kind) and (database is None or manifest.database == database):
            found.append(manifest)
    return sorted(found, key=lambda m: (m.started_at, m.id))


def newest(storage: Storage, *, kind: str = "dump", database: str | None = None) -> Manifest:
    manifests = catalog(storage, kind=kind, database=database)
    if not manifests:
        raise BackupNotFound(f"no {kind} backup in {storage.location} yet (run `backup-tasks {kind}`)")
    return manifests[-1]


def record_verification(storage: Storage, backup_id: str, verification: Verification) -> Manifest:
    """Re-read the manifest and store the result in it (another process may have updated it)."""
    manifest = load(storage, backup_id)
    manifest.verification = verification
    save(storage, manifest)
    return manifest


def existing_for_day(storage: Storage, database: str, trading_day: str) -> Manifest | None:
    """The complete dump of ``database`` recorded for ``trading_day`` (post-close idempotency), if any."""
    for found in reversed(catalog(storage, kind="dump", database=database)):
        if found.trading_day == trading_day and found.state == "complete":
            return found
    return None
