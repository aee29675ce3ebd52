"""Pytest plugin: a local WAL archive (fixture ``archive``) and WAL-like files to push into it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from backup_tasks.wal.archive import WalArchive

SEGMENT = "000000010000000000000003"


def fake_segment(directory: Path, name: str = SEGMENT, size: int = 1 << 20, seed: int = 1) -> Path:
    """A file of ``size`` bytes under ``directory/name`` shaped like WAL: 2 KiB of seeded bytes, then zeros."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    block = hashlib.sha256(str(seed).encode()).digest() * 64
    path.write_bytes((block * (size // len(block) // 2)).ljust(size, b"\0"))
    return path


@pytest.fixture
def archive(tmp_path: Path) -> WalArchive:
    """An empty local WAL archive in ``tmp_path/wal``."""
    result = WalArchive.in_directory(tmp_path / "wal")
    result.ensure()
    return result
