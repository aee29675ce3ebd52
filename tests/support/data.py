"""Test data: incompressible byte streams, made-up manifests and archives damaged on purpose."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import zstandard

from backup_tasks.catalog.manifest import Manifest, Verification, isoformat
from backup_tasks.settings import Settings
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
