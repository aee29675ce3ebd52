"""Restoring a snapshot's files into a data directory, checking every stored byte against the catalog.

Falls back to ``BACKUP_COPY_TO`` when an object is missing or damaged in ``BACKUP_DIR``; a failed
unpack leaves nothing half-restored behind. A failure of this machine (a full disk, permission
denied) is ``StorageFull``/``StorageError``: not a damaged backup, and no reason to try the copy.
"""

from __future__ import annotations

import errno
import logging
import shutil
from pathlib import Path
from typing import Any, BinaryIO

from backup_tasks.catalog.keys import identities_for
from backup_tasks.catalog.manifest import Manifest
from backup_tasks.errors import (
    BackupCorrupt,
    IdentityUnusable,
    RestoreRefused,
    StorageError,
    StorageFull,
)
from backup_tasks.settings import Settings
from backup_tasks.storage.base import Storage, members
from backup_tasks.streams.codec import CHUNK
from backup_tasks.streams.crypto import Identities, check_identity, manifest_recipients, open_decrypted
from backup_tasks.streams.tar import HashingReader, TarExtract

log = logging.getLogger(__name__)


def snapshot_files(manifest: Manifest) -> dict[str, dict[str, Any]]:
    """Every stored object of a snapshot (older manifests without ``files``: just ``path``)."""
    if manifest.files:
        return dict(manifest.files)
    return {manifest.path: {"size": manifest.size_bytes, "sha256": manifest.sha256, "role": "base"}}


def check_empty_target(data_dir: Path) -> None:
    if data_dir.exists():
        if not data_dir.is_dir():
            raise RestoreRefused(f"{data_dir} exists and is not a directory")
        if any(data_dir.iterdir()):
            raise RestoreRefused(f"{data_dir} is not empty; restore into an empty or new directory "
                                 f"(nothing was changed)")


def snapshot_identities(settings: Settings, storage: Storage, snapshot: Manifest) -> Identities | None:
    """The identities for an encrypted snapshot, proven to open its base object (``IdentityUnusable`` if not).

    Called before anything is unpacked: a wrong or missing identity must not leave a half-restored directory.
    """
    identities = identities_for(settings, snapshot)
    if identities is None:
        return None
    locations = members(storage)
    for number, location in enumerate(locations):
        try:
            check_identity(location.open(snapshot.path), identities, what=f"snapshot {snapshot.id}",
                           recipients=manifest_recipients(snapshot.encryption))
            return identities
        except (BackupCorrupt, StorageError):  # a damaged or missing copy: the unpack falls back, so may we
            if number == len(locations) - 1:
                raise
    return identities


def plaintext(source: BinaryIO, snapshot: Manifest, key: str, identities: Identities | None) -> BinaryIO:
    if not snapshot.encryption:
        return source
    if identities is None:
        source.close()
        raise IdentityUnusable(f"snapshot {snapshot.id} is encrypted; no identity was given to decrypt {key}")
    return open_decrypted(source, identities, what=f"{key} of snapshot {snapshot.id}",
                          recipients=manifest_recipients(snapshot.encryption))


def read_snapshot_object(storage: Storage, snapshot: Manifest, key: str, identities: Identities | None) -> bytes:
    """A small stored object of a snapshot (backup_manifest, config), decrypted when the snapshot is encrypted."""
    with plaintext(storage.open(key), snapshot, key, identities) as plain:
        return plain.read()


class _LocalFailure(Exception):
    """Carries a failure of this machine (not of a backup location) out of one location's unpack.

    A full disk here says nothing about ``BACKUP_DIR`` or ``BACKUP_COPY_TO``: starting again from the
    copy would fail the same way and blame it. Never leaves this module: the public functions raise
    the ``StorageFull``/``StorageError`` it carries.
    """

    def __init__(self, error: StorageError) -> None:
        super().__init__(str(error))
        self.error = error


UNPACK_ADVICE = ("free space there (TMPDIR for verify and the PITR drill, the --data-dir of restore-pitr) "
                 "and run again")


def local_error(cause: str, *, full: bool, doing: str, intact: str) -> StorageError:
    """The one-line error for a failure of this machine while restoring: what happened, that the backup
    is not to blame (``intact`` says how we know), and what to do."""
    if full:
        return StorageFull(f"no space left on this machine's disk {doing} ({cause}); {intact}: {UNPACK_ADVICE}")
    return StorageError(f"{doing} failed on this machine ({cause}); {intact}: check that directory (permissions, "
                        f"free space, the disk) and run again")


def local_os_error(exc: OSError, *, doing: str) -> StorageError:
    """``local_error`` for an ``OSError`` of our own writing (ENOSPC/EDQUOT: ``StorageFull``)."""
    where = f": {exc.filename}" if exc.filename else ""
    return local_error(f"{exc.strerror or exc}{where}", full=exc.errno in (errno.ENOSPC, errno.EDQUOT), doing=doing,
                       intact="the backup is not at fault")


def unpack_snapshot(storage: Storage, snapshot: Manifest, data_dir: Path, identities: Identities | None = None, *,
                    wal: bool = True) -> None:
    """Unpack base and WAL tars into ``data_dir``, checking each stored object's sha256 as it streams.

    A damaged or unreadable stored object is ``BackupCorrupt``; a failure of this machine (a full
    disk, permission denied, tar killed) is ``StorageFull``/``StorageError``, never a verdict about the
    backup. tar's failure alone decides nothing: the whole object is read and hashed first.
    """
    try:
        _unpack(storage, snapshot, data_dir, identities, wal=wal)
    except _LocalFailure as failure:
        raise failure.error from failure.__cause__


def _unpack(storage: Storage, snapshot: Manifest, data_dir: Path, identities: Identities | None, *,
            wal: bool = True) -> None:
    if snapshot.encryption and identities is None:
        raise IdentityUnusable(f"snapshot {snapshot.id} is encrypted; no identity was given to decrypt it")
    files = snapshot_files(snapshot)
    order = sorted(files.items(), key=lambda kv: {"base": 0, "wal": 1}.get(kv[1].get("role", ""), 2))
    for key, info in order:
        role = info.get("role")
        if role not in ("base", "wal") or (role == "wal" and not wal):
            continue
        target = data_dir if role == "base" else data_dir / "pg_wal"
        try:
            for directory in dict.fromkeys((data_dir, target)):  # data_dir first, so it gets mode 0700 too
                directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            tar = TarExtract(target)
        except OSError as exc:
            raise _LocalFailure(local_os_error(exc, doing=f"unpacking snapshot {snapshot.id} into {target}")) \
                from exc
        _unpack_object(storage, snapshot, key, info, tar, target, identities)


def _unpack_object(storage: Storage, snapshot: Manifest, key: str, info: dict[str, Any], tar: TarExtract,
                   target: Path, identities: Identities | None) -> None:
    import zstandard

    try:
        stored = HashingReader(storage.open(key), what=f"{key} in {storage.location}")
        decompressor = zstandard.ZstdDecompressor().decompressobj()
        with plaintext(stored, snapshot, key, identities) as source:  # type: ignore[arg-type]
            while chunk := source.read(CHUNK):
                if not tar.reading:
                    continue  # tar gave up: read on anyway, so the hash judges the whole object
                try:
                    data = decompressor.decompress(chunk)
                except zstandard.ZstdError as exc:
                    raise BackupCorrupt(f"{key} cannot be decompressed: {exc}") from None
                tar.feed(data)
            stored.drain()
        outcome = tar.finish()
    except BaseException:
        tar.kill()
        raise
    # The hash first: stored bytes that differ from the catalog's are damage, whatever tar made of them.
    digest = stored.digest.hexdigest()
    if stored.size != info["size"] or digest != info["sha256"]:
        raise BackupCorrupt(f"{key} of snapshot {snapshot.id} is damaged: {stored.size} bytes with sha256 "
                            f"{digest[:16]}…, the catalog says {info['size']} bytes, {str(info['sha256'])[:16]}…")
    if outcome.ok:
        return
    local = outcome.local_failure()
    if local is not None:
        full, cause = local
        raise _LocalFailure(local_error(cause, full=full, doing=f"unpacking {key} into {target}",
                                        intact=f"snapshot {snapshot.id} is intact (its sha256 matches the catalog)"))
    raise BackupCorrupt(f"{key} of snapshot {snapshot.id} does not unpack although its sha256 matches the catalog: "
                        f"{outcome.describe()}")


def restore_config_files(storage: Storage, snapshot: Manifest, data_dir: Path,
                         identities: Identities | None = None) -> list[str]:
    """Put back pg_hba.conf / pg_ident.conf kept outside PGDATA, and a minimal postgresql.conf if there was none."""
    import json

    notes = []
    for key, info in snapshot_files(snapshot).items():
        if info.get("role") != "config":
            continue
        for name, text in json.loads(read_snapshot_object(storage, snapshot, key, identities)).items():
            path = data_dir / name
            if not path.exists() and name in ("pg_hba.conf", "pg_ident.conf"):
                _write_local(path, text, snapshot)
                notes.append(f"{name} restored from the server's copy outside its data directory")
    for name, text in (("postgresql.conf", MINIMAL_CONF), ("pg_hba.conf", MINIMAL_HBA), ("pg_ident.conf", "")):
        path = data_dir / name
        if not path.exists():
            _write_local(path, text, snapshot)
            notes.append(f"{name} was outside the source's data directory and not copied: wrote a minimal one")
    return notes


def _write_local(path: Path, text: str, snapshot: Manifest) -> None:
    try:
        path.write_text(text)
    except OSError as exc:  # this machine's disk, not the backup
        raise local_os_error(exc, doing=f"writing {path.name} of snapshot {snapshot.id}") from exc


MINIMAL_CONF = """# Written by backup-tasks restore-pitr: the source server kept its postgresql.conf outside its data
# directory, so it is not part of the snapshot. Copy your settings here before using this copy for real.
listen_addresses = 'localhost'
"""


MINIMAL_HBA = """# Written by backup-tasks restore-pitr (the source's pg_hba.conf was not available).
local   all   all                 peer
host    all   all   127.0.0.1/32  scram-sha-256
host    all   all   ::1/128       scram-sha-256
"""


def unpack_with_fallback(storage: Storage, snapshot: Manifest, data_dir: Path,
                         identities: Identities | None = None, *, wal: bool = True) -> None:
    """Unpack from BACKUP_DIR; when an object is missing or damaged there, start again from BACKUP_COPY_TO.

    ``wal=False``: not the WAL tar (an older member of a chain: a combined chain has its newest member's WAL).
    """
    locations = members(storage)
    for number, location in enumerate(locations):
        try:
            _unpack(location, snapshot, data_dir, identities, wal=wal)
            return
        except _LocalFailure as failure:
            # This machine failed, not this location: the copy would fail the same way, and is not to blame.
            raise failure.error from failure.__cause__
        except (BackupCorrupt, StorageError) as exc:
            if number == len(locations) - 1:
                raise
            log.warning("snapshot %s cannot be unpacked from %s (%s); starting again from %s", snapshot.id,
                        location.location, exc, locations[number + 1].location)
            empty_directory(data_dir, remove=False)


def empty_directory(data_dir: Path, *, remove: bool) -> None:
    """Undo a failed unpack: nothing half-restored stays behind."""
    if remove:
        shutil.rmtree(data_dir, ignore_errors=True)
        return
    for child in data_dir.iterdir() if data_dir.exists() else []:
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
