"""Where backups live: a tiny object-store interface, implemented for a local directory.

Keys are ``/``-separated relative paths (``aitrapp-dump-20261127T100500Z.dump.zst``). Writers
stream into a temporary object and publish it atomically on ``commit()``; an aborted or killed
writer never leaves an object under the final key. An S3 implementation fits the same interface
(multipart upload = writer, complete = commit, abort = abort).
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from typing import BinaryIO, Protocol

from .errors import ConfigError, StorageError, StorageFull

#: Marker in the name of objects being written; never a valid backup or manifest name.
PARTIAL_MARK = ".partial-"
FILE_MODE = 0o600
DIR_MODE = 0o700


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float


class ObjectWriter(Protocol):
    def write(self, data: bytes) -> None: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


class Storage(Protocol):
    """The operations every backup location offers."""

    location: str

    def writer(self, key: str) -> ObjectWriter: ...
    def open(self, key: str) -> BinaryIO: ...
    def read_bytes(self, key: str) -> bytes: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def exists(self, key: str) -> bool: ...
    def size(self, key: str) -> int: ...
    def list(self, prefix: str = "") -> list[ObjectInfo]: ...
    def delete(self, key: str) -> None: ...
    def clear_partials(self, prefix: str = "") -> list[str]: ...


def _storage_error(exc: OSError, action: str, where: str) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(f"no space left on device while {action} {where}; free space or point "
                           f"BACKUP_DIR elsewhere (the partial file was removed)")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageError(f"permission denied while {action} {where}: {exc.strerror}")
    return StorageError(f"{action} {where} failed: {exc.strerror or exc}")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalWriter:
    """Streams into ``<dir>/.<name>.partial-<uuid>``; ``commit`` fsyncs and renames into place."""

    def __init__(self, final: Path) -> None:
        self.final = final
        self.temp = final.with_name(f".{final.name}{PARTIAL_MARK}{uuid.uuid4().hex[:12]}")
        try:
            final.parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
            fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        except OSError as exc:
            raise _storage_error(exc, "creating", str(self.temp)) from None
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
            raise _storage_error(exc, "writing", str(self.final)) from None
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
            raise _storage_error(exc, "saving", str(self.final)) from None

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
            raise _storage_error(exc, "creating the backup directory", str(self.root)) from None

    def writer(self, key: str) -> LocalWriter:
        self.ensure()
        return LocalWriter(self._path(key))

    def open(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError:
            raise StorageError(f"{key} is missing from {self.location}") from None
        except OSError as exc:
            raise _storage_error(exc, "opening", key) from None

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
            raise _storage_error(exc, "checking", key) from None

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise StorageError(f"{key} is missing from {self.location}") from None
        except OSError as exc:
            raise _storage_error(exc, "checking the size of", key) from None

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
            raise _storage_error(exc, "deleting", key) from None

    def clear_partials(self, prefix: str = "") -> list[str]:
        """Remove what killed writers left (callers hold the lock that excludes live writers)."""
        removed = []
        for key, _st in list(self._walk("")):
            name = key.rsplit("/", 1)[-1]
            if PARTIAL_MARK in name and name.lstrip(".").startswith(prefix):
                self.delete(key)
                removed.append(key)
        return removed


def open_storage(location: str, *, setting: str = "BACKUP_DIR") -> Storage:
    """The storage for ``BACKUP_DIR`` (or ``BACKUP_COPY_TO``): a local path or an ``s3://bucket/prefix`` URL."""
    if location.startswith("s3://"):
        from .storage_s3 import S3Storage  # boto3 is imported only when a bucket is used

        return S3Storage.from_url(location, setting=setting)
    if "://" in location:
        raise ConfigError(f"{setting} must be a local directory path or an s3://BUCKET/PREFIX URL, got: {location}")
    return LocalStorage(Path(location))
