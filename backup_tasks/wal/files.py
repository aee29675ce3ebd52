"""The WAL archive's layout (names, directories, modes), and small files written atomically beside the segments.

Stdlib only, importing nothing of ours: ``archive``, ``index``, ``state`` and ``pushahead`` all read the
layout from here (``state`` is written after every wal-push and must not load zstandard, which
``archive`` needs; ``index`` is imported by ``archive``).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

#: Every archived file is ``<name[:16]>/<name>.zst`` (history files: ``history/<name>.zst``).
SUFFIX = ".zst"
HISTORY_DIR = "history"
RESTORE_POINT_DIR = "restore_points"
#: A file being written into the archive: ``.<name>.incoming-<random>`` until its rename.
INCOMING_MARK = ".incoming-"
#: Where the WAL archive lives under BACKUP_COPY_TO (as under BACKUP_DIR by default).
COPY_SUBDIR = "wal"

#: Directories: setgid and group-writable, so root's tools and the server's OS user share the archive.
DIR_MODE = 0o2770
#: Files: group-readable, so root's tools (prune, check, the exporter) read what the server's OS user wrote.
FILE_MODE = 0o640


def replace_file(path: Path, data: bytes, *, temp_prefix: str, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file beside it, renamed over it.

    Mode ``FILE_MODE`` whatever the umask (the server's 077 would hide the file from root's tools).
    Readers see the old content or the new, never part of it; a failure leaves no temporary file.
    ``fsync`` for a record that must survive a crash; caches and markers are rebuilt instead.
    """
    temp = path.with_name(f"{temp_prefix}{uuid.uuid4().hex[:12]}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            if fsync:
                out.flush()
                os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise
