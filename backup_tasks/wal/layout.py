"""The WAL archive's layout: where each file lives, what its temporary files are called, its modes.

Layout under the archive (a directory, or a ``wal/`` prefix in a bucket: the same keys)::

    <TTTTTTTTLLLLLLLL>/<segment>.zst     segments (and their .partial/.backup files), one directory per
                                         timeline and 4 GiB of WAL (256 segments of 16 MiB)
    history/<TTTTTTTT>.history.zst       timeline history files
    restore_points/<segment>-<name>.json named restore points made through backup-tasks

Modes are the storage layer's ``files.WAL_MODES`` (directories ``2770``, files ``0640``: shared by
root's tools and the server's OS user); ``FILE_MODE``/``DIR_MODE`` name them for the WAL's readers.

Standard library only (and ``storage.files``): ``archive``, ``index``, ``state`` and ``pushahead``
all read the layout from here (``state`` is written after every wal-push and must not load
zstandard, which ``objects`` needs).
"""

from __future__ import annotations

from backup_tasks.storage.files import WAL_MODES
from backup_tasks.wal.names import kind_of

#: Every archived file is ``<name[:16]>/<name>.zst`` (history files: ``history/<name>.zst``).
SUFFIX = ".zst"
HISTORY_DIR = "history"
RESTORE_POINT_DIR = "restore_points"
#: The temporary files of wal-push before this version (``.<name>.incoming-<random>``): a killed one's
#: leftovers are still cleared by prune. Files being written now carry ``storage.base.PARTIAL_MARK``.
INCOMING_MARK = ".incoming-"
#: Where the WAL archive lives under BACKUP_COPY_TO (as under BACKUP_DIR by default).
COPY_SUBDIR = "wal"

#: The archive's directories (setgid, group-writable) and files (group-readable): see ``storage.files``.
DIR_MODE = WAL_MODES.directory
FILE_MODE = WAL_MODES.file


def object_key(name: str) -> str:
    """Where the WAL file ``name`` lives, relative to the archive."""
    if kind_of(name) == "history":
        return f"{HISTORY_DIR}/{name}{SUFFIX}"
    return f"{name[:16]}/{name}{SUFFIX}"
