"""Restoring a snapshot's files into a data directory, checking every stored byte against the catalog.

Falls back to ``BACKUP_COPY_TO`` when an object is missing or damaged in ``BACKUP_DIR``; a failed
unpack leaves nothing half-restored behind.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
from pathlib import Path
from typing import BinaryIO

from backup_tasks.catalog.keys import identities_for
from backup_tasks.catalog.manifest import Manifest
from backup_tasks.errors import (
    BackupCorrupt,
    IdentityUnusable,
    RestoreRefused,
    StorageError,
)
from backup_tasks.physical.snapshot import snapshot_files
from backup_tasks.postgres.cluster import as_server_user as as_server_user
from backup_tasks.postgres.failures import first_line
from backup_tasks.settings import Settings
from backup_tasks.storage.base import Storage, members
from backup_tasks.streams.codec import CHUNK
from backup_tasks.streams.crypto import Identities, check_identity, manifest_recipients, open_decrypted
from backup_tasks.streams.tar import HashingReader

log = logging.getLogger(__name__)


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


def unpack_snapshot(storage: Storage, snapshot: Manifest, data_dir: Path, identities: Identities | None = None) -> None:
    """Unpack base and WAL tars into ``data_dir``, checking each stored object's sha256 as it streams."""
    import zstandard

    if snapshot.encryption and identities is None:
        raise IdentityUnusable(f"snapshot {snapshot.id} is encrypted; no identity was given to decrypt it")
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    files = snapshot_files(snapshot)
    order = sorted(files.items(), key=lambda kv: {"base": 0, "wal": 1}.get(kv[1].get("role", ""), 2))
    for key, info in order:
        role = info.get("role")
        if role not in ("base", "wal"):
            continue
        target = data_dir if role == "base" else data_dir / "pg_wal"
        target.mkdir(parents=True, exist_ok=True, mode=0o700)
        proc = subprocess.Popen(["tar", "-x", "--no-same-owner", "-f", "-", "-C", str(target)],
                                stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        digest = hashlib.sha256()
        size = 0
        assert proc.stdin is not None
        try:
            decompressor = zstandard.ZstdDecompressor().decompressobj()
            stored = HashingReader(storage.open(key))
            with plaintext(stored, snapshot, key, identities) as source:  # type: ignore[arg-type]
                while chunk := source.read(CHUNK):
                    try:
                        proc.stdin.write(decompressor.decompress(chunk))
                    except zstandard.ZstdError as exc:
                        raise BackupCorrupt(f"{key} cannot be decompressed: {exc}") from None
                stored.drain()
            digest, size = stored.digest, stored.size
            proc.stdin.close()
        except BrokenPipeError:
            pass
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        returncode = proc.wait()
        stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        if size != info["size"] or digest.hexdigest() != info["sha256"]:
            raise BackupCorrupt(f"{key} of snapshot {snapshot.id} is damaged: {size} bytes with sha256 "
                                f"{digest.hexdigest()[:16]}…, the catalog says {info['size']} bytes, "
                                f"{str(info['sha256'])[:16]}…")
        if returncode != 0:
            raise BackupCorrupt(f"{key} of snapshot {snapshot.id} does not unpack: {first_line(stderr)}")


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
                path.write_text(text)
                notes.append(f"{name} restored from the server's copy outside its data directory")
    for name, text in (("postgresql.conf", MINIMAL_CONF), ("pg_hba.conf", MINIMAL_HBA), ("pg_ident.conf", "")):
        path = data_dir / name
        if not path.exists():
            path.write_text(text)
            notes.append(f"{name} was outside the source's data directory and not copied: wrote a minimal one")
    return notes


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
                         identities: Identities | None = None) -> None:
    """Unpack from BACKUP_DIR; when an object is missing or damaged there, start again from BACKUP_COPY_TO."""
    locations = members(storage)
    for number, location in enumerate(locations):
        try:
            unpack_snapshot(location, snapshot, data_dir, identities)
            return
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
