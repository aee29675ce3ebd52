"""The local driver: a directory on a local (or mounted) filesystem; files 0600, directories 0700.

A writer streams into ``.<name>.partial-<uuid>`` and ``commit`` fsyncs, renames into place and
fsyncs the directory; ``put_new`` links the finished temporary file to its key, which fails when
the key exists, so it never overwrites.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from stat import S_ISREG
from typing import BinaryIO

from backup_tasks.errors import StorageError
from backup_tasks.storage.base import (
    DIR_MODE,
    FILE_MODE,
    PARTIAL_MARK,
    ObjectInfo,
    fsync_dir,
    storage_error,
)


class LocalWriter:
    """Streams into ``<dir>/.<name>.partial-<uuid>``; ``commit`` fsyncs and renames into place."""

    def __init__(self, final: Path) -> None:
        self.final = final
        self.temp = final.with_name(f".{final.name}{PARTIAL_MARK}{uuid.uuid4().hex[:12]}")
        try:
            final.parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
            fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        except OSError as exc:
            raise storage_error(exc, "creating", str(self.temp)) from None
        self._file: BinaryIO | None = os.fdopen(fd, "wb", buffering=0)
        self.bytes_written = 0

    def write(self, data: bytes) -> None:
        assert self._file is not None, "writer already closed"
        try:
            view = memoryview(data)
            while view:
                n = self._file.write(view)
                view = view[n:]
        except OSError as exc:
            self.abort()
            raise storage_error(exc, "writing", str(self.final)) from None
        self.bytes_written += len(data)

    def commit(self) -> None:
        assert self._file is not None, "writer already closed"
        try:
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            os.replace(self.temp, self.final)
            fsync_dir(self.final.parent)
        except OSError as exc:
            self.abort()
            raise storage_error(exc, "saving", str(self.final)) from None

    def abort(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
        try:
            self.temp.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> LocalWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if self._file is not None:
            self.abort()


class LocalStorage:
    """A directory on a local (or mounted) filesystem."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.location = str(root)

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise StorageError(f"refusing an object key outside the backup directory: {key!r}")
        return self.root / key

    def ensure(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        except OSError as exc:
            raise storage_error(exc, "creating the backup directory", str(self.root)) from None

    def writer(self, key: str) -> LocalWriter:
        self.ensure()
        return LocalWriter(self._path(key))

    def open(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError:
            raise StorageError(f"{key} is missing from {self.location}") from None
        except OSError as exc:
            raise storage_error(exc, "opening", key) from None

    def read_bytes(self, key: str) -> bytes:
        with self.open(key) as fh:
            return fh.read()

    def put_bytes(self, key: str, data: bytes) -> None:
        writer = self.writer(key)
        writer.write(data)
        writer.commit()

    def exists(self, key: str) -> bool:
        # Not Path.is_file(): it lets PermissionError escape, and must not say "missing" for "unreadable".
        try:
            return S_ISREG(self._path(key).stat().st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as exc:
            raise storage_error(exc, "checking", key) from None

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise StorageError(f"{key} is missing from {self.location}") from None
        except OSError as exc:
            raise storage_error(exc, "checking the size of", key) from None

    def _walk(self, prefix: str) -> Iterator[tuple[str, os.stat_result]]:
        # Walk the deepest directory the prefix names, never above the root.
        start = self._path(prefix.rsplit("/", 1)[0]) if "/" in prefix else self.root
        if not start.is_dir():
            return
        for dirpath, _dirs, files in os.walk(start):
            for name in files:
                full = Path(dirpath, name)
                key = full.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    try:
                        yield key, full.stat()
                    except FileNotFoundError:
                        continue

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        return sorted((ObjectInfo(key, st.st_size, st.st_mtime) for key, st in self._walk(prefix)
                       if PARTIAL_MARK not in key.rsplit("/", 1)[-1]), key=lambda o: o.key)

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise storage_error(exc, "deleting", key) from None

    def clear_partials(self, prefix: str = "") -> list[str]:
        """Remove what killed writers left (callers hold the lock that excludes live writers)."""
        removed = []
        for key, _st in list(self._walk("")):
            name = key.rsplit("/", 1)[-1]
            if PARTIAL_MARK in name and name.lstrip(".").startswith(prefix):
                self.delete(key)
                removed.append(key)
        return removed
