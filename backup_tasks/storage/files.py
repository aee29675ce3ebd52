"""Files on this machine: the one atomic write, the modes files and directories get, directories made durable.

Every file backup-tasks publishes in a directory goes through ``AtomicFile``: the local driver's
objects (``local.LocalWriter``), and the small files kept beside a local WAL archive (its state file,
push-ahead markers, the index cache), a WAL file restored into ``pg_wal``, the read-ahead spool, the
status page. It writes ``.<name><mark><random>`` in the target's directory (same filesystem: the
rename is atomic), sets the mode whatever the umask, fsyncs when asked, then renames it over the
target, or links it to the target only when that name is free (create-only: never overwrites), and
fsyncs the directory. Any failure removes the temporary file; readers see the old file or the new
one, never part of one.

``make_dirs`` creates directories with a given mode, each fsynced into its parent (a crash must not
lose the directory an acknowledged object sits in); ``sync_file`` makes an existing file and its
directory entry durable (an object a killed writer linked but never fsynced).

Standard library only: the per-segment WAL fast path imports this.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO, NamedTuple


class Modes(NamedTuple):
    """The modes of what a location creates: files, directories, and lock files opened by several users."""

    file: int
    directory: int
    lock_file: int


#: The catalog (backups, manifests, their records): root's alone, since a dump holds all the data.
PRIVATE_MODES = Modes(file=0o600, directory=0o700, lock_file=0o600)

#: The WAL archive, shared by root (worker, CLI, prune, the exporter) and the server's OS user
#: (archive_command, restore_command). Directories are setgid and group-writable: everything inside
#: inherits the directory's group (the server user's), so root's tools and that user share it. Files
#: are group-readable, so root's tools read what the server's user wrote. Lock files are
#: group-writable: both users lock them (the state file's lock). Set explicitly, whatever the umask:
#: the server runs its children with umask 077, which would hide everything from the group.
WAL_MODES = Modes(file=0o640, directory=0o2770, lock_file=0o660)

#: The default mark of a temporary name (the local driver's writers use ``base.PARTIAL_MARK``).
TEMP_MARK = ".tmp-"

#: ``os.link`` errors meaning "this filesystem has no hard links" (vfat, some FUSE and SMB mounts).
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS})


def temporary_name(name: str, mark: str = TEMP_MARK) -> str:
    """The hidden name a file is written under before it takes ``name``: ``.<name><mark><random>``."""
    hidden = name if name.startswith(".") else f".{name}"
    return f"{hidden}{mark}{os.urandom(6).hex()}"


def is_temporary(name: str, mark: str = TEMP_MARK) -> bool:
    """Whether a directory entry is a file still being written (or left by a killed writer) with ``mark``."""
    return name.startswith(".") and mark in name


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (a rename, a new file or directory) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_parent(path: Path) -> None:
    try:
        fsync_dir(path.parent)
    except PermissionError:
        pass  # a parent this user may write but not read (mode 0300, 0711...) cannot be opened to fsync


def sync_file(path: Path) -> None:
    """fsync the existing file ``path`` and its directory: durable now, whoever wrote it.

    For an object found already in place, which a writer killed between its link and its fsync may
    have left on its way to the disk only: it is acknowledged only once it is there.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)


def make_dirs(path: Path, mode: int, *, inside: Path | None = None) -> None:
    """Create directory ``path`` and its missing parents; each one created is fsynced into its parent.

    The levels below ``inside`` (just ``path`` itself without it) get ``mode`` whatever the umask; the
    levels above get the default permissions, as ``mkdir -p`` gives them. A level another process
    creates meanwhile is left as that process made it. Raises ``OSError``.
    """
    missing: list[Path] = []
    level = path
    while not level.is_dir():
        missing.append(level)
        if level.parent == level:
            break
        level = level.parent
    for directory in reversed(missing):
        ours = directory == path if inside is None else inside in directory.parents
        try:
            os.mkdir(directory, 0o700 if ours else 0o777)  # the final mode is set below, whatever the umask
        except FileExistsError:
            continue
        if ours:
            os.chmod(directory, mode)
        _fsync_parent(directory)


def link_new(temp: Path, final: Path) -> bool:
    """Give ``temp``'s file the name ``final`` unless that name is taken: True if it now has it.

    A hard link is atomic and fails rather than overwrite. Only on a filesystem without hard links
    does it fall back to "check, then rename", which a concurrent writer can race.
    """
    try:
        os.link(temp, final)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        if os.path.lexists(final):
            return False
        os.rename(temp, final)
    return True


class AtomicFile:
    """A file written under a temporary name beside ``final``; ``publish`` gives it that name whole, or nothing.

    ``mode``: the file's mode, set whatever the umask (None: as the umask leaves ``0o666``). ``mark``:
    what its temporary name carries (``is_temporary``), so that leftovers of a killed writer can be
    recognized. The directory of ``final`` must exist. Raises ``OSError``; the temporary file is
    removed on any failure.
    """

    def __init__(self, final: Path, *, mode: int | None, mark: str = TEMP_MARK) -> None:
        self.final = final
        self.temp = final.with_name(temporary_name(final.name, mark))
        fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode & 0o777)
        try:
            if mode is not None:
                os.fchmod(fd, mode)
        except BaseException:
            os.close(fd)
            self._remove_temp()
            raise
        self.file: BinaryIO | None = os.fdopen(fd, "wb", buffering=0)

    def fileno(self) -> int:
        assert self.file is not None, "already closed"
        return self.file.fileno()

    def write(self, data: bytes) -> None:
        assert self.file is not None, "already closed"
        try:
            view = memoryview(data)
            while view:
                written = self.file.write(view)
                view = view[written or 0:]
        except BaseException:
            self.abort()
            raise

    def publish(self, *, replace: bool = True, fsync: bool = True) -> bool:
        """Give the file its final name: True; with ``replace=False`` only if that name is free (False if taken).

        ``fsync``: the file before it is named and the directory after, so that it survives a crash
        (records); without it, a crash may lose the file (caches, markers: rebuilt, or recomputed).
        """
        assert self.file is not None, "already closed"
        try:
            if fsync:
                os.fsync(self.file.fileno())
            self.file.close()
            self.file = None
            if replace:
                os.replace(self.temp, self.final)
                published = True
            else:
                published = link_new(self.temp, self.final)
                self._remove_temp()  # the object keeps its final name (if it got it)
            if published and fsync:
                fsync_dir(self.final.parent)
        except BaseException:
            self.abort()
            raise
        return published

    def abort(self) -> None:
        """Drop the temporary file (idempotent; a published file is not touched)."""
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()
            self.file = None
        self._remove_temp()

    def _remove_temp(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.temp.unlink()


def write_atomically(path: Path, content: bytes | Iterable[bytes], *, mode: int | None, fsync: bool = False,
                     replace: bool = True, mark: str = TEMP_MARK) -> int:
    """``content`` (bytes, or chunks as they come) published at ``path`` through an ``AtomicFile``.

    Returns the number of bytes written; with ``replace=False`` -1 when ``path`` was taken (nothing
    written there). An exception raised while the chunks are produced (damage found while
    decompressing, say) leaves nothing behind and propagates; ``OSError`` for the file itself.
    """
    out = AtomicFile(path, mode=mode, mark=mark)
    size = 0
    try:
        for chunk in [content] if isinstance(content, bytes) else content:
            out.write(chunk)
            size += len(chunk)
    except BaseException:
        out.abort()
        raise
    return size if out.publish(replace=replace, fsync=fsync) else -1
