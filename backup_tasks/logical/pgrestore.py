"""Running ``pg_restore`` on a stored dump: the archive decompressed (and decrypted) into its stdin.

``pg_restore_into`` restores into a database, in one transaction (optionally by a ``-L`` listing);
``archive_listing`` reads what pg_restore prints of the archive's table of contents without a database.
Both classify failures the same way: damage is ``BackupCorrupt``, anything else ``RestoreFailed``.
"""

from __future__ import annotations

import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from backup_tasks.catalog.keys import identities_for
from backup_tasks.catalog.manifest import Manifest
from backup_tasks.conninfo import ConnInfo
from backup_tasks.errors import (
    BackupCorrupt,
    BackupError,
    RestoreFailed,
)
from backup_tasks.postgres.failures import classify
from backup_tasks.postgres.tools import StderrTail, find_tool, tool_env
from backup_tasks.settings import Settings
from backup_tasks.storage.base import Storage
from backup_tasks.streams.codec import decompressed_chunks
from backup_tasks.streams.crypto import Identities, manifest_recipients, open_decrypted

#: ``pg_restore`` options that leave owners and privileges out (``--no-owner``, verify without saved roles).
WITHOUT_OWNERS = ("--no-owner", "--no-privileges")


def _feed(proc: subprocess.Popen[bytes], storage: Storage, manifest: Manifest,
          identities: Identities | None) -> BaseException | None:
    """Write the decompressed (and decrypted) archive to ``proc``'s stdin until the end or until it stops reading.

    Returns what went wrong on our side (the child is killed then), None otherwise: the caller
    first collects the child's exit status and stderr, then raises it.
    """
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
        pass  # pg_restore stopped reading (done with what it needed, or failed): its exit status says which
    except BaseException as exc:
        proc.kill()
        return exc
    return None


def _restore_error(message: str, returncode: int, manifest: Manifest, target: ConnInfo | None) -> BackupError:
    errors = [ln for ln in message.splitlines() if "error" in ln.lower()] or message.splitlines()
    detail = "; ".join(errors[:3]) or f"exit status {returncode}"
    if "input file does not appear to be a valid archive" in message or "unexpected end of file" in message:
        return BackupCorrupt(f"{manifest.path} is not a readable pg_dump archive: {detail}")
    if target is None:
        return RestoreFailed(f"pg_restore could not read the contents of {manifest.id}: {detail}")
    if manifest.cluster_objects is None and 'role "' in detail and "does not exist" in detail:
        detail += (" (this dump was taken before roles were saved with dumps: create the roles on the target, "
                   "or pass --no-owner)")
    # A connection failure is classified as everywhere else (AuthenticationFailed, SourceUnavailable...).
    return classify(message, target, tool="pg_restore",
                    fallback=lambda _message: RestoreFailed(f"pg_restore of {manifest.id} into "
                                                            f"{target.redacted()} failed: {detail}"))


def pg_restore_into(storage: Storage, manifest: Manifest, target: ConnInfo, *, min_major: int,
                    settings: Settings, extra_args: tuple[str, ...] = (),
                    identities: Identities | None = None, use_list: str | None = None) -> None:
    """Feed the decompressed archive to ``pg_restore`` on stdin, in one transaction, stop on the first error.

    One transaction means a failed restore leaves the target as it was, and lets a server with
    ``wal_level=minimal`` skip WAL for the tables it creates (the throwaway cluster's speed-up).
    ``use_list`` is a ``pg_restore -l`` listing to restore by (``-L``): entries commented out are
    left out; the order must stay the archive's, as the archive arrives on a pipe.
    """
    pg_restore = find_tool("pg_restore", min_major=min_major, bin_dir=settings.pg_bin_dir)
    if manifest.encryption and identities is None:
        identities = identities_for(settings, manifest)
    with list_file(use_list) as list_args:
        argv = [str(pg_restore.path), "--exit-on-error", "--single-transaction", "--no-password",
                "-d", target.dbname, *extra_args, *list_args]
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env=tool_env(target))
        assert proc.stderr is not None
        stderr_tail = StderrTail(proc.stderr, name="pg_restore")
        feed_error = _feed(proc, storage, manifest, identities)
        returncode = proc.wait()
        message = stderr_tail.join()
    if feed_error is not None:
        raise feed_error
    if returncode != 0:
        raise _restore_error(message, returncode, manifest, target)


@contextmanager
def list_file(use_list: str | None) -> Iterator[list[str]]:
    if use_list is None:
        yield []
        return
    with tempfile.NamedTemporaryFile("w", prefix="backup-tasks-list-", suffix=".txt") as handle:
        handle.write(use_list)
        handle.flush()
        yield ["-L", handle.name]


def archive_listing(storage: Storage, manifest: Manifest, args: list[str], *, min_major: int, settings: Settings,
                    identities: Identities | None = None) -> str:
    """What ``pg_restore ARGS`` (no database: ``-l``, or ``-f -`` of schema entries) prints for the archive.

    The table of contents is at the head of the archive, so only what ``pg_restore`` reads of it is
    decompressed (milliseconds: it stops reading after the TOC when no data is asked for).
    """
    pg_restore = find_tool("pg_restore", min_major=min_major, bin_dir=settings.pg_bin_dir)
    if manifest.encryption and identities is None:
        identities = identities_for(settings, manifest)
    proc = subprocess.Popen([str(pg_restore.path), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    stderr_tail = StderrTail(proc.stderr, name="pg_restore")
    output: list[bytes] = []
    reader = threading.Thread(target=lambda: output.append(proc.stdout.read()),  # type: ignore[union-attr]
                              name="pg_restore-stdout", daemon=True)
    reader.start()
    feed_error = _feed(proc, storage, manifest, identities)
    returncode = proc.wait()
    reader.join()
    message = stderr_tail.join()
    if feed_error is not None:
        raise feed_error
    if returncode != 0:
        raise _restore_error(message, returncode, manifest, None)
    return b"".join(output).decode("utf-8", errors="replace")
