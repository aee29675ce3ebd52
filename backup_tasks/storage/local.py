"""The local driver: a directory on a local (or mounted) filesystem, with the modes it is given.

A writer streams into ``.<name>.partial-<random>`` (an ``files.AtomicFile``) and ``commit`` fsyncs,
renames into place and fsyncs the directory; ``put_new`` links the finished temporary file to its
key, which fails when the key exists, so it never overwrites (see ``files.link_new``), and answers
False only once the object already there is durable (a writer killed between its link and its
fsync). Directories it creates are fsynced into their parents. A key that is not a regular file
(absent, or a directory) is ``ObjectMissing``, as ``exists`` says.

Modes (``files.Modes``): the catalog's ``PRIVATE_MODES`` by default; the WAL archive opens its
directory with ``WAL_MODES`` (``LocalStorage(root, modes=...)``, through ``locations``).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from stat import S_ISREG
from typing import BinaryIO

from backup_tasks.errors import ObjectMissing, StorageError
from backup_tasks.storage.base import (
    PARTIAL_MARK,
    Features,
    ObjectInfo,
    delete_each,
    in_listing,
    is_partial,
    storage_error,
)
from backup_tasks.storage.files import PRIVATE_MODES, AtomicFile, Modes, make_dirs, sync_file


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
    """Streams into ``<dir>/.<name>.partial-<random>``; ``commit`` fsyncs and renames into place."""

    def __init__(self, final: Path, modes: Modes, root: Path) -> None:
        self.final = final
        try:
            make_dirs(final.parent, modes.directory, inside=root)
            self._file: AtomicFile | None = AtomicFile(final, mode=modes.file, mark=PARTIAL_MARK)
        except OSError as exc:
            raise storage_error(exc, "creating", str(final.parent)) from None
        self.temp = self._file.temp
        # Held until the file is closed (commit, abort, or this process dying): clear_partials of
        # another run skips a partial whose writer still lives, even if that writer lost its lock.
        fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.bytes_written = 0

    def write(self, data: bytes) -> None:
        assert self._file is not None, "writer already closed"
        try:
            self._file.write(data)
        except OSError as exc:
            self._file = None  # the AtomicFile removed its temporary file
            raise storage_error(exc, "writing", str(self.final)) from None
        self.bytes_written += len(data)

    def commit(self) -> None:
        self._publish(replace=True)

    def commit_new(self) -> bool:
        """Publish only if nothing is under the key yet (never overwrites): False, and nothing kept, if taken."""
        return self._publish(replace=False)

    def _publish(self, *, replace: bool) -> bool:
        assert self._file is not None, "writer already closed"
        out, self._file = self._file, None
        try:
            return out.publish(replace=replace, fsync=True)
        except OSError as exc:
            raise storage_error(exc, "saving", str(self.final)) from None

    def abort(self) -> None:
        if self._file is not None:
            self._file.abort()
            self._file = None

    def __enter__(self) -> LocalWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if self._file is not None:
            self.abort()


class LocalStorage:
    """A directory on a local (or mounted) filesystem."""

    def __init__(self, root: Path, *, modes: Modes = PRIVATE_MODES) -> None:
        self.root = root
        self.modes = modes
        self.location = str(root)
        self.features = Features(local_root=root)

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise StorageError(f"refusing an object key outside the backup directory: {key!r}")
        return self.root / key

    def ensure(self) -> None:
        """Create the directory (its missing parents as ``mkdir -p`` does) with this location's mode."""
        try:
            make_dirs(self.root, self.modes.directory)
        except OSError as exc:
            raise storage_error(exc, "creating the backup directory", str(self.root)) from None

    def writer(self, key: str) -> LocalWriter:
        path = self._path(key)
        self.ensure()
        return LocalWriter(path, self.modes, self.root)

    def open(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ObjectMissing(f"{key} is missing from {self.location}") from None
        except OSError as exc:
            raise storage_error(exc, "opening", key) from None

    def read_bytes(self, key: str) -> bytes:
        with self.open(key) as fh:
            try:
                return fh.read()
            except OSError as exc:
                raise storage_error(exc, "reading", key) from None

    def read_tail(self, key: str, count: int) -> bytes:
        with self.open(key) as fh:
            try:
                fh.seek(max(0, os.fstat(fh.fileno()).st_size - max(count, 0)))
                return fh.read(max(count, 0))
            except OSError as exc:
                raise storage_error(exc, "reading the end of", key) from None

    def put_bytes(self, key: str, data: bytes) -> None:
        writer = self.writer(key)
        writer.write(data)
        writer.commit()

    def put_new(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if it does not exist: True if written, False (existing object untouched) if it did.

        False only once the object there is on disk, with its directory entry (``files.sync_file``):
        its writer may have been killed between its link and its fsync, and whoever gets False relies
        on it as stored (a retried ``wal-push`` acknowledges the segment).
        """
        path = self._path(key)
        if os.path.lexists(path):  # taken: no temporary file written for nothing
            self._sync_taken(key, path)
            return False
        writer = self.writer(key)
        writer.write(data)
        if writer.commit_new():
            return True
        self._sync_taken(key, path)
        return False

    def _sync_taken(self, key: str, path: Path) -> None:
        try:
            if S_ISREG(os.stat(path).st_mode):
                sync_file(path)
        except FileNotFoundError:
            pass  # deleted meanwhile: nothing to make durable
        except OSError as exc:
            raise storage_error(exc, "syncing", key) from None

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
