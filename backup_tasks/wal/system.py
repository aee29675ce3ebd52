"""Which PostgreSQL system WAL and locations belong to: the system identifier, read from WAL and recorded once.

Every cluster gets a 64-bit *system identifier* from initdb (``pg_control_system().system_identifier``;
a restore keeps it, a new initdb or ``pg_upgrade`` makes a new one). Its WAL carries it in the long
header of the first page of every segment (``XLogLongPageHeaderData``, in the server's byte order)::

    offset  0  xlp_magic u16    2 xlp_info u16 (XLP_LONG_HEADER = 0x0002)    4 xlp_tli u32
            8  xlp_pageaddr u64 16 xlp_rem_len u32 (+4 padding)               24 xlp_sysid u64
           32  xlp_seg_size u32 36 xlp_xlog_blcksz u32

``segment_system`` reads those 40 bytes and trusts them only when they are plainly a segment's first
page: a WAL magic, the long-header flag, a power-of-two segment size, and the page address of the
segment the file is named after. ``.partial`` files are segments; history and ``.backup`` files
carry no identifier (a ``.backup`` file follows its segment, checked when that was pushed).

A location records the system it belongs to in one small object, ``IDENTITY_KEY``, written
create-only by the first writer (``claim``) and never rewritten: the WAL archive (``check_push``,
from ``WalArchive.push``; with the archive's modes, so the server's OS user and root both read it)
and every location of the catalog (``catalog.system``). A writer of another system is refused with
``SystemMismatch`` (exit 2), naming both identifiers, before anything is stored.

Import-light (standard library and the errors): ``wal-push`` runs this once per segment, at the cost
of a 40-byte read of the segment and a read of the small identity object.
"""

from __future__ import annotations

import json
import logging
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING

from backup_tasks.errors import ObjectMissing, StorageError, SystemMismatch
from backup_tasks.wal.names import kind_of, segments_per_xlogid

if TYPE_CHECKING:
    from backup_tasks.storage.base import Storage

log = logging.getLogger(__name__)

#: The object, at the top of a location, that records the system the location belongs to.
IDENTITY_KEY = "system_identifier.json"
XLP_LONG_HEADER = 0x0002
#: ``XLogLongPageHeaderData`` in the server's (this host's) byte order: 40 bytes.
_LONG_HEADER = struct.Struct("=HHIQI4xQII")


def segment_system(path: Path) -> str | None:
    """The system identifier of the WAL segment (or ``.partial``) at ``path``, as decimal text; None when the file
    carries none (history, ``.backup``) or its first page is not plainly a segment's (then nothing is claimed).

    ``WalArchiveError`` for a name that is no WAL file's; an unreadable file is left to the caller's own read.
    """
    name = path.name
    if kind_of(name) not in ("segment", "partial"):
        return None
    try:
        with open(path, "rb") as fh:
            head = fh.read(_LONG_HEADER.size)
    except OSError:
        return None  # the push's own read of the file says what is wrong with it
    if len(head) < _LONG_HEADER.size:
        return None
    magic, info, timeline, page_address, _remaining, system, segment_size, _block_size = _LONG_HEADER.unpack(head)
    if magic & 0xF000 != 0xD000 or not info & XLP_LONG_HEADER or not 0 < timeline <= int(name[:8], 16):
        return None  # (the first segment of a new timeline starts as a copy of the old one's: an older timeline)
    if segment_size < 1 << 20 or segment_size > 1 << 30 or segment_size & (segment_size - 1):
        return None
    number = int(name[8:16], 16) * segments_per_xlogid(segment_size) + int(name[16:24], 16)
    if page_address != number * segment_size or system == 0:
        return None
    return str(system)


def recorded_system(storage: Storage) -> str | None:
    """The system identifier ``storage`` records (``IDENTITY_KEY``); None when nothing was recorded there yet."""
    try:
        raw = storage.read_bytes(IDENTITY_KEY)
    except ObjectMissing:
        return None
    try:
        system = json.loads(raw)["system_identifier"]
        if not isinstance(system, str) or not system.isdigit():
            raise ValueError(f"not a system identifier: {system!r}")
    except (ValueError, TypeError, KeyError) as exc:
        raise StorageError(f"{where(storage)} is unreadable ({exc}): it records which PostgreSQL system this "
                           f"location belongs to; restore it from a copy, or remove it to have the next backup or "
                           f"wal-push record its own system") from None
    return system


def claim(storage: Storage, system: str, *, incoming: str, what: str, remedy: str, record: bool = True) -> None:
    """``storage`` records ``system`` (create-only, on first use), or ``SystemMismatch`` when it records another.

    ``incoming``: what is being written, ``what``: the location, for the message; ``remedy``: what to do.
    ``record=False``: only refuse another system (a check before a long backup), record nothing.
    """
    recorded = recorded_system(storage)
    if recorded is None and not record:
        return
    if recorded is None:
        document = {"system_identifier": system, "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "recorded_by": incoming, "tool": "backup-tasks"}
        if storage.put_new(IDENTITY_KEY, (json.dumps(document, indent=2) + "\n").encode()):
            return
        recorded = recorded_system(storage)  # another writer recorded one meanwhile: its answer counts
    if recorded != system:
        raise SystemMismatch(f"{incoming} is of PostgreSQL system {system}, but {what} belongs to system {recorded} "
                             f"(recorded in {where(storage)}); nothing is kept. {remedy}")


def where(storage: Storage) -> str:
    """The identity object of ``storage``, for messages."""
    return f"{storage.location.rstrip('/')}/{IDENTITY_KEY}"


def check_push(storage: Storage, source: Path) -> None:
    """Before ``wal-push`` stores ``source`` in the archive ``storage``: the archive records the segment's system
    (the first segment claims it), or ``SystemMismatch``. Files carrying no identifier pass.

    An identity object that cannot be read or written (a damaged one, a full or read-only archive) is
    logged (the server log) and the push goes on: the archive's own write then fails or succeeds as it
    would, so this check never becomes the reason the server's WAL piles up.
    """
    system = segment_system(source)
    if system is None:
        return
    try:
        claim(storage, system, incoming=f"WAL segment {source.name}", what=f"the WAL archive {storage.location}",
              remedy=f"Archive this server's WAL into an archive of its own (another WAL_ARCHIVE_DIR, the "
                     f"--archive-dir of archive_command); remove {where(storage)} only if the system it records is "
                     f"gone for good.")
    except StorageError as exc:
        log.warning("backup-tasks wal-push: could not check which system the WAL archive %s belongs to: %s",
                    storage.location, exc)
