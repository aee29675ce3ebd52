"""Restoring a dump: stream it decompressed into ``pg_restore``; the user-facing ``restore`` command.

The archive is checked against its manifest's checksum before a single row is written, and the
restored database is compared with the manifest's row counts afterwards.
"""

from __future__ import annotations

import logging
import subprocess
import uuid
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from backup_tasks.catalog import manifest as catalog
from backup_tasks.catalog.compare import compare_counts
from backup_tasks.catalog.keys import identities_for
from backup_tasks.catalog.manifest import Manifest
from backup_tasks.conninfo import ConnInfo
from backup_tasks.errors import BackupCorrupt, ConfigError, RestoreFailed, RestoreRefused
from backup_tasks.postgres.connect import connect
from backup_tasks.postgres.failures import classify, first_line
from backup_tasks.postgres.queries import count_rows, create_database, database_exists, database_is_empty, drop_database
from backup_tasks.postgres.tools import StderrTail, find_tool, tool_env
from backup_tasks.settings import Settings
from backup_tasks.storage.base import Storage
from backup_tasks.storage.integrity import first_good
from backup_tasks.streams.codec import decompressed_chunks
from backup_tasks.streams.crypto import Identities, check_identity, manifest_recipients, open_decrypted

log = logging.getLogger(__name__)


def check_checksum(storage: Storage, manifest: Manifest) -> Storage:
    """Check the stored object against its manifest's size and sha256 in each location, primary first.

    Returns the first location holding a good copy (restore reads from that one only); raises
    ``BackupCorrupt`` saying what differs where, or ``ObjectMissing`` when no location has it.
    """
    good, _checks = first_good(storage, manifest.path, size=manifest.size_bytes, sha256=manifest.sha256)
    return good


def check_decryptable(storage: Storage, manifest: Manifest, identities: Identities | None) -> None:
    """Fail before the target is touched when the identity cannot open the backup (reads its first chunk)."""
    if identities is None:
        return
    check_identity(storage.open(manifest.path), identities, what=f"backup {manifest.id}",
                   recipients=manifest_recipients(manifest.encryption))


def pg_restore_into(storage: Storage, manifest: Manifest, target: ConnInfo, *, min_major: int,
                    settings: Settings, extra_args: tuple[str, ...] = (),
                    identities: Identities | None = None) -> None:
    """Feed the decompressed archive to ``pg_restore`` on stdin, in one transaction, stop on the first error.

    One transaction means a failed restore leaves the target as it was, and lets a server with
    ``wal_level=minimal`` skip WAL for the tables it creates (the throwaway cluster's speed-up).
    """
    pg_restore = find_tool("pg_restore", min_major=min_major, bin_dir=settings.pg_bin_dir)
    if manifest.encryption and identities is None:
        identities = identities_for(settings, manifest)
    argv = [str(pg_restore.path), "--exit-on-error", "--single-transaction", "--no-password",
            "-d", target.dbname, *extra_args]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=tool_env(target))
    assert proc.stderr is not None
    stderr_tail = StderrTail(proc.stderr, name="pg_restore")
    feed_error: BaseException | None = None
    try:
        assert proc.stdin is not None
        source = storage.open(manifest.path)
        if identities is not None:  # decrypt, then decompress: age authenticates every 64 KiB chunk
            source = open_decrypted(source, identities, what=f"backup {manifest.id}",
                                    recipients=manifest_recipients(manifest.encryption))
        with source:
            for chunk in decompressed_chunks(source, manifest.compression, what=manifest.path):
                proc.stdin.write(chunk)
        proc.stdin.close()
    except BrokenPipeError:
        pass  # pg_restore stopped reading: its exit status and stderr say why
    except BaseException as exc:
        feed_error = exc
        proc.kill()
    returncode = proc.wait()
    message = stderr_tail.join()
    if feed_error is not None:
        raise feed_error
    if returncode != 0:
        errors = [ln for ln in message.splitlines() if "error" in ln.lower()] or message.splitlines()
        detail = "; ".join(errors[:3]) or f"exit status {returncode}"
        if "input file does not appear to be a valid archive" in message or "unexpected end of file" in message:
            raise BackupCorrupt(f"{manifest.path} is not a readable pg_dump archive: {detail}")
        # A connection failure is classified as everywhere else (AuthenticationFailed, SourceUnavailable...).
        raise classify(message, target, tool="pg_restore",
                       fallback=lambda _message: RestoreFailed(f"pg_restore of {manifest.id} into "
                                                               f"{target.redacted()} failed: {detail}"))


@dataclass
class RestoreResult:
    backup_id: str
    target: str
    tables: int
    rows: int
    replaced: bool
    ok: bool = True
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def restore_backup(settings: Settings, backup_id: str, target_url: str | None, *, replace: bool = False,
                   no_owner: bool = False) -> RestoreResult:
    """Restore dump ``backup_id`` into the database named by ``target_url`` (created when missing)."""
    url = target_url or settings.restore_database_url
    if not url:
        raise ConfigError("no restore target: pass --target-database-url or set RESTORE_DATABASE_URL")
    target = ConnInfo.from_url(url, setting="the restore target URL")
    storage = settings.locations()
    manifest = catalog.load(storage, backup_id)
    if manifest.kind != "dump":
        raise ConfigError(f"{backup_id} is a {manifest.kind}, not a dump; use restore-pitr for snapshots")
    if settings.database_url:
        source = settings.source()
        if (source.server_label, source.dbname) == (target.server_label, target.dbname) and not replace:
            raise RestoreRefused(f"the target {target.redacted()} is the database being backed up; "
                                 f"pass --replace if you really mean to overwrite it")
    identities = identities_for(settings, manifest)
    storage = check_checksum(storage, manifest)  # the first location with a good copy
    check_decryptable(storage, manifest, identities)
    maintenance = target.with_dbname("postgres")
    # Restore into a staging database and swap it in only once pg_restore succeeded: a failed
    # restore leaves the target exactly as it was (with --replace too).
    staging = f"{target.dbname[:40]}__restoring_{uuid.uuid4().hex[:8]}"
    replaced = False  # whether a non-empty target is being dropped for the restored copy
    try:
        with connect(maintenance) as admin:
            major = int(admin.info.server_version) // 10000
            exists = database_exists(admin, target.dbname)
            if exists:
                with connect(target) as conn:
                    replaced = not database_is_empty(conn)
                if replaced and not replace:
                    raise RestoreRefused(f"database {target.dbname!r} on {target.server_label} is not empty; "
                                         f"restore into a new name, or pass --replace to drop and recreate it")
            create_database(admin, staging)
        extra = ("--no-owner", "--no-privileges") if no_owner else ()
        try:
            pg_restore_into(storage, manifest, target.with_dbname(staging), min_major=major, settings=settings,
                            extra_args=extra, identities=identities)
        except BaseException:
            with connect(maintenance) as admin:
                drop_database(admin, staging, force=True)
            raise
        notes = swap_in(maintenance, staging, target.dbname, replace_existing=exists)
    except OSError as exc:
        raise RestoreFailed(f"restore of {backup_id} failed: {first_line(str(exc))}") from None
    except psycopg.Error as exc:  # CREATE/DROP/RENAME DATABASE: privileges, or clients still connected
        raise RestoreRefused(f"restore of {backup_id} into {target.redacted()} refused by the server: "
                             f"{first_line(str(exc))} (needs CREATEDB, and no one connected to the target)") from None
    with connect(target) as conn:
        restored = count_rows(conn)
    problems = compare_counts(manifest.tables, restored)
    return RestoreResult(backup_id=backup_id, target=target.redacted(), tables=len(restored),
                         rows=sum(restored.values()), replaced=replaced, ok=not problems, problems=problems,
                         notes=notes)


def rename_database(admin: psycopg.Connection, old: str, new: str) -> None:
    admin.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(old), sql.Identifier(new)))


def swap_in(maintenance: ConnInfo, staging: str, target: str, *, replace_existing: bool) -> list[str]:
    """Give the restored ``staging`` database the name ``target``; never lose both copies.

    The old target is renamed aside first, the restored copy renamed in, and the old copy dropped last.
    Whatever stops this half-way (an error, Ctrl-C), ``target`` names the old or the new data, or the
    error names the database that holds the old data. Returns notes for the user (a kept old copy).
    """
    aside = f"{target[:40]}__replaced_{uuid.uuid4().hex[:8]}"
    with connect(maintenance) as admin:
        if not replace_existing:
            try:
                rename_database(admin, staging, target)
            except BaseException:
                drop_database(admin, staging, force=True)
                raise
            return []
        rename_database(admin, target, aside)  # fails (nothing changed) while clients are connected
        try:
            rename_database(admin, staging, target)
        except BaseException as exc:
            try:
                rename_database(admin, aside, target)  # the old data goes back under its name
            except BaseException:
                raise RestoreFailed(f"the restore was interrupted while swapping databases ({exc!r}); the previous "
                                    f"{target!r} is kept as {aside!r} and the restored copy as {staging!r}: rename "
                                    f"one of them to {target!r}") from None
            drop_database(admin, staging, force=True)
            raise
        try:
            drop_database(admin, aside)
        except BaseException as exc:
            # The restore itself is done: the new data is under the target's name.
            note = (f"the previous {target!r} is kept as {aside!r} ({type(exc).__name__}: "
                    f"{first_line(str(exc)) or 'interrupted'}); drop it when you no longer need it")
            log.warning("%s", note)
            if not isinstance(exc, Exception):
                raise RestoreFailed(f"interrupted after the restore was swapped in: {note}") from None
            return [note]
    return []
