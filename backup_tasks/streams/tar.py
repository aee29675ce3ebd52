"""Tar streams: feeding ``tar -x`` from this process, and hashing what is read on the way."""

from __future__ import annotations

import hashlib
import io
import subprocess
from pathlib import Path
from typing import IO, Any, BinaryIO

import zstandard

from backup_tasks.errors import (
    SnapshotFailed,
)
from backup_tasks.postgres.cluster import as_server_user as as_server_user
from backup_tasks.postgres.failures import first_line
from backup_tasks.streams.codec import CHUNK


class HashingReader(io.RawIOBase):
    """Reads a stored object, keeping the sha256 and size of the bytes as stored (ciphertext when encrypted)."""

    def __init__(self, source: BinaryIO) -> None:
        super().__init__()
        self.source = source
        self.digest = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size)
        self.digest.update(data)
        self.size += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def drain(self) -> None:
        """Hash whatever the decryptor left unread, so the checksum always covers the whole object."""
        while self.read(CHUNK):
            pass

    def close(self) -> None:
        if not self.closed:
            self.source.close()
        super().close()


class Unpacker:
    """``tar -x`` into a directory, fed from our process (optionally through a zstd decompressor)."""

    def __init__(self, directory: Path, *, compressed: bool) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(["tar", "-x", "--no-same-owner", "--no-same-permissions", "-f", "-",
                                      "-C", str(directory)], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.proc.stdin is not None
        self.stdin: IO[bytes] = self.proc.stdin
        self.decompressor = zstandard.ZstdDecompressor().decompressobj() if compressed else None
        self.failed = False

    def write(self, data: bytes) -> None:
        if self.failed:
            return
        if self.decompressor is not None:
            data = self.decompressor.decompress(data)
        try:
            self.stdin.write(data)
        except BrokenPipeError:
            self.failed = True

    def finish(self, what: str) -> None:
        try:
            self.stdin.close()
        except BrokenPipeError:
            self.failed = True
        returncode = self.proc.wait()
        stderr = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
        if returncode != 0 or self.failed:
            raise SnapshotFailed(f"unpacking {what} for verification failed: {first_line(stderr) or returncode}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
