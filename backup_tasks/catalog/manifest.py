"""The catalog: one JSON manifest beside every backup, and nothing else.

``<id>.manifest.json`` sits next to the backup object it describes, at the top of the backup
location (in every version of this tool), so reading the catalog lists only that one level and never
walks the WAL archive beside it: ``list``, ``health``, ``verify``'s newest, ``existing_for_day`` and
prune's plan cost the number of backups, not of archived segments. A manifest is written only once
its backup is complete and durable, and create-only (``save_new``): the presence of a manifest means
"this backup exists", and a second backup under the same id cannot replace it.

Nothing is ever rewritten in place (an S3 Object Lock bucket refuses it, and what was written first
must survive): whatever is learnt later about a backup (a verification verdict, a PITR drill, how far
the WAL archive now reaches) is a *record*, a new create-only object beside the manifest,
``<id>.<stamp>-<token>.<kind>.record.json``. Readers apply a backup's records to its manifest in the
order they were written, so ``Manifest.verification``, ``pitr_drill`` and ``restorable_until`` are the
latest known; manifests of earlier versions (verification written into the manifest) read unchanged.
The records come from the same top-level listing as the manifests: no extra request to find them.

"The order they were written" is not the writers' clocks (a host whose clock runs ahead would let
its older verdict override a later one): each record carries a ``sequence``, one above the highest
of the backup's records its writer read (a Lamport counter), and readers apply records by sequence,
then by the stamp in the key, then by the key. Records of earlier versions carry none (sequence 0):
among themselves they sort by their stamps as before, and every newer record follows them. A record
also carries the ``system_identifier`` of its backup; one naming another system (another deployment's,
through a shared copy prefix) is not applied (see ``catalog.system``).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from backup_tasks.catalog.ids import later_backup_id
from backup_tasks.catalog.system import catalog_system, claim_catalog, is_foreign
from backup_tasks.clock import isoformat, parse_time, utcnow
from backup_tasks.errors import BackupError, BackupIdTaken, BackupNotFound, ObjectMissing, StorageError
from backup_tasks.postgres.tools import major_of
from backup_tasks.storage.base import Storage
from backup_tasks.wal.system import IDENTITY_KEY

log = logging.getLogger(__name__)

MANIFEST_SUFFIX = ".manifest.json"
RECORD_SUFFIX = ".record.json"
RECORD_STAMP = "%Y%m%dT%H%M%S%fZ"
_STAMP = re.compile(r"\d{8}T\d{12}Z-[0-9a-f]+")
FORMAT_VERSION = 1
#: What a record may say about a backup, and the manifest field it sets.
RECORD_KINDS = ("verification", "drill", "coverage")


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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Verification:
        known = {f.name for f in fields(cls)}  # a newer version's extra keys are ignored
        return cls(**{k: v for k, v in data.items() if k in known})


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
    #: Dumps: the cluster-level objects saved beside the dump (roles the database needs, their memberships
    #: and settings, the database's own properties): the object's key and what it holds (``logical.globals``).
    cluster_objects: dict[str, Any] | None = None
    #: Tables whose rows no physical recovery brings back (unlogged: always empty after crash recovery or PITR).
    #: Their rows are in ``tables`` all the same (a dump copies them); snapshot checks expect them empty.
    unlogged_tables: list[str] | None = None
    #: Every stored object of the backup: key -> {"size", "sha256", "role"}; ``path`` is the main one (a dump:
    #: the dump and its "cluster-objects"; dumps of earlier versions: None).
    files: dict[str, dict[str, Any]] | None = None
    # --- snapshots (kind "snapshot"); None for dumps -------------------------------------------
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
    #: Incremental snapshots (PostgreSQL 17+): the snapshot this one was taken against, and its chain, root (a
    #: full) first, this one last (``physical.chain``). None for a full: a restore needs ``chain_ids``.
    parent: str | None = None
    chain: list[str] | None = None
    #: The keys of the records applied to this manifest (read state: never written into the manifest).
    record_keys: list[str] = field(default_factory=list, compare=False, repr=False)
    #: The highest ``sequence`` of those records (read state): the next record of this backup takes one more.
    record_sequence: int = field(default=0, compare=False, repr=False)

    @property
    def key(self) -> str:
        return manifest_key(self.id)

    @property
    def started(self) -> datetime:
        return parse_time(self.started_at)

    @property
    def duration_seconds(self) -> float:
        """How long taking the backup took (start to finish, as recorded)."""
        return max(0.0, (parse_time(self.finished_at) - self.started).total_seconds())

    @property
    def verified_ok(self) -> bool:
        return self.verification is not None and self.verification.ok

    @property
    def restorable(self) -> bool:
        """A complete snapshot that says where its WAL starts and how big a segment is: PITR can start from it."""
        return self.kind == "snapshot" and self.state == "complete" and bool(self.start_segment) \
            and bool(self.wal_segment_size)

    @property
    def stored_keys(self) -> list[str]:
        """Every object of the backup except the manifest: data first (a snapshot has several), then records."""
        return [*(k for k in (self.files or {}) if k != self.path), self.path, *self.record_keys]

    @property
    def chain_ids(self) -> list[str]:
        """The backups a restore from this one needs, root first: ``[id]`` for a full snapshot or a dump."""
        return list(self.chain) if self.chain else [self.id]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for name in READ_STATE:
            del data[name]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        known = {f.name for f in fields(cls)} - set(READ_STATE)
        values = {k: v for k, v in data.items() if k in known}
        if values.get("verification") is not None:
            values["verification"] = Verification.from_dict(values["verification"])
        return cls(**values)


#: Fields of ``Manifest`` that describe how it was read, never written.
READ_STATE = ("record_keys", "record_sequence")


def manifest_key(backup_id: str) -> str:
    return f"{backup_id}{MANIFEST_SUFFIX}"


def save_new(storage: Storage, manifest: Manifest) -> None:
    """Record a new backup: create-only, so an existing backup with the same id is never overwritten.

    Raises ``BackupIdTaken`` (the existing manifest untouched) when the id is taken.
    """
    if not storage.put_new(manifest.key, manifest.to_json().encode()):
        raise BackupIdTaken(f"a backup named {manifest.id} is already in the catalog at {storage.location}; its "
                           f"manifest was left untouched and this one was not recorded")


def publish(storage: Storage, manifest: Manifest, *, data_keys: list[str]) -> None:
    """Record a finished backup (create-only; fenced when ``storage`` is a lease's); on failure neither its
    data nor a manifest remains. The catalog records the backup's system first, or refuses another's
    (``catalog.system``: the first backup's system is the catalog's)."""
    try:
        if manifest.system_identifier:
            # With its major: the first backup of a pg_upgrade'd server whose pre-check opened no generation
            # (an upgrade begun meanwhile) opens it here, as ``catalog.system`` allows.
            claim_catalog(storage, manifest.system_identifier, backup=f"backup {manifest.id}",
                          major=major_of(manifest.server_version) or None)
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


def record_key(backup_id: str, kind: str, recorded_at: datetime) -> str:
    # The stamp sorts in time order; the token keeps two records of one microsecond apart.
    stamp = recorded_at.astimezone(UTC).strftime(RECORD_STAMP)
    return f"{backup_id}.{stamp}-{secrets.token_hex(3)}.{kind}{RECORD_SUFFIX}"


def record_time(key: str) -> datetime:
    """When the record ``key`` (a key ``parse_record_key`` accepts) was written, from its stamp."""
    stamp = key[: -len(RECORD_SUFFIX)].rsplit(".", 2)[1].split("-")[0]
    return datetime.strptime(stamp, RECORD_STAMP).replace(tzinfo=UTC)


def parse_record_key(key: str) -> tuple[str, str, str] | None:
    """``(backup_id, stamp, kind)`` of a record key, or None when ``key`` is not one."""
    if not key.endswith(RECORD_SUFFIX) or "/" in key:
        return None
    parts = key[: -len(RECORD_SUFFIX)].rsplit(".", 2)
    if len(parts) != 3 or parts[2] not in RECORD_KINDS or not _STAMP.fullmatch(parts[1]):
        return None
    return parts[0], parts[1], parts[2]


def add_record(storage: Storage, backup_id: str, kind: str, data: dict[str, Any], *,
               now: datetime | None = None, seen: Manifest | None = None) -> str:
    """Record a later fact about ``backup_id`` beside its manifest (create-only); its key.

    Its ``sequence`` is one above the highest of the backup's records as read here (or in ``seen``, the
    backup as the caller just loaded it), so it is applied after every record its writer knew of,
    whatever the clocks say. A backup no longer in the catalog (pruned meanwhile) gets an orphan record,
    which the next prune removes.
    """
    if kind not in RECORD_KINDS:
        raise ValueError(f"unknown record kind {kind!r}")
    if seen is None:
        try:
            seen = load(storage, backup_id)
        except BackupNotFound:
            pass
    recorded_at = now or utcnow()
    document = json.dumps({"backup_id": backup_id, "kind": kind, "recorded_at": isoformat(recorded_at),
                           "sequence": (seen.record_sequence if seen else 0) + 1,
                           "system_identifier": seen.system_identifier if seen else None,
                           "data": data}, indent=2) + "\n"
    for _ in range(3):
        key = record_key(backup_id, kind, recorded_at)
        if storage.put_new(key, document.encode()):
            return key
    raise StorageError(f"could not record the {kind} of {backup_id} in {storage.location}: every new key was taken")


def free_backup_id(storage: Storage, wanted: str) -> str:
    """``wanted``, or the next second whose id no backup in ``storage`` has (``ids.later_backup_id``).

    Ids have one-second resolution: a day's dump can want the id of another day's dump or a manual one
    taken in the same second. The manifest is written create-only all the same (``BackupIdTaken``).
    """
    candidate: str | None = wanted
    for _ in range(60):
        if candidate is None:
            break
        if not storage.exists(manifest_key(candidate)):
            return candidate
        candidate = later_backup_id(candidate)
    raise BackupIdTaken(f"a backup named {wanted} already exists; not overwriting it")


def clear_partial_records(storage: Storage, backup_id: str) -> None:
    """Remove what killed writers left under ``backup_id`` (a record half-written): a live writer's is never touched
    (``Storage.clear_partials``). Failing to look is only logged: it must not keep a verdict from being recorded."""
    try:
        removed = storage.clear_partials(prefix=f"{backup_id}.")
    except StorageError as exc:
        log.warning("could not look for partial records of %s: %s", backup_id, exc)
        return
    if removed:
        log.info("removed %d partial object(s) of %s left by an interrupted run", len(removed), backup_id)


def _apply(manifest: Manifest, kind: str, data: dict[str, Any]) -> None:
    if kind == "verification":
        manifest.verification = Verification.from_dict(data)
    elif kind == "drill":
        manifest.pitr_drill = data
    elif kind == "coverage":
        manifest.restorable_until = data.get("restorable_until", manifest.restorable_until)


def _with_records(storage: Storage, manifest: Manifest, record_keys: list[str]) -> Manifest:
    """``manifest`` with its records applied in the order they were written (see the module docstring).

    A record that cannot be read is skipped (its key still belongs to the backup: prune deletes it with
    it); one about another system's backup of the same id is neither applied nor the backup's.
    """
    readable: list[tuple[int, datetime, str, dict[str, Any]]] = []
    for key in record_keys:  # keys ``parse_record_key`` accepted
        try:
            document = json.loads(storage.read_bytes(key))
            entry = (int(document.get("sequence") or 0), record_time(key), key, dict(document["data"]))
            system = document.get("system_identifier")
        except (ValueError, TypeError, KeyError, AttributeError, StorageError) as exc:
            log.warning("record %s in %s is unreadable, skipped: %s", key, storage.location, exc)
            manifest.record_keys.append(key)
            continue
        if system and manifest.system_identifier and system != manifest.system_identifier:
            log.warning("record %s in %s is about a backup of system %s, not %s: not applied", key, storage.location,
                        system, manifest.system_identifier)
            continue
        readable.append(entry)
    for sequence, _written, key, data in sorted(readable, key=lambda entry: entry[:3]):
        manifest.record_keys.append(key)
        manifest.record_sequence = max(manifest.record_sequence, sequence)
        try:
            _apply(manifest, key[: -len(RECORD_SUFFIX)].rsplit(".", 1)[1], data)
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("record %s in %s is unreadable, skipped: %s", key, storage.location, exc)
    return manifest


def load(storage: Storage, backup_id: str) -> Manifest:
    key = manifest_key(backup_id)
    try:
        manifest = _parse(storage, key)
    except ObjectMissing:
        raise BackupNotFound(f"no backup {backup_id!r} in {storage.location} (see `backup-tasks list`)") from None
    records = [obj.key for obj in storage.list(f"{backup_id}.", recursive=False)
               if (parsed := parse_record_key(obj.key)) and parsed[0] == backup_id]
    return _with_records(storage, manifest, records)


def _parse(storage: Storage, key: str) -> Manifest:
    try:
        return Manifest.from_dict(json.loads(storage.read_bytes(key)))
    except (ValueError, TypeError) as exc:
        raise StorageError(f"manifest {key} in {storage.location} is unreadable: {exc}") from None


def _top_level(storage: Storage) -> tuple[list[str], dict[str, list[str]], bool]:
    """The one listing of the catalog: manifest keys, record keys by backup id, and whether the catalog records its
    system (``catalog.system``)."""
    manifest_keys: list[str] = []
    records: dict[str, list[str]] = defaultdict(list)
    identified = False
    for obj in storage.list(recursive=False):
        if obj.key.endswith(MANIFEST_SUFFIX):
            manifest_keys.append(obj.key)
        elif parsed := parse_record_key(obj.key):
            records[parsed[0]].append(obj.key)
        elif obj.key == IDENTITY_KEY:
            identified = True
    return manifest_keys, records, identified


def catalog(storage: Storage, *, kind: str | None = None, database: str | None = None,
            every_system: bool = False) -> list[Manifest]:
    """Every readable manifest with its records applied, oldest first. Unreadable manifests are skipped.

    Only the top level of the location is listed (``recursive=False``): manifests and records live there.
    Backups of another PostgreSQL system than the catalog's (``catalog.system``: a copy prefix another
    deployment shares) are left out unless ``every_system``: no reader lists, judges, verifies or
    restores from them. A catalog that records no system costs no extra request.
    """
    manifest_keys, records, identified = _top_level(storage)
    system = catalog_system(storage) if identified and not every_system else None
    found = []
    for key in manifest_keys:
        try:
            manifest = _parse(storage, key)
        except StorageError:
            continue
        if (kind is None or manifest.kind == kind) and (database is None or manifest.database == database) \
                and not is_foreign(manifest.system_identifier, system):
            found.append(_with_records(storage, manifest, records.get(manifest.id, [])))
    return sorted(found, key=lambda m: (m.started_at, m.id))


def record_system(storage: Storage, key: str) -> str | None:
    """The system identifier the record ``key`` names (records of earlier versions, and unreadable ones: None)."""
    try:
        system = json.loads(storage.read_bytes(key)).get("system_identifier")
    except (ValueError, TypeError, AttributeError, StorageError):
        return None
    return system if isinstance(system, str) else None


def orphan_records(storage: Storage) -> list[str]:
    """Records whose backup has no manifest any more (a verdict or drill recorded while prune deleted it)."""
    manifest_keys, records, _identified = _top_level(storage)
    backups = {key[: -len(MANIFEST_SUFFIX)] for key in manifest_keys}
    return [key for backup_id, keys in records.items() if backup_id not in backups for key in keys]


def newest(storage: Storage, *, kind: str = "dump", database: str | None = None) -> Manifest:
    manifests = catalog(storage, kind=kind, database=database)
    if not manifests:
        raise BackupNotFound(f"no {kind} backup in {storage.location} yet (run `backup-tasks {kind}`)")
    return manifests[-1]


def record_verification(storage: Storage, backup_id: str, verification: Verification) -> Manifest:
    """Record a verification verdict beside the manifest; the manifest as readers now see it."""
    seen = load(storage, backup_id)  # the backup must exist: a verdict about nothing is not recorded
    add_record(storage, backup_id, "verification", asdict(verification), seen=seen)
    return load(storage, backup_id)


def existing_for_day(storage: Storage, database: str, trading_day: str) -> Manifest | None:
    """The complete dump of ``database`` recorded for ``trading_day`` (post-close idempotency), if any."""
    for found in reversed(catalog(storage, kind="dump", database=database)):
        if found.trading_day == trading_day and found.state == "complete":
            return found
    return None
