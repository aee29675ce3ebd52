"""Tar streams: feeding ``tar -x`` from this process, and hashing what is read on the way."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import signal
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO

import zstandard

from backup_tasks.errors import (
    SnapshotFailed,
    StorageError,
    StorageFull,
)
from backup_tasks.streams.codec import CHUNK


class HashingReader(io.RawIOBase):
    """Reads a stored object, keeping the sha256 and size of the bytes as stored (ciphertext when encrypted)."""

    def __init__(self, source: BinaryIO, what: str = "the stored object") -> None:
        super().__init__()
        self.source = source
        self.what = what
        self.digest = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        try:
            data = self.source.read(size)
        except OSError as exc:
            # A read error of the storage (EIO on the backup disk...): the location's fault, not this machine's.
            raise StorageError(f"reading {self.what} failed: {exc.strerror or exc}") from None
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


# --- tar -x fed from this process, its failures told apart ------------------------------------------------

#: What tar prints (after "Cannot write:", "Cannot open:"...) when the disk it writes to is full.
DISK_FULL = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))
#: A short write (no errno: GNU tar's "Wrote only 5120 of 10240 bytes") is a disk filling up too.
SHORT_WRITE = "Wrote only "
#: Other failures of this machine: the directory written to, the process's limits. Never about the archive.
LOCAL_FAILURES = tuple(os.strerror(code) for code in (
    errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO, errno.EFBIG, errno.EMFILE, errno.ENFILE, errno.ENOMEM))
#: At most this many of tar's lines are kept: on a full disk it reports every file it could not write.
MAX_MESSAGES = 200


@dataclass
class TarOutcome:
    """How ``tar -x`` ended: its exit status and what it said on stderr."""

    returncode: int
    messages: list[str] = field(default_factory=list)
    #: tar closed its input before the end of the stream (it died, or gave up on the archive).
    stopped_reading: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def local_failure(self) -> tuple[bool, str] | None:
        """``(disk_full, message)`` when tar failed for a reason of this machine, else None.

        Only positive evidence counts: tar names the errno of a failed write, open or mkdir, and a
        signal comes from outside (the OOM killer, an operator). A damaged archive gives neither.
        """
        if self.ok:
            return None
        for needles, full in ((DISK_FULL, True), ((SHORT_WRITE,), True), (LOCAL_FAILURES, False)):
            line = next((m for m in self.messages if any(n in m for n in needles)), None)
            if line is not None:
                return full, line
        if self.returncode < 0:
            try:
                name = signal.Signals(-self.returncode).name
            except ValueError:
                name = str(-self.returncode)
            return False, f"tar was killed by signal {name}"
        return None

    def describe(self) -> str:
        """tar's first message (the cause: later ones are often consequences), else its exit status."""
        return self.messages[0] if self.messages else f"tar exited with status {self.returncode}"


class TarExtract:
    """``tar -x`` into a directory, fed by this process.

    tar's stderr is drained on a thread as it comes: on a full disk tar reports every file it cannot
    write, far more than a pipe holds, and a tar blocked on its stderr stops reading its stdin, which
    would block us writing to it for ever. Once tar stops reading, ``feed`` says so and drops the
    data: the caller goes on reading (and hashing) the stored object to judge it whole.
    """

    def __init__(self, directory: Path, options: Sequence[str] = ("--no-same-owner",)) -> None:
        self.proc = subprocess.Popen(["tar", "-x", *options, "-f", "-", "-C", str(directory)],
                                     stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.proc.stdin is not None and self.proc.stderr is not None
        self.stdin: IO[bytes] = self.proc.stdin
        self.reading = True
        self.messages: list[str] = []
        self._stderr = self.proc.stderr
        self._drainer = threading.Thread(target=self._drain, name="tar-stderr", daemon=True)
        self._drainer.start()

    def _drain(self) -> None:
        for raw in self._stderr:
            line = raw.decode(errors="replace").strip()
            if line and len(self.messages) < MAX_MESSAGES:
                self.messages.append(line)

    def feed(self, data: bytes) -> bool:
        """Write to tar; False (and nothing written) once tar has stopped reading."""
        if not self.reading:
            return False
        try:
            self.stdin.write(data)
        except BrokenPipeError:
            self.reading = False
        return self.reading

    def finish(self) -> TarOutcome:
        try:
            self.stdin.close()
        except BrokenPipeError:
            self.reading = False
        returncode = self.proc.wait()
        self._drainer.join()
        self._stderr.close()
        return TarOutcome(returncode, list(self.messages), stopped_reading=not self.reading)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        try:
            self.stdin.close()
        except BrokenPipeError:
            pass
        self._drainer.join(timeout=5)
        if not self._drainer.is_alive():  # else something else holds tar's stderr open: leave it to the thread
            self._stderr.close()


class Unpacker:
    """A snapshot's check copy as it is taken: ``TarExtract`` fed through an optional zstd decompressor."""

    def __init__(self, directory: Path, *, compressed: bool) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.tar = TarExtract(directory, ("--no-same-owner", "--no-same-permissions"))
        self.decompressor = zstandard.ZstdDecompressor().decompressobj() if compressed else None

    def write(self, data: bytes) -> None:
        if self.tar.reading:  # once tar has stopped, the backup itself still goes on to storage
            self.tar.feed(self.decompressor.decompress(data) if self.decompressor is not None else data)

    def finish(self, what: str) -> None:
        outcome = self.tar.finish()
        if outcome.ok and not outcome.stopped_reading:
            return
        local = outcome.local_failure()
        if local is not None:
            full, line = local
            raise (StorageFull if full else StorageError)(
                f"unpacking {what} for pg_verifybackup failed on this machine ({line}); free space in TMPDIR "
                f"(or /dev/shm) and take the snapshot again: nothing was kept")
        raise SnapshotFailed(f"unpacking {what} for verification failed: {outcome.describe()}")

    def kill(self) -> None:
        self.tar.kill()
