"""Restoring a dump: stream it decompressed into ``pg_restore``; the user-facing ``restore`` command.

The archive is checked against its manifest's checksum before a single row is written; the restored
copy is compared with the manifest's row counts before it takes the target's name (``logical.swap``).
"""

from __future__ import annotations

import signal
import subprocess
from dataclasses import dataclass, field

from backup_tasks.catalog import manifest as catalog
from backup_tasks.catalog.compare import compare_counts
from backup_tasks.catalog.keys import identities_for
from backup_tasks.catalog.manifest import Manifest
from backup_tasks.conninfo import ConnInfo
from backup_tasks.errors import BackupCorrupt, ConfigError, RestoreFailed, RestoreRefused
from backup_tasks.logical.swap import Interrupted, SignalGuard, StagingDatabase, refuse_if_in_use
from backup_tasks.postgres.connect import connect
from backup_tasks.postgres.failures import classify
from backup_tasks.postgres.queries import count_rows, database_is_empty
from backup_tasks.postgres.tools import StderrTail, find_tool, tool_env
from backup_tasks.settings import Settings
from backup_tasks.storage.base import Storage
from backup_tasks.storage.integrity import first_good
from backup_tasks.streams.codec import decompressed_chunks
from backup_tasks.streams.crypto import Identities, check_identity, manifest_recipients, open_decrypted


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
    """Restore dump ``backup_id`` into the database named by ``target_url`` (created when missing).

    The dump goes into a staging database that takes the target's name only once ``pg_restore``
    succeeded and its row counts match the manifest (``logical.swap``). Whatever stops it (an error,
    SIGINT, SIGTERM), the target holds its old or the new data, or the message names the database
    holding the old data; the staging copy never outlives the run.
    """
    url = target_url or settings.restore_database_url
    if not url:
        raise ConfigError("no restore target: pass --target-database-url or set RESTORE_DATABASE_URL")
    target = ConnInfo.from_url(url, setting="the restore target URL")
    guard = SignalGuard()
    staging: StagingDatabase | None = None
    with guard.installed():  # from here SIGTERM, like SIGINT, raises Interrupted (or waits for a safe moment)
        try:
            manifest, storage, identities = _checked_backup(settings, backup_id, target, replace=replace)
            staging = StagingDatabase(target.with_dbname("postgres"), target.dbname, guard, backup_id=backup_id)
            with staging.session():
                try:
                    return _restore_staged(staging, settings, manifest, storage, identities, target,
                                           replace=replace, no_owner=no_owner)
                except BaseException as exc:
                    raise staging.failure(exc, what=f"restore of {backup_id} into {target.redacted()}") from None
        except KeyboardInterrupt as exc:
            if isinstance(exc, Interrupted) and str(exc):
                raise  # it already says what is where
            # Taken outside the session (connecting, closing): the server still says what is where.
            outcome = (staging.settle() if staging is not None
                       else f"{target.dbname!r} was left as it was; nothing was created")
            raise Interrupted(getattr(exc, "signum", signal.SIGINT), outcome) from None


def _checked_backup(settings: Settings, backup_id: str, target: ConnInfo, *,
                    replace: bool) -> tuple[Manifest, Storage, Identities | None]:
    """The manifest, a location with a good copy, and the identities: all checked before the server is touched."""
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
    return manifest, storage, identities


def _restore_staged(staging: StagingDatabase, settings: Settings, manifest: Manifest, storage: Storage,
                    identities: Identities | None, target: ConnInfo, *, replace: bool,
                    no_owner: bool) -> RestoreResult:
    """Restore into the staging database, compare its row counts, and swap it in only when they match."""
    notes = staging.clear_dead_runs()
    major = int(staging.admin.info.server_version) // 10000
    replaced = False  # whether a non-empty target is dropped for the restored copy
    if staging.find_target():
        with connect(target) as conn:
            replaced = not database_is_empty(conn)
        if replaced and not replace:
            raise RestoreRefused(f"database {target.dbname!r} on {target.server_label} is not empty; "
                                 f"restore into a new name, or pass --replace to drop and recreate it")
        refuse_if_in_use(staging.admin, target.dbname, server=target.server_label)
    staging.create()
    extra = ("--no-owner", "--no-privileges") if no_owner else ()
    pg_restore_into(storage, manifest, target.with_dbname(staging.name), min_major=major, settings=settings,
                    extra_args=extra, identities=identities)
    with connect(target.with_dbname(staging.name)) as conn:
        restored = count_rows(conn)
    problems = compare_counts(manifest.tables, restored)
    if problems:  # compared before anything is swapped: the target keeps what it held
        staging.discard()
        kept = "was left as it was" if staging.old_oid is not None else "was not created"
        notes.append(f"nothing was swapped in: {target.dbname!r} {kept}, and the restored copy was removed")
        replaced = False
    else:
        notes += staging.swap_in()
    return RestoreResult(backup_id=manifest.id, target=target.redacted(), tables=len(restored),
                         rows=sum(restored.values()), replaced=replaced, ok=not problems, problems=problems,
                         notes=notes)
