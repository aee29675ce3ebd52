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

Generations (``catalog.generations`` reads them; the records live here, because ``wal-push`` writes
them). A major upgrade (``pg_upgrade``) makes a new system whose WAL and backups go into the same
archive and catalog: a *generation* is one system with its major. The first is ``IDENTITY_KEY`` (its
``major`` recorded by this version on; an older one carries none). Each later one is a create-only
object ``generations/<system identifier>.json`` (``generation_key``), never a rewrite of the first
(an Object Lock bucket refuses rewrites). Beside them, also create-only::

    generations/<system>.json                   a generation: system, major, opened_at, opened_by, reason
                                                ("upgrade": during an open upgrade; "automatic": a pg_upgrade'd
                                                cluster found on its own), previous (system), first_segment
    generations/upgrade-<stamp>.begin.json      ``backup-tasks upgrade --begin``: the old system, its major, when
    generations/upgrade-<stamp>.finish.json     ``upgrade --finish``: the new system, its major, its first snapshot
    generations/release-<system>.json           ``upgrade --release-old``: that generation's last chain may go

Generations are ordered by major (a new one opens only with a higher major than every earlier one),
so no record is ever rewritten to end one: a generation ends where the next begins.

A segment (or backup) of a system the location does not record opens a new generation when its major
(from the page magic, ``PAGE_MAGIC_MAJOR``) is higher than the newest generation's and either an upgrade
is open (``--begin`` without ``--finish``) or the caller found it to be an upgrade of this server (WAL:
always; a backup: the new server has every database the catalog backs up). Same major, or an older
one: ``SystemMismatch`` as before (another deployment, not an upgrade).

Import-light (standard library and the errors): ``wal-push`` runs this once per segment, at the cost
of a 40-byte read of the segment and a read of the small identity object (a later generation's
segment: one more read, of its own ``generations/<system>.json``); only a segment of a system not
recorded at all lists the small ``generations/`` prefix.
"""

from __future__ import annotations

import json
import logging
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

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
#: ``XLOG_PAGE_MAGIC`` of each major (src/include/access/xlog_internal.h): the WAL format's version.
PAGE_MAGIC_MAJOR = {0xD106: 13, 0xD10D: 14, 0xD110: 15, 0xD113: 16, 0xD116: 17, 0xD118: 18}
#: Where the records of later generations, upgrades and releases live (see the module docstring).
GENERATIONS_DIR = "generations"


class SegmentIdentity(NamedTuple):
    """Whose a segment is: its system identifier (decimal text) and the major its page magic names (None: unknown)."""

    system: str
    major: int | None


def segment_system(path: Path) -> str | None:
    """The system identifier of the WAL segment (or ``.partial``) at ``path``, as decimal text; None when the file
    carries none (history, ``.backup``) or its first page is not plainly a segment's (then nothing is claimed).

    ``WalArchiveError`` for a name that is no WAL file's; an unreadable file is left to the caller's own read.
    """
    identity = segment_identity(path)
    return None if identity is None else identity.system


def segment_identity(path: Path) -> SegmentIdentity | None:
    """``segment_system`` with the major the segment's page magic names (``PAGE_MAGIC_MAJOR``)."""
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
    return SegmentIdentity(str(system), PAGE_MAGIC_MAJOR.get(magic))


def recorded_system(storage: Storage) -> str | None:
    """The system identifier ``storage`` records (``IDENTITY_KEY``); None when nothing was recorded there yet."""
    first = first_generation(storage)
    return None if first is None else first.system


class Generation(NamedTuple):
    """One generation as recorded (``IDENTITY_KEY`` for the first, ``generation_key`` for each later one)."""

    system: str
    major: int | None  # None: a first generation recorded before majors were (``catalog.generations`` infers it)
    opened_at: str | None
    key: str
    reason: str = "first"  # "first", "upgrade" or "automatic"
    previous: str | None = None  # the system of the generation before it
    first_segment: str | None = None  # in a WAL archive: the segment that opened it


class Upgrade(NamedTuple):
    """An upgrade ``backup-tasks upgrade --begin`` recorded, and its ``--finish`` if there was one."""

    upgrade_id: str  # the stamp shared by its two records
    old_system: str
    old_major: int | None
    began_at: str
    last_segment: str | None  # the old server's last segment, archived before it stopped
    final_snapshot: str | None
    new_system: str | None = None  # set once finished
    new_major: int | None = None
    finished_at: str | None = None
    first_snapshot: str | None = None

    @property
    def open(self) -> bool:
        return self.finished_at is None


def _document(storage: Storage, key: str) -> dict[str, object] | None:
    """The JSON object at ``key``; None when there is none; ``StorageError`` when it is unreadable."""
    try:
        raw = storage.read_bytes(key)
    except ObjectMissing:
        return None
    try:
        document = json.loads(raw)
        system = document["system_identifier"] if key == IDENTITY_KEY or _is_generation(key) else None
        if system is not None and (not isinstance(system, str) or not system.isdigit()):
            raise ValueError(f"not a system identifier: {system!r}")
        if not isinstance(document, dict):
            raise ValueError("not a JSON object")
    except (ValueError, TypeError, KeyError) as exc:
        raise StorageError(f"{storage.location.rstrip('/')}/{key} is unreadable ({exc}): it records which PostgreSQL "
                           f"system this location belongs to; restore it from a copy, or remove it to have the next "
                           f"backup or wal-push record its own system") from None
    return document


def _is_generation(key: str) -> bool:
    name = key.rpartition("/")[2]
    return key.startswith(GENERATIONS_DIR + "/") and name.endswith(".json") and name[:-5].isdigit()


def _major(value: object) -> int | None:
    return value if isinstance(value, int) and value > 0 else None


def _generation(document: dict[str, object], key: str) -> Generation:
    def text(name: str) -> str | None:
        value = document.get(name)
        return value if isinstance(value, str) else None

    return Generation(str(document["system_identifier"]), _major(document.get("major")),
                      text("opened_at") or text("recorded_at"), key, text("reason") or "first", text("previous"),
                      text("first_segment"))


def first_generation(storage: Storage) -> Generation | None:
    """The first generation ``storage`` records (``IDENTITY_KEY``), or None."""
    document = _document(storage, IDENTITY_KEY)
    return None if document is None else _generation(document, IDENTITY_KEY)


def generation_key(system: str) -> str:
    return f"{GENERATIONS_DIR}/{system}.json"


def later_generation(storage: Storage, system: str) -> Generation | None:
    """The later generation of ``system`` recorded in ``storage`` (one read, no listing), or None."""
    document = _document(storage, generation_key(system))
    return None if document is None else _generation(document, generation_key(system))


def read_records(storage: Storage) -> tuple[list[Generation], list[Upgrade], set[str]]:
    """Everything ``storage`` records about its generations: the generations (oldest first: the first, then by
    major), the upgrades (oldest first) and the systems released by ``upgrade --release-old``.

    One read of ``IDENTITY_KEY`` and one listing of ``generations/`` (a handful of small objects).
    A first generation whose major is also in a later record (``upgrade --begin`` records it for an
    identity written before majors were) takes that major.
    """
    first = first_generation(storage)
    later: dict[str, Generation] = {}
    begins: dict[str, dict[str, object]] = {}
    finishes: dict[str, dict[str, object]] = {}
    released: set[str] = set()
    for obj in storage.list(f"{GENERATIONS_DIR}/", recursive=False):
        name = obj.key.rpartition("/")[2]
        if _is_generation(obj.key):
            document = _document(storage, obj.key)
            if document is not None:
                later[name[:-5]] = _generation(document, obj.key)
        elif name.startswith("upgrade-") and name.endswith((".begin.json", ".finish.json")):
            stamp, _, rest = name[len("upgrade-"):].partition(".")
            document = _document(storage, obj.key)
            if document is not None:
                (begins if rest == "begin.json" else finishes)[stamp] = document
        elif name.startswith("release-") and name.endswith(".json") and name[8:-5].isdigit():
            released.add(name[8:-5])
    generations: list[Generation] = []
    if first is not None:
        known = later.pop(first.system, None)
        generations.append(first if first.major is not None or known is None else first._replace(major=known.major))
    generations += sorted(later.values(), key=lambda g: (g.major or 0, g.opened_at or ""))
    upgrades = [_upgrade(stamp, begin, finishes.get(stamp)) for stamp, begin in sorted(begins.items())]
    return generations, upgrades, released


def _upgrade(stamp: str, begin: dict[str, object], finish: dict[str, object] | None) -> Upgrade:
    def text(document: dict[str, object] | None, name: str) -> str | None:
        value = (document or {}).get(name)
        return value if isinstance(value, str) else None

    return Upgrade(stamp, str(begin.get("old_system")), _major(begin.get("old_major")), str(begin.get("began_at")),
                   text(begin, "last_segment"), text(begin, "final_snapshot"), text(finish, "new_system"),
                   _major((finish or {}).get("new_major")), text(finish, "finished_at"),
                   text(finish, "first_snapshot"))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def put_record(storage: Storage, key: str, document: dict[str, object]) -> bool:
    """Write a record create-only; False when ``key`` exists already (its first writer's answer stands)."""
    return storage.put_new(key, (json.dumps({**document, "tool": "backup-tasks"}, indent=2) + "\n").encode())


def admission(generations: list[Generation], upgrades: list[Upgrade], system: str, major: int | None, *,
              upgraded: bool) -> tuple[str | None, str]:
    """Pure: whether ``system`` (of ``major``) opens a new generation after ``generations``: ``(reason, why)``.

    ``reason``: "upgrade" (an upgrade is open) or "automatic" (``upgraded``: the caller found it to be an
    upgrade of this server); None when it may not, with ``why`` saying so.
    """
    open_upgrade = next((u for u in reversed(upgrades) if u.open), None)
    majors = [g.major for g in generations if g.major is not None]
    if open_upgrade is not None and open_upgrade.old_major is not None:
        majors.append(open_upgrade.old_major)
    if major is None:
        return None, ("its PostgreSQL major is unknown (a WAL page magic this version does not know): it cannot be "
                      "told from another deployment")
    if not majors:
        return None, ("the major of the recorded system is unknown (recorded by an earlier version): run "
                      "`backup-tasks upgrade --begin` against the old server before upgrading it")
    newest = max(majors)
    if major <= newest:
        return None, (f"it is PostgreSQL {major}, not newer than the recorded PostgreSQL {newest}: another "
                      f"deployment, not an upgrade of this one")
    if open_upgrade is not None:
        return "upgrade", f"an upgrade from PostgreSQL {newest} is open (begun {open_upgrade.began_at})"
    if upgraded:
        return "automatic", f"PostgreSQL {major} after {newest}: an upgrade of this server (pg_upgrade)"
    return None, (f"it is PostgreSQL {major} after {newest}, but nothing shows it is an upgrade of this server: run "
                  f"`backup-tasks upgrade --begin` against the old server first, or back up every database the "
                  f"catalog holds")


def open_generation(storage: Storage, system: str, major: int, *, reason: str, previous: str | None,
                    opened_by: str, first_segment: str | None = None) -> None:
    """Record the generation of ``system`` in ``storage`` (create-only: a record already there stands)."""
    put_record(storage, generation_key(system), {
        "system_identifier": system, "major": major, "opened_at": _now(), "opened_by": opened_by, "reason": reason,
        "previous": previous, "first_segment": first_segment})


def claim(storage: Storage, system: str, *, incoming: str, what: str, remedy: str, record: bool = True,
          major: int | None = None, upgraded: bool = False, first_segment: str | None = None) -> None:
    """``storage`` records ``system`` (create-only, on first use) or holds it as a generation, or ``SystemMismatch``.

    ``incoming``: what is being written, ``what``: the location, for the message; ``remedy``: what to do.
    ``record=False``: only refuse another system (a check before a long backup), record no first system.
    ``major``: the PostgreSQL major of ``system``; with it, a system the location does not hold opens a
    new generation when ``admission`` allows (``upgraded``: the caller found it to be an upgrade of this
    server), recorded at once whatever ``record`` says: that it is an upgrade is a fact about the server,
    learnt now, whether or not the backup that found it completes. ``first_segment``: the segment that
    opens it (``wal-push``).
    """
    first = first_generation(storage)
    if first is None and not record:
        return
    if first is None:
        document: dict[str, object] = {"system_identifier": system, "recorded_at": _now(), "recorded_by": incoming}
        if major is not None:
            document["major"] = major
        if put_record(storage, IDENTITY_KEY, document):
            return
        first = first_generation(storage)  # another writer recorded one meanwhile: its answer counts
        assert first is not None
    if first.system == system or later_generation(storage, system) is not None:
        return
    generations, upgrades, _released = read_records(storage)
    reason, why = admission(generations, upgrades, system, major, upgraded=upgraded)
    if reason is None:
        newest = generations[-1] if generations else first
        raise SystemMismatch(f"{incoming} is of PostgreSQL system {system}, but {what} belongs to system "
                             f"{newest.system} (recorded in {where(storage, newest.key)}), and {why}; nothing is kept. "
                             f"{remedy}")
    assert major is not None
    open_generation(storage, system, major, reason=reason, previous=generations[-1].system, opened_by=incoming,
                    first_segment=first_segment)
    if reason == "automatic":
        log.warning("backup-tasks: %s opens a new generation in %s: PostgreSQL %d, system %s, after system %s (%s). "
                    "Take a snapshot of the new server (`backup-tasks snapshot`); the old generation's backups stay "
                    "restorable.", incoming, storage.location, major, system, generations[-1].system, why)


def where(storage: Storage, key: str = IDENTITY_KEY) -> str:
    """The identity object of ``storage`` (or another record, ``key``), for messages."""
    return f"{storage.location.rstrip('/')}/{key}"


def check_push(storage: Storage, source: Path) -> None:
    """Before ``wal-push`` stores ``source`` in the archive ``storage``: the archive records the segment's system
    (the first segment claims it), or ``SystemMismatch``. Files carrying no identifier pass.

    An identity object that cannot be read or written (a damaged one, a full or read-only archive) is
    logged (the server log) and the push goes on: the archive's own write then fails or succeeds as it
    would, so this check never becomes the reason the server's WAL piles up.
    """
    identity = segment_identity(source)
    if identity is None:
        return
    try:
        # WAL of a higher major than the archive's newest generation is a pg_upgrade'd server's (``upgraded``):
        # refusing it would stop its archiving; it opens a generation, with a warning in the server log.
        claim(storage, identity.system, incoming=f"WAL segment {source.name}", major=identity.major, upgraded=True,
              first_segment=source.name, what=f"the WAL archive {storage.location}",
              remedy=f"Archive this server's WAL into an archive of its own (another WAL_ARCHIVE_DIR, the "
                     f"--archive-dir of archive_command); remove {where(storage)} only if the system it records is "
                     f"gone for good.")
    except StorageError as exc:
        log.warning("backup-tasks wal-push: could not check which system the WAL archive %s belongs to: %s",
                    storage.location, exc)
