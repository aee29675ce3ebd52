"""The weekly physical snapshot: ``pg_basebackup`` (tar, server-side zstd), proven by ``pg_verifybackup``.

One pass, overlapped: pg_basebackup writes ``base.tar.zst`` into a private staging directory while
we follow the growing file, streaming it into storage (hashed) and, decompressed, into ``tar -x``
for an unpacked copy. Where neither the server nor pg_basebackup can compress with zstd (or
``BACKUP_SNAPSHOT_COMPRESS=local-zstd``), pg_basebackup writes ``base.tar`` and we compress what we
follow on its way to storage, storing the very same ``base.tar.zst`` (``physical.compression``).
When pg_basebackup is done, its WAL (``pg_wal.tar``) is compressed into storage and unpacked too,
and ``pg_verifybackup`` checks the unpacked copy against PostgreSQL's own backup manifest (every
file's size and CRC32C, and that the WAL from start to stop parses). Only then is the catalog
manifest written: until that moment the snapshot does not exist for list, restore or prune. The
WAL needed to make the snapshot consistent is inside it (``-X stream``), so it is complete as soon
as it is verified; later WAL comes from the archive.

A killed run cleans up nothing; the next one, under the same lock, removes its partial objects and
those stored without a manifest (``catalog.leftovers``) and its staging tree (``postgres.leftovers.sweep``,
stopping a ``pg_basebackup`` still writing there). Another cluster's snapshot is refused up front
(``catalog.system``). Incrementals (17+) and their chains: ``physical.chain``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import zstandard

from backup_tasks.catalog import manifest as catalog
from backup_tasks.catalog.ids import backup_id_for, snapshot_keys
from backup_tasks.catalog.leftovers import clear_interrupted
from backup_tasks.catalog.manifest import Manifest
from backup_tasks.catalog.system import claim_catalog
from backup_tasks.clock import isoformat, utcnow
from backup_tasks.conninfo import ConnInfo
from backup_tasks.errors import BackupError, SnapshotFailed
from backup_tasks.locks import Lease, hold
from backup_tasks.physical.chain import (
    Ancestors,
    ChainCache,
    ChainUnusable,
    IncrementalBase,
    chain_key,
    check_incremental,
    not_possible,
    prepare_base,
    refused_incremental,
    remove_later,
)
from backup_tasks.physical.combine import sparse_skeleton
from backup_tasks.physical.compression import (
    HolePuncher,
    SnapshotCompression,
    local_spec,
    refused_zstd,
    server_has_zstd,
    snapshot_compression,
)
from backup_tasks.postgres.archiver import archiver_stats
from backup_tasks.postgres.connect import connect, server_major, server_version
from backup_tasks.postgres.failures import classify
from backup_tasks.postgres.leftovers import owned_tempdir, sweep
from backup_tasks.postgres.queries import database_names, system_identifier, unlogged_tables
from backup_tasks.postgres.tools import StderrTail, find_tool, tool_env
from backup_tasks.progress import Progress, no_progress
from backup_tasks.settings import Settings
from backup_tasks.storage.base import ObjectWriter, Storage
from backup_tasks.storage.integrity import HashingWriter
from backup_tasks.streams.codec import CHUNK, Compressor
from backup_tasks.streams.crypto import EncryptingWriter, encryption_info
from backup_tasks.streams.tar import Unpacker
from backup_tasks.wal.names import parse_lsn, segment_of_lsn

log = logging.getLogger(__name__)


STAGING_PREFIX = "backup-tasks-snapshot-"


WAL_LEVEL = 1  # pg_wal.tar is mostly WAL and zero padding: level 1 compresses it as well as higher levels


POLL = 0.02


SHM = "/dev/shm"


@dataclass
class SourceFacts:
    """What we learn about the source cluster before the backup (all of it lands in the manifest)."""

    version: str
    major: int
    system_identifier: str
    segment_size: int
    superuser: str
    wal_level: str
    archive_mode: str
    archive_command: str
    data_directory: str | None
    tablespaces: list[str]
    estimated_bytes: int = 0  # size of all databases: what the unpacked copy will take
    config_files: dict[str, str] = field(default_factory=dict)  # name -> content, only those outside PGDATA
    warnings: list[str] = field(default_factory=list)
    #: The connected database's unlogged tables as the backup starts: this snapshot restores them empty.
    unlogged_tables: list[str] = field(default_factory=list)
    #: The server was built with zstd, so it can compress the backup itself (``server-zstd``).
    server_zstd: bool = False
    #: ``summarize_wal`` (17+; None before): on, the server can take incremental backups (``physical.chain``).
    summarize_wal: str | None = None
    #: The server's current timeline: an incremental builds only on a snapshot of the same one.
    timeline: int = 0
    #: Every database of the server (templates aside): a new system holding all the catalog's is a pg_upgrade'd one.
    databases: list[str] = field(default_factory=list)


def snapshot_lock_name(conninfo: ConnInfo) -> str:
    return f"snapshot:{conninfo.server_label}"


def _setting(conn: psycopg.Connection, name: str) -> str | None:
    row = conn.execute("SELECT current_setting(%s, true)", (name,)).fetchone()
    return None if row is None or row[0] is None else str(row[0])


def inspect_source(conn: psycopg.Connection) -> SourceFacts:
    warnings: list[str] = []
    sysid = system_identifier(conn)
    segment_size = int(conn.execute("SELECT bytes_per_wal_segment FROM pg_control_init()").fetchone()[0])
    superuser = conn.execute("SELECT rolname FROM pg_roles WHERE oid = 10").fetchone()[0]
    wal_level = _setting(conn, "wal_level") or "unknown"
    archive_mode = _setting(conn, "archive_mode") or "off"
    archive_command = _setting(conn, "archive_command") or ""
    data_directory = _setting(conn, "data_directory")  # superusers and pg_read_all_settings only
    tablespaces = [r[0] for r in conn.execute(
        "SELECT spcname FROM pg_tablespace WHERE spcname NOT IN ('pg_default', 'pg_global') ORDER BY 1")]
    if wal_level == "minimal":
        raise SnapshotFailed("the server runs with wal_level = minimal: a physical snapshot needs "
                             "wal_level = replica (see `backup-tasks check` for the postgresql.conf lines)")
    if archive_mode == "off":
        warnings.append("WAL archiving is off on the server: this snapshot restores only to its own end point "
                        "(no point-in-time recovery); see `backup-tasks check`")
    else:
        stats = archiver_stats(conn)
        if stats.get("failing"):
            warnings.append(f"the server's archive_command is failing (last failure for {stats['last_failed_wal']} "
                            f"at {stats['last_failed_time']}); run `backup-tasks check`")
    config_files: dict[str, str] = {}
    if data_directory:
        for name in ("hba_file", "ident_file"):
            path = _setting(conn, name)
            if path and not path.startswith(data_directory.rstrip("/") + "/"):
                try:
                    text = conn.execute("SELECT pg_read_file(%s)", (path,)).fetchone()[0]
                    config_files[Path(path).name] = str(text)
                except psycopg.Error:
                    warnings.append(f"could not copy {path} (needs superuser or pg_read_server_files)")
    try:
        estimated = int(conn.execute("SELECT sum(pg_database_size(oid)) FROM pg_database "
                                     "WHERE datallowconn").fetchone()[0] or 0)
    except psycopg.Error:
        estimated = 0
    return SourceFacts(version=server_version(conn), major=server_major(conn), system_identifier=str(sysid),
                       estimated_bytes=estimated, databases=database_names(conn),
                       segment_size=segment_size, superuser=str(superuser), wal_level=wal_level,
                       archive_mode=archive_mode, archive_command=archive_command, data_directory=data_directory,
                       tablespaces=tablespaces, config_files=config_files, warnings=warnings,
                       unlogged_tables=unlogged_tables(conn), server_zstd=server_has_zstd(conn),
                       summarize_wal=_setting(conn, "summarize_wal"),
                       timeline=int(conn.execute("SELECT timeline_id FROM pg_control_checkpoint()").fetchone()[0]))


def take_snapshot(settings: Settings, *, backup_id: str | None = None, progress: Progress = no_progress,
                  incremental: bool = False) -> Manifest:
    """Take, verify and catalog one snapshot of the cluster behind ``DATABASE_URL`` (under the snapshot lock).

    ``incremental``: on the newest usable snapshot (``physical.chain``) when the server can; else full, and
    the manifest says why (``snapshot["incremental_reason"]``).
    """
    conninfo = settings.source()
    with hold(settings, snapshot_lock_name(conninfo), what=f"a snapshot of {conninfo.server_label}") as lease:
        return _snapshot_locked(settings, conninfo, lease, backup_id=backup_id, progress=progress,
                                incremental=incremental)


def _snapshot_locked(settings: Settings, conninfo: ConnInfo, lease: Lease, *, backup_id: str | None,
                     progress: Progress, incremental: bool) -> Manifest:
    # Every commit confirms the lock first: a run that lost it (stalled past the expiry) publishes nothing.
    storage = lease.fence(settings.locations())
    with connect(conninfo) as conn:
        facts = inspect_source(conn)
    started = utcnow()
    if backup_id is None and storage.exists(catalog.manifest_key(
            backup_id_for(conninfo.dbname, "snapshot", isoformat(started)))):
        time.sleep(1.05 - started.microsecond / 1e6)  # ids have second resolution: one snapshot per second
        started = utcnow()
    backup_id = backup_id or backup_id_for(conninfo.dbname, "snapshot", isoformat(started))
    if storage.exists(catalog.manifest_key(backup_id)):
        raise SnapshotFailed(f"a backup named {backup_id} already exists; not overwriting it")
    # Exactly the server's major: the base backup and its manifest are checked by that release's own tools.
    why = f"to take a snapshot of {conninfo.server_label} (PostgreSQL {facts.major})"
    pg_basebackup = find_tool("pg_basebackup", exact_major=facts.major, bin_dir=settings.pg_bin_dir, why=why)
    pg_verifybackup = find_tool("pg_verifybackup", exact_major=facts.major, bin_dir=settings.pg_bin_dir, why=why)
    compression = snapshot_compression(settings.snapshot_compress, server_zstd=facts.server_zstd,
                                       pg_basebackup=pg_basebackup.path)
    if compression.reason:
        log.info("%s", compression.describe())
    keys = snapshot_keys(backup_id, encrypted=bool(settings.encrypt_recipients))
    # With the major and every database: a pg_upgrade'd server's first snapshot opens its generation.
    claim_catalog(storage, facts.system_identifier, backup=f"a snapshot of {conninfo.server_label}", record=False,
                  major=facts.major, databases=facts.databases)
    clear_interrupted(storage, conninfo.dbname, "snapshot")
    clear_stale_staging()
    staging = owned_tempdir(STAGING_PREFIX, verify_area(facts.estimated_bytes))
    cache = chain_cache(settings, staging, facts, conninfo.dbname)
    published: list[str] = []
    base: IncrementalBase | None = None
    ancestors: Ancestors | None = None
    combined: Path | None = None
    full_because = ""
    cached_key: str | None = None
    try:
        if incremental:
            base, full_because = prepare_base(
                settings, storage, system_identifier=facts.system_identifier, timeline=facts.timeline,
                major=facts.major, summarize_wal=facts.summarize_wal, database=conninfo.dbname, staging=staging)
        while True:
            if full_because:
                log.warning("snapshot %s is taken full, not incremental: %s", backup_id, full_because)
            if base is not None:  # the parent's chain is made ready while pg_basebackup runs
                ancestors = Ancestors(storage, base, backup_id, staging / "chain", cache).start()
            progress("basebackup", backup_id=backup_id, bytes_written=0)
            try:
                files, compression = _take(settings, conninfo, compression, pg_basebackup.path, staging, storage,
                                           keys, backup_id, published, progress, base)
                progress("pg_verifybackup", backup_id=backup_id, bytes_written=sum(f["size"] for f in files.values()))
                # An incremental alone too: its own files against its own manifest (the chain check reads only headers).
                _run_verifybackup(pg_verifybackup.path, staging)
                if base is not None and ancestors is not None:
                    progress("pg_combinebackup", backup_id=backup_id)
                    combined = check_incremental(settings, base, backup_id, facts.major, ancestors,
                                                 staging / "unpacked", staging / "chain")
                break
            except ChainUnusable as exc:  # refused by pg_basebackup, or an ancestor is broken: a full instead
                if base is None or ancestors is None:
                    raise
                ancestors.close()
                base, ancestors, full_because = None, None, f"the chain of {base.parent.id} cannot be used: {exc}"
                _forget_attempt(storage, published, staging)
        backup_manifest = json.loads((staging / "backup" / "backup_manifest").read_text())
        if facts.config_files:
            data = json.dumps(facts.config_files, indent=2).encode()
            files[keys["config"]] = _put(storage, keys["config"], data, "config", settings.encrypt_recipients)
            published.append(keys["config"])
        finished = utcnow()
        wal_range = backup_manifest["WAL-Ranges"][0]
        timeline = int(wal_range["Timeline"])
        start_lsn, stop_lsn = parse_lsn(wal_range["Start-LSN"]), parse_lsn(wal_range["End-LSN"])
        chain = base.chain_of(backup_id) if base is not None else None
        result = Manifest(
            id=backup_id, kind="snapshot", database=conninfo.dbname, server=conninfo.server_label,
            server_version=facts.version, started_at=isoformat(started), finished_at=isoformat(finished),
            path=keys["base"], size_bytes=sum(f["size"] for f in files.values()), sha256=files[keys["base"]]["sha256"],
            compression="zstd", format="pg_basebackup-tar", tables={},
            files=files, start_lsn=wal_range["Start-LSN"], stop_lsn=wal_range["End-LSN"], timeline=timeline,
            system_identifier=facts.system_identifier, wal_segment_size=facts.segment_size,
            encryption=encryption_info(settings.encrypt_recipients), unlogged_tables=facts.unlogged_tables,
            start_segment=segment_of_lsn(timeline, start_lsn, facts.segment_size),
            stop_segment=segment_of_lsn(timeline, max(stop_lsn - 1, start_lsn), facts.segment_size),
            restorable_from=finished.isoformat(timespec="microseconds"), restorable_until=None,
            parent=chain.parent if chain else None, chain=list(chain.chain) if chain else None,
            snapshot={"superuser": facts.superuser, "wal_level": facts.wal_level, "archive_mode": facts.archive_mode,
                      "archive_command": facts.archive_command, "tablespaces": facts.tablespaces,
                      "pg_basebackup_version": pg_basebackup.major,
                      "compress": compression.spec, "compressed_by": compression.by,
                      **({"compress_reason": compression.reason} if compression.reason else {}),
                      "pg_verifybackup": "ok", "manifest_files": len(backup_manifest.get("Files", [])),
                      "summarize_wal": facts.summarize_wal,
                      **({"pg_combinebackup": "ok", "chain_checked_from": "cache" if ancestors and
                          ancestors.from_cache else "storage"} if base is not None else {}),
                      **({"incremental_reason": full_because} if incremental and base is None else {}),
                      "warnings": facts.warnings},
        )
        if cache is not None:  # the chain as checked, kept for the next incremental's check (out of staging first)
            cached_key = _keep_for_next(cache, staging, base, combined, result)
    except BaseException:
        # Nothing was recorded: the objects already stored must not survive alone.
        for key in published:
            try:
                storage.delete(key)
            except BackupError:
                log.warning("could not remove %s after a failed snapshot", key)
        raise
    finally:
        if ancestors is not None:
            ancestors.close()
        remove_later(staging)  # in the background: a gigabyte of unlinks need not delay the result
    catalog.publish(storage, result, data_keys=published)
    if cache is not None and cached_key is not None:
        cache.keep_only(cached_key)  # published: the chain it extends is needed no more
    log.info("%s snapshot %s complete: %d bytes, WAL %s..%s", "incremental" if base else "full", backup_id,
             result.size_bytes, result.start_lsn, result.stop_lsn)
    progress("done", backup_id=backup_id, bytes_written=result.size_bytes)
    return result


def _take(settings: Settings, conninfo: ConnInfo, compression: SnapshotCompression, pg_basebackup: Path,
          staging: Path, storage: Storage, keys: dict[str, str], backup_id: str, published: list[str],
          progress: Progress, base: IncrementalBase | None) -> tuple[dict[str, dict[str, Any]], SnapshotCompression]:
    """One pg_basebackup into storage and the unpacked copy; again compressed here when zstd is refused."""
    incremental_from = base.manifest_path if base is not None else None
    try:
        return _backup_and_unpack(settings, conninfo, compression, pg_basebackup, staging, storage, keys,
                                  backup_id, published, progress, incremental_from), compression
    except _ZstdRefused as refused:
        # Refused before a byte of the tar was written (nothing stored yet): take it again, compressed here.
        compression = SnapshotCompression("backup-tasks", local_spec(compression.spec),
                                          f"pg_basebackup refused {compression.spec}: {refused}")
        log.warning("%s", compression.describe())
        for leftover in ("backup", "unpacked"):
            shutil.rmtree(staging / leftover, ignore_errors=True)
        return _backup_and_unpack(settings, conninfo, compression, pg_basebackup, staging, storage, keys,
                                  backup_id, published, progress, incremental_from), compression


def _forget_attempt(storage: Storage, published: list[str], staging: Path) -> None:
    """Undo an incremental attempt before the full is taken: its stored objects and its staging copies."""
    for key in published:
        try:
            storage.delete(key)
        except BackupError:
            log.warning("could not remove %s of an abandoned incremental attempt", key)
    published.clear()
    for leftover in ("backup", "unpacked", "chain"):
        shutil.rmtree(staging / leftover, ignore_errors=True)


def chain_cache(settings: Settings, staging: Path, facts: SourceFacts, database: str) -> ChainCache | None:
    """The chain cache beside ``staging`` (``physical.chain.ChainCache``), where the server can take incrementals
    and ``BACKUP_TASKS_CHAIN_CACHE`` does not turn it off.

    Its entries are skeletons (no data, no space), so it is kept in RAM or on disk alike, encrypted backups too.
    This database's entries in the other staging area (the cluster outgrew RAM, or shrank) go.
    """
    if not_possible(facts.major, facts.summarize_wal) is not None:
        return None
    here = ChainCache.beside(staging, database=database, system_identifier=facts.system_identifier)
    for area in {Path(SHM), Path(tempfile.gettempdir())} - ({staging.parent} if settings.chain_cache else set()):
        elsewhere = ChainCache.beside(area / "x", database=database, system_identifier=facts.system_identifier)
        if elsewhere.root.is_dir():
            elsewhere.keep_only(None)
    return here if settings.chain_cache else None


def _keep_for_next(cache: ChainCache, staging: Path, base: IncrementalBase | None, combined: Path | None,
                   result: Manifest) -> str | None:
    """Keep this snapshot's chain's skeleton for the next incremental's check: the one the check of an incremental
    made, or the skeleton of the unpacked copy pg_verifybackup passed of a full. Its key, or None if not kept."""
    members = [*((m.id, m.files or {}) for m in (base.chain if base else [])), (result.id, result.files or {})]
    directory = combined if base is not None else staging / "unpacked"
    if directory is None:
        return None
    try:
        if base is None:
            sparse_skeleton(directory)
    except OSError as exc:
        log.warning("the chain cache is not kept (%s): the next incremental unpacks its chain", exc)
        return None
    key = chain_key(members)
    return key if cache.put(key, directory) else None


def clear_stale_staging() -> list[Path]:
    """Remove staging trees of killed snapshot runs, in /dev/shm and TMPDIR alike (``leftovers.sweep``)."""
    return [path for parent in {Path(SHM), Path(tempfile.gettempdir())} for path in sweep(parent, STAGING_PREFIX)]


def verify_area(estimated_bytes: int) -> str | None:
    """Where to unpack the copy pg_verifybackup reads: RAM-backed /dev/shm when the cluster fits easily.

    Unpacking into tmpfs costs half the CPU of a disk filesystem (no block allocation, no journal,
    nothing to write back), and the copy is deleted minutes later anyway. Larger clusters use TMPDIR.
    """
    if estimated_bytes <= 0:
        return None
    try:
        shm = os.statvfs(SHM)
        available = _mem_available()
    except OSError:
        return None
    if estimated_bytes * 3 < shm.f_bavail * shm.f_frsize and estimated_bytes * 4 < available:
        return SHM
    return None


def _mem_available() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


class _ZstdRefused(Exception):
    """pg_basebackup or the server said it cannot compress with zstd, before anything was written."""


class _CompressingWriter:
    """``local-zstd``: what pg_basebackup sends uncompressed, compressed on its way into the stored writer."""

    def __init__(self, writer: ObjectWriter, compressor: Compressor) -> None:
        self.writer, self.compressor = writer, compressor

    def write(self, data: bytes) -> None:
        out = self.compressor.compress(data)
        if out:
            self.writer.write(out)

    def finish(self) -> None:
        self.writer.write(self.compressor.flush())


def _stored_writer(storage: Storage, key: str, recipients: Sequence[str]) -> tuple[HashingWriter, ObjectWriter]:
    """The hashing writer (size and sha256 of the object as stored) and what to write plaintext to.

    With recipients, plaintext is age-encrypted on its way into the hashing writer, so the
    manifest describes the stored ciphertext and damage is found without the key (as for dumps).
    """
    stored = HashingWriter(storage.writer(key))
    if not recipients:
        return stored, stored
    try:
        return stored, EncryptingWriter(stored, recipients)
    except BaseException:
        stored.abort()
        raise


def _entry(stored: HashingWriter, role: str) -> dict[str, Any]:
    return {"size": stored.bytes_written, "sha256": stored.hexdigest(), "role": role}


def _put(storage: Storage, key: str, data: bytes, role: str, recipients: Sequence[str] = ()) -> dict[str, Any]:
    stored, writer = _stored_writer(storage, key, recipients)
    try:
        writer.write(data)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return _entry(stored, role)


def _backup_and_unpack(settings: Settings, conninfo: ConnInfo, compression: SnapshotCompression,
                       pg_basebackup: Path, staging: Path, storage: Storage, keys: dict[str, str], backup_id: str,
                       published: list[str], progress: Progress,
                       incremental_from: Path | None = None) -> dict[str, dict[str, Any]]:
    target = staging / "backup"
    unpacked = staging / "unpacked"
    base_name = "base.tar" if compression.local else "base.tar.zst"
    argv = [str(pg_basebackup), "-D", str(target), "--format=tar", f"--compress={compression.basebackup_option()}",
            "--wal-method=stream", "--checkpoint=fast", "--no-password", "--no-sync",
            "--manifest-checksums=CRC32C", f"--label=backup-tasks {backup_id}", "--verbose"]
    if incremental_from is not None:
        argv.append(f"--incremental={incremental_from}")
    # --no-sync: the staging copy is thrown away; what we keep is fsynced by the storage writer.
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=tool_env(conninfo))
    assert proc.stderr is not None
    stderr_tail = StderrTail(proc.stderr, name="pg_basebackup")
    files: dict[str, dict[str, Any]] = {}
    unpacker = Unpacker(unpacked, compressed=not compression.local)
    try:
        stored, writer = _stored_writer(storage, keys["base"], settings.encrypt_recipients)
        try:
            sink = _CompressingWriter(writer, compression.compressor()) if compression.local else None
            read = _follow_into(target / base_name, proc, sink or writer, unpacker, backup_id, progress)
            returncode = proc.wait()
            stderr_text = stderr_tail.join()
            if returncode != 0:
                refusal = refused_zstd(stderr_text) if read == 0 and not compression.local else None
                if refusal is not None:
                    raise _ZstdRefused(refusal)
                refused = refused_incremental(stderr_text) if read == 0 and incremental_from is not None else None
                if refused is not None:
                    raise ChainUnusable(f"pg_basebackup refused the incremental: {refused}")
                raise classify(stderr_text, conninfo, tool="pg_basebackup", fallback=SnapshotFailed)
            if sink is not None:
                sink.finish()
            writer.commit()
        except BaseException:
            writer.abort()
            raise
        files[keys["base"]] = _entry(stored, "base")
        published.append(keys["base"])
        unpacker.finish(base_name)
        extra = sorted(p.name for p in target.iterdir() if p.name not in (base_name, "pg_wal.tar", "backup_manifest"))
        if extra:
            raise SnapshotFailed(f"the cluster has tablespaces outside its data directory ({', '.join(extra)}); "
                                 f"snapshots of such clusters are not supported yet")
        wal_unpacker = Unpacker(unpacked / "pg_wal", compressed=False)
        try:
            files[keys["wal"]] = _compress_file(target / "pg_wal.tar", storage, keys["wal"], wal_unpacker,
                                                settings.encrypt_recipients)
        except BaseException:
            wal_unpacker.kill()
            raise
        published.append(keys["wal"])
        wal_unpacker.finish("pg_wal.tar")
        files[keys["backup_manifest"]] = _put(storage, keys["backup_manifest"],
                                              (target / "backup_manifest").read_bytes(), "backup_manifest",
                                              settings.encrypt_recipients)
        published.append(keys["backup_manifest"])
        return files
    except BaseException:
        unpacker.kill()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise


def _follow_into(path: Path, proc: subprocess.Popen[bytes], writer: ObjectWriter | _CompressingWriter,
                 unpacker: Unpacker, backup_id: str, progress: Progress) -> int:
    """Stream a file that ``proc`` is still appending to into storage and the unpacker, until ``proc`` ends.

    pg_basebackup writes its tar files front to back and never rewrites them, so reading behind it is
    safe, and so is releasing what was read (``HolePuncher``: staging stays small even for an
    uncompressed tar); once it has exited, whatever is left is read to the end. Returns the bytes read
    (the size and sha256 of what is stored are the writer's business: with encryption they describe the
    ciphertext).
    """
    while not path.exists():
        if proc.poll() is not None:
            if path.exists():
                break
            return 0
        time.sleep(POLL)
    size = 0
    next_report = 64 << 20
    with open(path, "rb") as source, HolePuncher(path) as puncher:
        while True:
            chunk = source.read(CHUNK)
            if chunk:
                writer.write(chunk)
                unpacker.write(chunk)
                size += len(chunk)
                puncher.release_to(size)
                if size >= next_report:
                    next_report += 64 << 20
                    progress("basebackup", backup_id=backup_id, bytes_written=size)
                continue
            if proc.poll() is not None:
                # pg_basebackup has exited: everything it wrote is there; read up to the real end.
                tail = source.read()
                if not tail:
                    break
                writer.write(tail)
                unpacker.write(tail)
                size += len(tail)
                continue
            time.sleep(POLL)
    return size


def _compress_file(path: Path, storage: Storage, key: str, unpacker: Unpacker,
                   recipients: Sequence[str] = ()) -> dict[str, Any]:
    params = zstandard.ZstdCompressionParameters.from_level(WAL_LEVEL, write_checksum=True)
    compressor = zstandard.ZstdCompressor(compression_params=params).compressobj()
    stored, writer = _stored_writer(storage, key, recipients)
    try:
        with open(path, "rb") as source:
            while chunk := source.read(CHUNK):
                unpacker.write(chunk)
                out = compressor.compress(chunk)
                if out:
                    writer.write(out)
        writer.write(compressor.flush())
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return _entry(stored, "wal")


def _run_verifybackup(pg_verifybackup: Path, staging: Path) -> None:
    result = subprocess.run([str(pg_verifybackup), "--manifest-path", str(staging / "backup" / "backup_manifest"),
                             str(staging / "unpacked")], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        problems = [ln for ln in (result.stderr or result.stdout).splitlines() if ln.strip()]
        raise SnapshotFailed("pg_verifybackup rejected the snapshot: " + "; ".join(problems[:5]))
