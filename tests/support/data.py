"""Test data: incompressible byte streams, made-up manifests and archives damaged on purpose."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import zstandard

from backup_tasks.catalog.ids import snapshot_keys
from backup_tasks.catalog.manifest import Manifest, Verification, save_new
from backup_tasks.clock import isoformat
from backup_tasks.settings import Settings
from backup_tasks.storage.local import LocalStorage
from backup_tasks.storage.locations import open_storage
from backup_tasks.storage.s3 import MIB

# --- byte streams -------------------------------------------------------------------------------------

def random_chunks(total: int, chunk: int = MIB, seed: int = 7) -> Iterator[bytes]:
    """Incompressible, reproducible data (moto and S3 must not be able to cheat on it)."""
    block = hashlib.sha256(str(seed).encode()).digest()
    produced = 0
    counter = 0
    while produced < total:
        size = min(chunk, total - produced)
        out = bytearray()
        while len(out) < size:
            out += hashlib.sha256(block + counter.to_bytes(8, "big")).digest() * 64
            counter += 1
        yield bytes(out[:size])
        produced += size


# --- manifests for the pure catalog functions (retention, health) ------------------------------------

NOW = datetime(2026, 11, 27, 2, 5, tzinfo=UTC)


def dump(days_ago: float, *, verified: bool | None = None, database: str = "aitrapp", kind: str = "dump") -> Manifest:
    """The manifest of a backup taken ``days_ago`` before ``NOW``; no file behind it."""
    started = NOW - timedelta(days=days_ago)
    verification = None if verified is None else Verification(
        ok=verified, verified_at=isoformat(started), duration_seconds=1, method="throwaway-cluster", checked=[])
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    return Manifest(id=f"{database}-{kind}-{stamp}", kind=kind, database=database, server="h:5432",
                    server_version="15.4", started_at=isoformat(started), finished_at=isoformat(started),
                    path=f"{database}-{kind}-{stamp}.dump.zst", size_bytes=10, sha256="0" * 64,
                    compression="zstd", verification=verification)


# --- damaged dumps ------------------------------------------------------------------------------------

def rewrite_archive(path: Path, manifest: Manifest, settings: Settings, mutate: Callable[[bytes], bytes]) -> None:
    """Damage the archive *inside* the compression and re-seal the checksum: only a restore can tell."""
    raw = zstandard.ZstdDecompressor().decompressobj().decompress(path.read_bytes())
    sealed = zstandard.ZstdCompressor().compress(mutate(raw))
    path.write_bytes(sealed)
    manifest.sha256, manifest.size_bytes = hashlib.sha256(sealed).hexdigest(), len(sealed)
    open_storage(settings.backup_dir).put_bytes(manifest.key, manifest.to_json().encode())  # re-sealed in place


SNAPSHOT_ID = "postgres-snapshot-20260101T000000Z"


# --- a small synthetic snapshot: a base tar of random (incompressible) files, as take_snapshot stores it ------

def base_tar(files: int, file_size: int, *, name_length: int = 12) -> bytes:
    """A tar of ``files`` random files (random bytes do not compress, so the stored size is the real size)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("base")
        info.type, info.mode = tarfile.DIRTYPE, 0o700
        tar.addfile(info)
        for number in range(files):
            data = os.urandom(file_size)
            info = tarfile.TarInfo(f"base/{str(number).zfill(name_length)}")
            info.size, info.mode = len(data), 0o600
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def store_snapshot(backup_dir: Path, content: bytes, *, backup_id: str = SNAPSHOT_ID) -> Manifest:
    """Store ``content`` zstd-compressed as the base object of a complete snapshot, and catalog it."""
    backup_dir.mkdir(parents=True, exist_ok=True)
    key = snapshot_keys(backup_id)["base"]
    stored = zstandard.ZstdCompressor(level=1).compress(content)
    (backup_dir / key).write_bytes(stored)
    digest = hashlib.sha256(stored).hexdigest()
    stamp = "2026-01-01T00:00:00Z"
    manifest = Manifest(
        id=backup_id, kind="snapshot", database="postgres", server="127.0.0.1:5432", server_version="15.8",
        started_at=stamp, finished_at=stamp, path=key, size_bytes=len(stored), sha256=digest, compression="zstd",
        format="pg_basebackup-tar", files={key: {"size": len(stored), "sha256": digest, "role": "base"}},
        start_lsn="0/2000028", stop_lsn="0/2000100", timeline=1, wal_segment_size=16 << 20,
        start_segment="000000010000000000000002", stop_segment="000000010000000000000002",
        restorable_from="2026-01-01T00:00:00.000000+00:00", snapshot={"archive_mode": "off"})
    save_new(LocalStorage(backup_dir), manifest)
    return manifest
