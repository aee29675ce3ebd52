"""Prove a snapshot restores: recovery to the end of the archive in a throwaway cluster.

The snapshot is unpacked (checking every byte), checked by ``pg_verifybackup``, started with
``restore_command`` pointing at the archive and left to recover. When the catalog holds a dump taken
at a restore point made after the snapshot, recovery first pauses at that point and the row counts
must equal the dump's exactly; then it continues to the end of the archive, which it must reach
(``recovery.recovery_problems``), on the newest timeline whose history holds the snapshot
(``physical.ranges``: recovery_target_timeline is that number, never 'latest').
Tables are read in full, compared for plausibility with the newest dump, and indexes checked with
amcheck. The verdict goes into the snapshot's manifest.

Unlogged tables come back empty from any physical recovery, and a server paused at a restore point
cannot even read them: they are named (``details["unlogged_tables"]``: the dump manifest's list and
the copy's own catalog's), never counted, and left out of the dump's counts (a partitioned table
without the rows of its unlogged partitions). Whatever a check of the recovered copy raises ends in a
recorded failed verdict of one line; only a failure of this machine (full disk, unreadable storage)
is raised unrecorded.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from backup_tasks.catalog import manifest as catalog
from backup_tasks.catalog.compare import compare_counts, expected_after_recovery
from backup_tasks.catalog.manifest import Manifest, Verification
from backup_tasks.clock import isoformat, utcnow
from backup_tasks.conninfo import ConnInfo
from backup_tasks.errors import (
    BackupCorrupt,
    BackupError,
    BackupNotFound,
    ClusterError,
    CryptoError,
    RestoreFailed,
    StorageError,
)
from backup_tasks.physical.chain import (
    broken,
    combine_unpacked,
    resolve_chain,
    unpack_chain,
    verifybackup_problem,
)
from backup_tasks.physical.plan import (
    RecoveryTarget,
    RestorePlan,
)
from backup_tasks.physical.ranges import SnapshotRange, snapshot_ranges
from backup_tasks.physical.recovery import (
    TOOL_DIR,
    RecoveryOutcome,
    explain_failure,
    recovery_problems,
    wait_for_recovery,
    wal_fetch_command,
    write_recovery_config,
)
from backup_tasks.physical.unpack import (
    local_error,
    local_os_error,
    read_snapshot_object,
    restore_config_files,
    snapshot_files,
    snapshot_identities,
    unpack_snapshot,
)
from backup_tasks.postgres.cluster import ThrowawayCluster
from backup_tasks.postgres.connect import connect, server_version
from backup_tasks.postgres.controldata import control_limits
from backup_tasks.postgres.failures import first_line
from backup_tasks.postgres.leftovers import owned_tempdir, sweep
from backup_tasks.postgres.queries import (
    amcheck_indexes,
    count_rows,
    list_tables,
    partition_leaves,
    qualified_name,
    unlogged_tables,
)
from backup_tasks.postgres.tools import find_tool, major_of
from backup_tasks.progress import Progress, no_progress
from backup_tasks.settings import Settings
from backup_tasks.storage.base import Storage
from backup_tasks.streams.crypto import Identities
from backup_tasks.streams.tar import DISK_FULL
from backup_tasks.wal.archive import WalArchive
from backup_tasks.wal.names import position, segment_number
from backup_tasks.wal.remote import archive_for_reading
from backup_tasks.wal.restore_points import RestorePoint, restore_points
from backup_tasks.wal.setup import prepare_archive
from backup_tasks.wal.timelines import timeline_for

log = logging.getLogger(__name__)


TRUST_HBA = "local all all trust\nhost all all 127.0.0.1/32 trust\n"

#: The scratch directory in TMPDIR where a snapshot is unpacked before its throwaway cluster starts.
SCRATCH_PREFIX = "backup-tasks-pitr-"


def _verifybackup(settings: Settings, storage: Storage, snapshot: Manifest, data_dir: Path, scratch: Path,
                  identities: Identities | None = None) -> None:
    key = next((k for k, v in snapshot_files(snapshot).items() if v.get("role") == "backup_manifest"), None)
    if key is None:
        return
    manifest_path = scratch / "backup_manifest"
    manifest_path.write_bytes(read_snapshot_object(storage, snapshot, key, identities))
    # Exactly the snapshot's major: its backup_manifest and data files are that release's.
    tool = find_tool("pg_verifybackup", exact_major=major_of(snapshot.server_version), bin_dir=settings.pg_bin_dir,
                     why=f"to check snapshot {snapshot.id} (PostgreSQL {snapshot.server_version})")
    result = subprocess.run([str(tool.path), "--manifest-path", str(manifest_path), str(data_dir)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        lines = [ln for ln in (result.stderr or result.stdout).splitlines() if ln.strip()]
        raise BackupCorrupt("pg_verifybackup rejected the unpacked snapshot: " + "; ".join(lines[:5]))


def _combine_chain(settings: Settings, storage: Storage, chain: list[Manifest], staged: Path, scratch: Path,
                   identities: dict[str, Identities | None], checked: list[str]) -> None:
    """An incremental's chain into ``staged`` as a restore combines it (``chain.unpack_chain``, ``combine_unpacked``),
    each member first checked by pg_verifybackup against its own manifest (a failure names the link)."""
    snapshot = chain[-1]
    directories = unpack_chain(storage, chain, staged, scratch / "chain", identities, fallback=False, every_wal=True)
    checked.append("sha256")
    tool = find_tool("pg_verifybackup", exact_major=major_of(snapshot.server_version), bin_dir=settings.pg_bin_dir,
                     why=f"to check snapshot {snapshot.id} (PostgreSQL {snapshot.server_version})")
    for member, directory in zip(chain, directories, strict=True):
        problem = verifybackup_problem(tool.path, directory)
        if problem is not None:
            what = "pg_verifybackup rejected the unpacked snapshot"
            raise BackupCorrupt(f"{what}: {problem}" if member is snapshot else broken(snapshot.id, member.id,
                                                                                       f"{what}: {problem}"))
    checked.append("pg_verifybackup")
    combine_unpacked(settings, chain, directories, scratch)
    checked.append("pg_combinebackup")


@dataclass
class Restored:
    cluster: ThrowawayCluster
    conninfo: ConnInfo  # the source's bootstrap superuser, on the throwaway cluster
    outcome: RecoveryOutcome
    log_file: Path


@contextmanager
def restored_cluster(settings: Settings, storage: Storage, archive: WalArchive | None, snapshot: Manifest,
                     plan: RestorePlan | None, *, action: str = "promote", checked: list[str] | None = None,
                     timeout: float = 6 * 3600) -> Iterator[Restored]:
    """The snapshot recovered (to ``plan``'s target, or the end of the archive) in a throwaway cluster.

    Without an archive the copy only replays the WAL inside the snapshot (crash recovery from its
    backup_label): that proves the snapshot, not point-in-time recovery.
    """
    checked = [] if checked is None else checked
    major = major_of(snapshot.server_version)  # a data directory runs only on its own major's binaries
    bin_dir = find_tool("pg_ctl", exact_major=major, bin_dir=settings.pg_bin_dir,
                        why=f"to recover snapshot {snapshot.id} (PostgreSQL {snapshot.server_version})").path.parent
    chain = resolve_chain(storage, snapshot)  # [snapshot] for a full; a missing ancestor is named (BackupCorrupt)
    # IdentityUnusable propagates: not the backup's fault.
    identities = {member.id: snapshot_identities(settings, storage, member) for member in chain}
    try:
        # Unpacked snapshots of killed runs go first: each may be as large as the one about to be unpacked.
        sweep(Path(tempfile.gettempdir()), SCRATCH_PREFIX)
        scratch = owned_tempdir(SCRATCH_PREFIX)
    except OSError as exc:
        raise local_os_error(exc, doing=f"making a scratch directory in TMPDIR for snapshot {snapshot.id}") from exc
    try:
        restore_cmd = None
        if archive is not None:
            # Where a portable wal-fetch goes when the server user cannot run this install and the archive
            # is a bucket alone (no archive directory to keep it in): the scratch lives as long as the cluster.
            os.chmod(scratch, 0o711)
            restore_cmd = wal_fetch_command(settings, archive, tool_dir=scratch / TOOL_DIR)
        staged = scratch / "data"
        if len(chain) == 1:
            unpack_snapshot(storage, snapshot, staged, identities[snapshot.id])  # StorageFull/StorageError: ours
            checked.append("sha256")
        else:
            _combine_chain(settings, storage, chain, staged, scratch, identities, checked)
        try:
            if len(chain) == 1:
                _verifybackup(settings, storage, snapshot, staged, scratch, identities[snapshot.id])
                checked.append("pg_verifybackup")
            restore_config_files(storage, snapshot, staged, identities[snapshot.id])
            (staged / "pg_hba.conf").write_text(TRUST_HBA)  # a private throwaway copy: we must be able to log in
            if restore_cmd is not None:
                write_recovery_config(staged, restore_cmd=restore_cmd, plan=plan, action=action)
        except OSError as exc:  # our own writes into the scratch directory: the backup is not to blame
            raise local_os_error(exc, doing=f"preparing the unpacked snapshot {snapshot.id} in {scratch}") from exc
        limits = control_limits(bin_dir, staged)
        overrides = {"wal_level": "replica", "hot_standby": "on", "lc_messages": "C", **limits}
        cluster = ThrowawayCluster(exact_major=major, bin_dir=settings.pg_bin_dir, settings=overrides,
                                   prepare=lambda data_dir: staged.rename(data_dir))
        try:
            cluster.start()
        except ClusterError as exc:
            raise RestoreFailed(f"the restored snapshot did not start: {exc}") from None
        try:
            log_file = cluster.root / "server.log" if cluster.root else Path("/nonexistent")
            outcome = wait_for_recovery(cluster.bin_dir, cluster.data_dir, log_file, action=action, timeout=timeout,
                                        archive_recovery=restore_cmd is not None)
            if not outcome.finished or outcome.errors:
                raise RestoreFailed(explain_failure(outcome))
            checked.append("recovery")
            superuser = (snapshot.snapshot or {}).get("superuser") or "postgres"
            conninfo = ConnInfo(host="127.0.0.1", port=cluster.port, dbname=snapshot.database, user=superuser)
            yield Restored(cluster, conninfo, outcome, log_file)
        finally:
            cluster.cleanup()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _restore_point_dump(storage: Storage, archive: WalArchive, snapshot: Manifest,
                        wal_range: SnapshotRange) -> tuple[RestorePoint, Manifest] | None:
    """The newest restore point after the snapshot on its path, with a dump of the same day taken right after it."""
    end_segment, size = wal_range.coverage.end_segment, int(snapshot.wal_segment_size or 0)
    if not snapshot.stop_segment or not end_segment:
        return None
    dumps = [d for d in catalog.catalog(storage, kind="dump", database=snapshot.database) if d.trading_day]
    for point in reversed(restore_points(archive)):
        if not point.trading_day or position(point.segment) < position(str(snapshot.stop_segment)) \
                or position(point.segment) > position(end_segment):
            continue
        if timeline_for(wal_range.steps, segment_number(point.segment, size)) != point.timeline:
            continue  # on another branch: recovery along this snapshot's timeline never passes it
        if point.system_identifier and snapshot.system_identifier and \
                point.system_identifier != snapshot.system_identifier:
            continue
        for dump in reversed(dumps):
            if dump.trading_day == point.trading_day and dump.started >= point.created.replace(microsecond=0):
                return point, dump
    return None


def snapshot_to_verify(storage: Storage, backup_id: str | None = None) -> Manifest:
    """The snapshot ``verify --snapshot`` means: ``backup_id``, else the newest complete one.

    Callers resolve it once, before verifying, and name that id: a snapshot finishing meanwhile must
    change neither what is verified nor what the result says was verified.
    """
    if backup_id:
        snapshot = catalog.load(storage, backup_id)
        if snapshot.kind != "snapshot":
            raise BackupNotFound(f"{backup_id} is a {snapshot.kind}, not a snapshot")
        return snapshot
    snapshots = [m for m in catalog.catalog(storage, kind="snapshot") if m.restorable]
    if not snapshots:
        raise BackupNotFound(f"no complete snapshot in {storage.location} (run `backup-tasks snapshot`)")
    return snapshots[-1]


def local_restore_failure(exc: RestoreFailed, snapshot: Manifest) -> StorageError | None:
    """``StorageFull`` when the throwaway copy failed because this machine's disk is full, else None.

    The restored server and its restore_command write only locally (its data directory, pg_wal), so a
    full disk in their failure is this machine's, not a verdict about the snapshot.
    """
    text = str(exc)
    if not any(needle in text for needle in DISK_FULL):
        return None
    return local_error(" ".join(text.split()), full=True,  # one line, whatever the server's log said
                       doing=f"recovering snapshot {snapshot.id} in a throwaway cluster",
                       intact="the backup is not at fault")


def verify_snapshot(settings: Settings, backup_id: str | None = None, *,
                    progress: Progress = no_progress) -> Verification:
    """Verify one snapshot (the newest when ``backup_id`` is None); record and return the outcome.

    The snapshot is resolved first, and the outcome (``details["backup_id"]``) names it. A failure of
    this machine (``StorageFull``/``StorageError``: a full disk, permission denied) is raised and never
    recorded: it is no verdict about the snapshot.
    """
    storage = settings.locations()
    snapshot = snapshot_to_verify(storage, backup_id)
    archive: WalArchive | None
    try:
        if settings.as_of is not None or settings.wal_archive_url:
            archive = archive_for_reading(settings)  # the bucket's wal/ (as of --as-of): read, never prepared
        else:
            archive, _notes = prepare_archive(settings)
        archive_problem = None
    except BackupError as exc:
        archive, archive_problem = None, str(exc)
    ranges = {r.snapshot.id: r for r in snapshot_ranges(storage, archive)} if archive is not None else {}
    wal_range = ranges.get(snapshot.id)
    started = time.monotonic()
    checked: list[str] = []
    problems: list[str] = []
    details: dict[str, Any] = {"backup_id": snapshot.id}
    # Recovery goes to the end of the archive on the newest timeline this snapshot restores onto.
    end_plan = None if wal_range is None else \
        RestorePlan(snapshot, RecoveryTarget("latest", timeline=wal_range.timeline), wal_range)
    if wal_range is not None:
        details["archive"] = wal_range.coverage.to_dict()
        if wal_range.coverage.gap:
            problems.append(f"WAL segment {wal_range.coverage.gap} is missing from the archive although later ones "
                            f"are there: this snapshot restores only up to {wal_range.restorable_until.isoformat()}")
    if archive_problem is not None:
        details["archive"] = f"unusable: {archive_problem}"
        if (snapshot.snapshot or {}).get("archive_mode", "off") != "off":
            problems.append(f"the WAL archive cannot be used, so only the snapshot itself was checked: "
                            f"{archive_problem}")
    pair = _restore_point_dump(storage, archive, snapshot, wal_range) \
        if archive is not None and wal_range is not None else None
    plan = end_plan
    if pair is not None and wal_range is not None:
        point, dump = pair
        plan = RestorePlan(snapshot, RecoveryTarget("name", name=point.name, timeline=wal_range.timeline), wal_range)
        details["restore_point"] = {"name": point.name, "lsn": point.lsn, "dump": dump.id}
    progress("restoring", backup_id=snapshot.id)
    found = _Found(checked, problems, details)
    try:
        with restored_cluster(settings, storage, archive, snapshot, plan, action="pause" if plan else "promote",
                              checked=checked) as restored:
            try:
                _check_copy(settings, storage, snapshot, restored, pair, end_plan, found, progress)
            except (RestoreFailed, BackupCorrupt, StorageError, CryptoError):
                raise  # judged below, as when the copy is made
            except (BackupError, psycopg.Error) as exc:  # the copy's server refused or failed a check: a verdict
                problems.append(f"checking the recovered copy failed: {first_line(str(exc))}")
            except Exception as exc:  # a bug of ours still ends in a recorded verdict of one line, not a traceback
                log.info("checking the recovered copy of snapshot %s failed", snapshot.id, exc_info=True)
                problems.append(f"checking the recovered copy failed: {type(exc).__name__}: {first_line(str(exc))}")
            finally:
                details["unlogged_tables"] = sorted(found.unlogged)
    except RestoreFailed as exc:
        local = local_restore_failure(exc, snapshot)
        if local is not None:
            raise local from exc
        problems.append(str(exc))
    except BackupCorrupt as exc:
        problems.append(str(exc))
    result = Verification(ok=not problems, verified_at=isoformat(utcnow()),
                          duration_seconds=round(time.monotonic() - started, 3), method="throwaway-cluster-pitr",
                          checked=checked, tables_compared=found.tables, indexes_checked=found.indexes,
                          problems=problems, server_version=found.version, details=details)
    if settings.as_of is None:  # as of a past time the bucket is only read: the verdict is reported, not recorded
        record_result(storage, snapshot.id, verification=result, wal_range=wal_range)
    log.info("verification of snapshot %s: %s", snapshot.id, "ok" if result.ok else "; ".join(problems))
    return result


@dataclass
class _Found:
    """What the checks of a recovered copy found so far (kept when a later check raises)."""

    checked: list[str]
    problems: list[str]
    details: dict[str, Any]
    version: str | None = None
    tables: int = 0
    indexes: int = 0
    unlogged: set[str] = field(default_factory=set)


def _check_copy(settings: Settings, storage: Storage, snapshot: Manifest, restored: Restored,
                pair: tuple[RestorePoint, Manifest] | None, end_plan: RestorePlan | None, found: _Found,
                progress: Progress) -> None:
    """At the restore point (when there is one) against its dump, then at the end of the archive."""
    if pair is not None:
        point, dump = pair
        progress("comparing at restore point", backup_id=snapshot.id, restore_point=point.name)
        # Paused at the point, the server is still in recovery: it refuses to open an unlogged table.
        with connect(restored.conninfo.with_dbname(dump.database)) as conn:
            at_point = read_recovered(conn, dump)
        found.unlogged.update(at_point.unlogged)
        found.problems += [f"at restore point {point.name!r}: {m} (dump {dump.id})" for m in at_point.against(dump)]
        found.checked.append("restore-point-row-counts")
        _continue_to_end(restored)
    found.details["recovery"] = asdict(restored.outcome) | {"log_tail": restored.outcome.log_tail[-5:]}
    progress("comparing", backup_id=snapshot.id)
    with connect(restored.conninfo) as conn:
        found.version = server_version(conn)
        reached = str(conn.execute("SELECT pg_last_wal_replay_lsn()").fetchone()[0] or "")
        found.details["reached_lsn"] = reached
        if end_plan is not None:
            found.problems += recovery_problems(end_plan, restored.outcome, reached_lsn=reached or None)
            found.checked.append("end-of-archive")
        newest = _newest_dump(storage, snapshot)
        at_end = read_recovered(conn, newest)
        found.unlogged.update(at_end.unlogged)
        found.tables = len(at_end.counts)
        found.details["rows"] = sum(at_end.counts.values())
        found.problems += _plausibility(snapshot, newest, at_end)
        found.checked.append("row-counts")
        found.indexes, index_problems = amcheck_indexes(conn, heap_check=settings.verify_heap_check)
        if found.indexes:
            found.checked.append("amcheck")
        found.problems += index_problems


def _continue_to_end(restored: Restored) -> None:
    """From the pause at a restore point, go on to the end of the archive (restart without a target)."""
    with open(restored.cluster.data_dir / "postgresql.auto.conf", "a") as conf:
        conf.write("# backup-tasks verify: paused at the restore point, now on to the end of the archive\n"
                   "recovery_target_name = ''\nrecovery_target_action = 'promote'\n")
    restored.cluster.restart()
    outcome = wait_for_recovery(restored.cluster.bin_dir, restored.cluster.data_dir, restored.log_file)
    if not outcome.finished or outcome.errors:
        raise RestoreFailed(explain_failure(outcome))
    restored.outcome = outcome


@dataclass(frozen=True)
class RecoveredCounts:
    """What a recovered copy shows of its tables, read as a server in recovery can read them."""

    counts: dict[str, int]  # every table recovery can read (``count_rows(recovered=True)``)
    unlogged: list[str]  # not read: expected empty (the dump's list, and the copy's own catalog's)
    partitions: dict[str, list[str]]  # each partitioned table's leaf partitions
    present: set[str]  # every user table of the copy's catalog, read or not

    def expected(self, dump: Manifest) -> dict[str, int]:
        """The dump's counts as this copy must show them: no unlogged table, parents without their rows."""
        return expected_after_recovery(dump.tables, unlogged=self.unlogged, partitions=self.partitions)

    def against(self, dump: Manifest) -> list[str]:
        """Every difference from a dump of the same moment (an unlogged table must exist, not match)."""
        problems = compare_counts(self.expected(dump), self.counts)
        problems += [f"table {name} (unlogged: expected empty) is missing from the restored database"
                     for name in dump.tables if name in self.unlogged and name not in self.present]
        return problems


def read_recovered(conn: psycopg.Connection, dump: Manifest | None) -> RecoveredCounts:
    """Count what a recovered copy (in recovery or promoted) can read; name the unlogged tables, not reading them.

    Unlogged are the tables the dump's manifest lists (``unlogged_tables``) and, for dumps from before
    that field or tables made unlogged since, those the copy's own catalog marks so (the catalog knows
    each table's persistence even during recovery).
    """
    from_dump = (dump.unlogged_tables or []) if dump is not None else []
    unlogged = sorted(set(from_dump) | set(unlogged_tables(conn)))
    counts = count_rows(conn, recovered=True, skip=unlogged)
    present = {qualified_name(schema, table) for schema, table, _kind in list_tables(conn)}
    return RecoveredCounts(counts, unlogged, partition_leaves(conn), present)


def _newest_dump(storage: Storage, snapshot: Manifest) -> Manifest | None:
    dumps = [d for d in catalog.catalog(storage, kind="dump", database=snapshot.database) if d.tables]
    return dumps[-1] if dumps else None


def _plausibility(snapshot: Manifest, newest: Manifest | None, restored: RecoveredCounts) -> list[str]:
    """Against the newest dump of the same database: every table there, none emptied (unlogged ones aside)."""
    if newest is None:
        return [] if restored.present else [f"database {snapshot.database} has no tables after recovery"]
    problems = [f"table {name} (in dump {newest.id}) is missing after recovery" for name in newest.tables
                if name not in restored.present]
    problems += [f"table {name} is empty after recovery, but dump {newest.id} had {count} rows"
                 for name, count in restored.expected(newest).items() if count and restored.counts.get(name) == 0]
    return problems


def record_result(storage: Storage, backup_id: str, *, verification: Verification | None = None,
                  wal_range: SnapshotRange | None = None, drill: dict[str, Any] | None = None) -> Manifest:
    """Record what was learnt about a snapshot as records beside its manifest (never rewriting it).

    Records of this snapshot that a killed verify or drill left half-written go first.
    """
    catalog.load(storage, backup_id)  # the snapshot must still exist
    catalog.clear_partial_records(storage, backup_id)
    if verification is not None:
        catalog.add_record(storage, backup_id, "verification", asdict(verification))
    if drill is not None:
        catalog.add_record(storage, backup_id, "drill", drill)
    if wal_range is not None:
        catalog.add_record(storage, backup_id, "coverage", {
            "restorable_until": wal_range.restorable_until.isoformat(timespec="microseconds")})
    return catalog.load(storage, backup_id)
