"""The local driver: a directory on a local (or mounted) filesystem; files 0600, directories 0700.

A writer streams into ``.<name>.partial-<uuid>`` and ``commit`` fsyncs, renames into place and
fsyncs the directory; ``put_new`` links the finished temporary file to its key, which fails when
the key exists, so it never overwrites. (Only on a filesystem without hard links does it fall back
to "check, then rename", which a concurrent writer can race.) A key that is not a regular file
(absent, or a directory) is ``ObjectMissing``, as ``exists`` says.
"""

from __future__ import annotations

import errno
import fcntl
import os
import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from stat import S_ISREG
from typing import BinaryIO

from backup_tasks.errors import ObjectMissing, StorageError
from backup_tasks.storage.base import (
    DIR_MODE,
    FILE_MODE,
    PARTIAL_MARK,
    ObjectInfo,
    delete_each,
    fsync_dir,
    in_listing,
    is_partial,
    storage_error,
)

#: ``os.link`` errors meaning "this filesystem has no hard links" (vfat, some FUSE and SMB mounts).
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS})


def _link_new(temp: Path, final: Path) -> bool:
    """Give ``temp``'s file the name ``final`` unless that name is taken: True if it now has it."""
    try:
        os.link(temp, final)  # atomic, and fails rather than overwrite
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        if os.path.lexists(final):
            return False
        os.rename(temp, final)
    return True


def _writer_alive(partial: Path) -> bool:
    """Whether a writer still holds ``partial`` open (its flock; the kernel drops it when the writer dies)."""
    try:
        fd = os.open(partial, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False  # a filesystem without flock: fall back to the caller's lock, as before
    finally:
        os.close(fd)
    return False


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
        # Held until the file is closed (commit, abort, or this process dying): clear_partials of
        # another run skips a partial whose writer still lives, even if that writer lost its lock.
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
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
        self._publish(replace=True)

    def commit_new(self) -> bool:
        """Publish only if nothing is under the key yet (never overwrites): False, and nothing kept, if taken."""
        return self._publish(replace=False)

    def _publish(self, *, replace: bool) -> bool:
        assert self._file is not None, "writer already closed"
        try:
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            if replace:
                os.replace(self.temp, self.final)
            elif _link_new(self.temp, self.final):
                self.abort()  # drops the temporary name; the object stays under its key
            else:
                self.abort()
                return False
            fsync_dir(self.final.parent)
        except OSError as exc:
            self.abort()
            raise storage_error(exc, "saving", str(self.final)) from None
        return True

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
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ObjectMissing(f"{key} is missing from {self.location}") from None
        except OSError as exc:
            raise storage_error(exc, "opening", key) from None

    def read_bytes(self, key: str) -> bytes:
        with self.open(key) as fh:
            return fh.read()

    def put_bytes(self, key: str, data: bytes) -> None:
        writer = self.writer(key)
        writer.write(data)
        writer.commit()

    def put_new(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if it does not exist: True if written, False (existing object untouched) if it did."""
        writer = self.writer(key)
        writer.write(data)
        return writer.commit_new()

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
            st = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectMissing(f"{key} is missing from {self.location}") from None
        except OSError as exc:
            raise storage_error(exc, "checking the size of", key) from None
        if not S_ISREG(st.st_mode):
            raise ObjectMissing(f"{key} is missing from {self.location}")
        return st.st_size

    def _walk(self, prefix: str, *, recursive: bool = True) -> Iterator[tuple[str, os.stat_result]]:
        # Walk the deepest directory the prefix names, never above the root; only that one if not recursive.
        start = self._path(prefix.rsplit("/", 1)[0]) if "/" in prefix else self.root
        if not start.is_dir():
            return
        if not recursive:
            try:
                entries = list(os.scandir(start))
            except (FileNotFoundError, NotADirectoryError):
                return
            except OSError as exc:
                raise storage_error(exc, "listing", str(start)) from None
            for entry in entries:
                key = Path(entry.path).relative_to(self.root).as_posix()
                if not key.startswith(prefix):
                    continue
                try:
                    if entry.is_file(follow_symlinks=True):
                        yield key, entry.stat(follow_symlinks=True)
                except FileNotFoundError:
                    continue
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

    def list(self, prefix: str = "", *, recursive: bool = True) -> list[ObjectInfo]:
        return sorted((ObjectInfo(key, st.st_size, st.st_mtime) for key, st in self._walk(prefix, recursive=recursive)
                       if not is_partial(key) and in_listing(key, prefix, recursive=recursive)),
                      key=lambda o: o.key)

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise storage_error(exc, "deleting", key) from None

    def delete_many(self, keys: Iterable[str]) -> dict[str, StorageError]:
        """One unlink per key (a directory has no batch delete; 20,000 unlinks take well under a second)."""
        return delete_each(self, keys)

    def retention(self, key: str) -> datetime | None:
        return None  # a directory locks nothing

    def clear_partials(self, prefix: str = "") -> list[str]:
        """Remove what dead writers left; a partial whose writer still holds its flock is never touched."""
        removed = []
        # Names only (no stat per file): the walk passes a WAL archive of 100,000+ segments under BACKUP_DIR.
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if PARTIAL_MARK not in name or not name.lstrip(".").startswith(prefix):
                    continue
                key = Path(dirpath, name).relative_to(self.root).as_posix()
                if not _writer_alive(self._path(key)):
                    self.delete(key)
                    removed.append(key)
        return removed
