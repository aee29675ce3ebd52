"""The daily logical backup: ``pg_dump`` in custom format, compressed and hashed as it streams.

One pass, constant memory: pg_dump writes an uncompressed custom-format archive to a pipe; we
read it in 1 MiB chunks, compress (zstd worker threads, no GIL), hash the compressed bytes and
write them to a temporary object that is fsynced and renamed only when pg_dump succeeded. The
row counts come from the very snapshot pg_dump uses (``--snapshot``), so verification can demand
exact equality. What a killed run left (its partial object, or its dump stored without a manifest) is
removed by the next one, under the same lock (``catalog.leftovers.clear_interrupted``). A catalog holds
one cluster's backups: the server's system identifier is checked against the catalog's before anything
is written (``catalog.system``) and recorded in the manifest. What the database needs from its cluster (the
roles owning, granted on or named in it, their memberships and settings, the database's own properties) is
read in the same snapshot and stored beside the dump (``logical.globals``), before the manifest: a dump
whose roles could not be stored is not published.
"""

from __future__ import annotations

import logging
import subprocess
import threading
from dataclasses import dataclass
from typing import Any

import psycopg

from backup_tasks.catalog import manifest as catalog
from backup_tasks.catalog.ids import backup_id_for, dump_key
from backup_tasks.catalog.leftovers import clear_interrupted
from backup_tasks.catalog.manifest import Manifest, existing_for_day
from backup_tasks.catalog.system import claim_catalog
from backup_tasks.clock import isoformat, utcnow
from backup_tasks.conninfo import ConnInfo
from backup_tasks.errors import BackupError, DumpFailed
from backup_tasks.locks import Lease, hold
from backup_tasks.logical.globals import files_entries, store_cluster_objects
from backup_tasks.postgres.connect import server_major, server_version
from backup_tasks.postgres.failures import classify, first_line
from backup_tasks.postgres.globals import ClusterObjects, read_cluster_objects
from backup_tasks.postgres.queries import (
    count_rows,
    database_names,
    exported_snapshot,
    system_identifier,
    unlogged_tables,
)
from backup_tasks.postgres.tools import StderrTail, find_tool, tool_env
from backup_tasks.progress import PROGRESS_EVERY, Progress, no_progress
from backup_tasks.settings import Settings
from backup_tasks.storage.base import ObjectWriter, Storage
from backup_tasks.storage.integrity import HashingWriter
from backup_tasks.streams.codec import CHUNK, compressor
from backup_tasks.streams.crypto import EncryptingWriter, encryption_info

log = logging.getLogger(__name__)


def dump_lock_name(conninfo: ConnInfo) -> str:
    return f"dump:{conninfo.server_label}/{conninfo.dbname}"


@dataclass
class _Counter:
    """Runs the exact row counts in the snapshot's own transaction while pg_dump streams."""

    conn: psycopg.Connection
    result: dict[str, int] | None = None
    error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = count_rows(self.conn)
        except BaseException as exc:
            self.error = exc


class _Children:
    """pg_dump and the row-count thread of one dump: ``stop()`` ends whichever still runs.

    A pg_dump left running would block on its pipe forever, holding a connection and the imported
    snapshot (which stops VACUUM); a count left running would keep the exported snapshot's
    transaction busy. So every way out of a dump goes through ``stop()``.
    """

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr_tail: StderrTail | None = None
        self.counting: threading.Thread | None = None
        self.tables_done = 0

    def start_counting(self) -> _Counter:
        counter = _Counter(self.conn)
        self.counting = threading.Thread(target=counter.run, name="row-counts", daemon=True)
        self.counting.start()
        return counter

    def wait_counting(self) -> None:
        if self.counting is not None:
            self.counting.join()

    def start_pg_dump(self, argv: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[bytes], StderrTail]:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        assert self.proc.stderr is not None
        self.stderr_tail = StderrTail(self.proc.stderr, name="pg_dump", keep=200, consume=self._count_table)
        return self.proc, self.stderr_tail

    def _count_table(self, line: str) -> bool:
        if "dumping contents of table" in line:
            self.tables_done += 1
            return True
        return False

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            if self.stderr_tail is not None:
                self.stderr_tail.join()  # the pipe's end: the killed child closed it
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    stream.close()
        if self.counting is not None and self.counting.is_alive():
            try:
                self.conn.cancel_safe()  # the count query stops at once rather than at its own pace
            except Exception as exc:
                log.warning("could not cancel the row counts: %s", exc)
            self.counting.join()


def _cluster_objects(conn: psycopg.Connection, dbname: str) -> ClusterObjects:
    """The roles and database properties ``dbname`` needs, read in the dump's own snapshot (milliseconds)."""
    try:
        return read_cluster_objects(conn, dbname)
    except psycopg.Error as exc:
        raise DumpFailed(f"reading the roles and database properties of {dbname} failed: "
                         f"{first_line(str(exc))}; nothing was kept") from None


def _store_beside(storage: Storage, backup_id: str, objects: ClusterObjects, settings: Settings,
                  dump: str) -> dict[str, Any]:
    """Store the cluster objects beside the committed dump; on failure the dump goes too (no manifest names it)."""
    try:
        return store_cluster_objects(storage, backup_id, objects, settings)
    except BaseException:
        try:
            storage.delete(dump)
        except BackupError as exc:
            log.warning("could not remove %s after failing to store its roles: %s", dump, exc)
        raise


def run_dump(settings: Settings, *, trading_day: str | None = None, backup_id: str | None = None,
             progress: Progress = no_progress) -> tuple[Manifest, bool]:
    """Take one dump of ``DATABASE_URL`` under the per-database lock.

    Returns (manifest, skipped): with a ``trading_day`` that the catalog already holds a complete
    dump for, nothing is dumped and that dump's manifest comes back with ``skipped`` true. The
    check runs under the lock, so two runs for the same day never both dump.
    """
    conninfo = settings.source()
    with hold(settings, dump_lock_name(conninfo), what=f"a dump of {conninfo.dbname}") as lease:
        if trading_day is not None:
            existing = existing_for_day(settings.locations(), conninfo.dbname,
                                        trading_day)
            if existing is not None:
                return existing, True
        return _dump_locked(settings, conninfo, lease, trading_day=trading_day, backup_id=backup_id,
                            progress=progress), False


def _dump_locked(settings: Settings, conninfo: ConnInfo, lease: Lease, *, trading_day: str | None,
                 backup_id: str | None, progress: Progress) -> Manifest:
    # Every commit confirms the lock first: a run that lost it (stalled past the expiry) publishes nothing.
    storage = lease.fence(settings.locations())
    with exported_snapshot(conninfo) as (conn, snapshot):
        started = utcnow()
        version = server_version(conn)
        system = system_identifier(conn)
        unlogged = unlogged_tables(conn)  # before the row-count thread takes this connection
        pg_dump = find_tool("pg_dump", min_major=server_major(conn), bin_dir=settings.pg_bin_dir)
        # Under the dump lock: no other dump of this database picks an id meanwhile.
        wanted = backup_id or backup_id_for(conninfo.dbname, "dump", isoformat(started))
        # With the major and every database of the server: a pg_upgrade'd server (a new system of a higher major
        # holding every database the catalog backs up) opens its generation here (``catalog.system``).
        claim_catalog(storage, system, backup=f"a dump of {conninfo.dbname} on {conninfo.server_label}", record=False,
                      major=server_major(conn), databases=database_names(conn))
        backup_id = catalog.free_backup_id(storage, wanted)
        key = dump_key(backup_id, settings.compression, encrypted=bool(settings.encrypt_recipients))
        clear_interrupted(storage, conninfo.dbname, "dump")  # a killed run's partial, or its dump without a manifest
        objects = _cluster_objects(conn, conninfo.dbname)
        progress("dumping", backup_id=backup_id, bytes_written=0, tables_done=0)
        # The writer before any child process: a location that cannot take the dump (permission, full
        # disk, bucket gone) fails here, with no pg_dump to leave behind. The manifest's size and
        # sha256 describe the object as stored (ciphertext when encrypted), so damage is found without the key.
        stored = HashingWriter(storage.writer(key))
        writer: ObjectWriter = stored
        children = _Children(conn)
        try:
            if settings.encrypt_recipients:
                writer = EncryptingWriter(stored, settings.encrypt_recipients)
            # threads=0: compress inline. A zstd worker thread saves no wall time here (the server
            # backend and pg_dump already keep the other core busy; bench/ measured it) and its job
            # buffers cost 10-50 MiB of memory depending on the level.
            comp = compressor(settings.compression, settings.compression_level, threads=0)
            counter = children.start_counting()
            argv = [str(pg_dump.path), "--format=custom", "--compress=0", f"--snapshot={snapshot}",
                    "--no-password", "--verbose"]
            proc, stderr_tail = children.start_pg_dump(argv, tool_env(conninfo))
            raw_bytes = 0
            head = b""
            next_report = PROGRESS_EVERY
            assert proc.stdout is not None
            while chunk := proc.stdout.read(CHUNK):
                if raw_bytes < 5:
                    head += chunk[:5]
                raw_bytes += len(chunk)
                out = comp.compress(chunk)
                if out:
                    writer.write(out)
                if raw_bytes >= next_report:
                    next_report += PROGRESS_EVERY
                    progress("dumping", backup_id=backup_id, bytes_read=raw_bytes,
                             bytes_written=stored.bytes_written, tables_done=children.tables_done)
            returncode = proc.wait()
            stderr_text = stderr_tail.join()
            if returncode != 0:
                raise classify(stderr_text, conninfo, tool="pg_dump", fallback=DumpFailed)
            if not head.startswith(b"PGDMP"):
                raise DumpFailed(f"pg_dump produced no archive ({raw_bytes} bytes); nothing was kept")
            tail = comp.flush()
            writer.write(tail)
            progress("counting rows", backup_id=backup_id, bytes_written=stored.bytes_written,
                     tables_done=children.tables_done)
            children.wait_counting()
            if counter.error is not None:
                raise DumpFailed(f"counting rows in the dump's snapshot failed: {first_line(str(counter.error))}")
            writer.commit()
        except BaseException:
            writer.abort()
            raise
        finally:
            children.stop()  # before the snapshot's transaction ends: nothing outlives this block
    globals_entry = _store_beside(storage, backup_id, objects, settings, key)
    finished = utcnow()
    result = Manifest(
        id=backup_id, kind="dump", database=conninfo.dbname, server=conninfo.server_label,
        server_version=version, started_at=isoformat(started), finished_at=isoformat(finished),
        path=key, size_bytes=stored.bytes_written, sha256=stored.hexdigest(),
        compression=settings.compression, tables=counter.result or {}, trading_day=trading_day,
        pg_dump_version=str(pg_dump.major), encryption=encryption_info(settings.encrypt_recipients),
        system_identifier=system, cluster_objects=globals_entry, unlogged_tables=unlogged,
        files=files_entries(key, stored.bytes_written, stored.hexdigest(), globals_entry),
    )
    catalog.publish(storage, result, data_keys=[key, globals_entry["key"]])
    log.info("dump %s complete: %d bytes, %d tables", backup_id, result.size_bytes, len(result.tables))
    progress("done", backup_id=backup_id, bytes_written=result.size_bytes, tables_done=children.tables_done)
    return result
