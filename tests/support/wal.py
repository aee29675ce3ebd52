"""Pytest plugin: a local WAL archive (fixture ``archive``), WAL-like files to push into it, a ``pg_wal`` behind on
archiving (``fake_pg_wal``, ``archived``), and tiny archived segments and real history files (``put_segment``,
``put_history``)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from backup_tasks.wal.archive import WalArchive
from backup_tasks.wal.layout import object_key
from backup_tasks.wal.objects import trailer_bytes

SEGMENT = "000000010000000000000003"
#: What the trailers of ``put_segment`` say a segment held (a real server's size).
SEGMENT_SIZE = 16 << 20


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


def write_file(pg_wal: Path, name: str, seed: int, size: int = 2 << 20) -> Path:
    path = pg_wal / name
    block = hashlib.sha256(f"{name}-{seed}".encode()).digest() * 64  # 2 KiB of seeded bytes, then zeros
    path.write_bytes((block * (size // len(block) // 2)).ljust(size, b"\0"))
    return path


def fake_pg_wal(base: Path, names: list[str], seed: int = 1) -> Path:
    """A pg_wal with ``names`` written and each marked ``.ready``, as a server behind on archiving has it."""
    pg_wal = base / "pg_wal"
    (pg_wal / "archive_status").mkdir(parents=True)
    for name in names:
        write_file(pg_wal, name, seed, size=300 if name.endswith((".history", ".backup")) else 2 << 20)
        (pg_wal / "archive_status" / f"{name}.ready").touch()
    return pg_wal


def archived(pg_wal: Path, name: str) -> None:
    """What the server's archiver does after exit 0."""
    os.rename(pg_wal / "archive_status" / f"{name}.ready", pg_wal / "archive_status" / f"{name}.done")


def put_segment(root: Path, name: str) -> None:
    """A tiny archived segment: one byte, then a valid trailer whose completion time is its segment number."""
    path = root / object_key(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"w" + trailer_bytes(b"\0" * 32, SEGMENT_SIZE, float(int(name[8:], 16))))


def put_history(archive: WalArchive, tmp: Path, timeline: int, entries: list[tuple[int, int]]) -> None:
    """A real archived ``<timeline>.history``: ``(parent timeline, switch LSN)`` lines."""
    source = tmp / f"{timeline:08X}.history"
    source.write_text("".join(f"{parent}\t{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}\tno recovery target specified\n"
                              for parent, lsn in entries))
    archive.push(source)
