"""Incremental snapshots (PostgreSQL 17+): parents, chains, and a chain combined into one data directory.

An incremental snapshot is a snapshot like any other (kind ``snapshot``, its own base and WAL tars,
its own WAL range and restorable range), taken with ``pg_basebackup --incremental`` against the
``backup_manifest`` of its parent. It is restorable only together with its *chain*: the full snapshot
at its root and every incremental between. The chain is recorded in the snapshot's manifest
(``Manifest.parent``, ``Manifest.chain``; retention, below this package, reads them too).

Restoring a chain: the root full is unpacked into the target as a full would be, each incremental into a
scratch directory beside it (every stored byte checked against the catalog), all at once; ``pg_combinebackup
--dry-run`` checks the chain links up, and ``physical.combine`` writes the changed blocks into the root's files in
place: a chain restores in the time of its full plus its incrementals' blocks, not a second copy of the cluster. A
missing or damaged member is a broken link, named (``BackupCorrupt``: "the chain of X is broken at Y").

Choosing a parent (``choose_parent``, pure): the newest complete snapshot of the same system, timeline
and major whose chain is whole and none of whose members failed its latest verification. No parent,
``summarize_wal`` off or a server before 17 is no failure: the snapshot is taken full and says why.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backup_tasks.catalog import manifest as catalog
from backup_tasks.catalog.manifest import Manifest
from backup_tasks.errors import BackupCorrupt, BackupError, BackupNotFound, ObjectMissing, StorageError
from backup_tasks.physical.combine import Combined, combine_in_place, dry_run, sparse_skeleton
from backup_tasks.postgres.failures import first_line
from backup_tasks.postgres.tools import find_tool, major_of
from backup_tasks.settings import Settings
from backup_tasks.storage.base import Storage
from backup_tasks.streams.crypto import Identities

log = logging.getLogger(__name__)

#: The first major with WAL summaries, ``pg_basebackup --incremental`` and ``pg_combinebackup``.
FIRST_MAJOR = 17

#: A chain is not grown past this many members: every restore unpacks them all, and a damaged member
#: loses every later one. The weekly full starts a new chain long before (6 dailies a week).
MAX_CHAIN = 31


@dataclass(frozen=True)
class ChainFacts:
    """What an incremental snapshot's manifest says about its chain."""

    parent: str
    chain: tuple[str, ...]  # root (a full) .. this snapshot


def incremental_of(manifest: Manifest) -> ChainFacts | None:
    """The chain facts of an incremental snapshot; None for a full (or a dump). The one accessor."""
    if manifest.kind != "snapshot" or not manifest.parent or not manifest.chain:
        return None
    return ChainFacts(manifest.parent, tuple(manifest.chain))


def chain_ids(manifest: Manifest) -> list[str]:
    """The ids a restore from ``manifest`` needs, root first (``[manifest.id]`` for a full)."""
    return manifest.chain_ids


def chain_label(manifest: Manifest) -> str:
    """``full`` or ``incremental`` (the metrics' and list's label)."""
    return "incremental" if incremental_of(manifest) else "full"


def chain_problem(manifest: Manifest, known: Mapping[str, Manifest]) -> str | None:
    """Why a restore cannot start from ``manifest`` as the catalog ``known`` (id -> manifest) stands; None if it can.

    Pure. A member missing from the catalog, not complete, or whose latest verification failed breaks the
    chain for every later member (planning then falls back to the newest intact chain).
    """
    for member_id in chain_ids(manifest)[:-1]:
        member = known.get(member_id)
        if member is None:
            return f"its chain is broken: ancestor {member_id} is not in the catalog"
        if member.state != "complete":
            return f"its chain is broken: ancestor {member_id} is {member.state}"
        if member.verification is not None and not member.verification.ok:
            return f"its chain is broken: ancestor {member_id} failed its latest verification"
    return None


def resolve_chain(storage: Storage, manifest: Manifest) -> list[Manifest]:
    """The manifests of ``manifest``'s chain, root first (``[manifest]`` for a full); a missing one is named."""
    members: list[Manifest] = []
    ids = chain_ids(manifest)
    for member_id in ids[:-1]:
        try:
            member = catalog.load(storage, member_id)
        except BackupNotFound:
            raise BackupCorrupt(broken(manifest.id, member_id, f"its manifest is missing from {storage.location}")) \
                from None
        if member.kind != "snapshot" or chain_ids(member) != ids[: len(members) + 1]:
            raise BackupCorrupt(broken(manifest.id, member_id, "that backup is not the snapshot the chain names"))
        members.append(member)
    return [*members, manifest]


def broken(owner_id: str, member_id: str, why: str) -> str:
    return (f"the chain of snapshot {owner_id} is broken at its ancestor {member_id}: {why}; restore from "
            f"another chain (a full snapshot, `backup-tasks snapshot`, starts a new one)")


# --- choosing a parent ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ParentChoice:
    """The parent of the next incremental snapshot, or why there is none (the snapshot is then full)."""

    parent: Manifest | None
    chain: tuple[str, ...] = ()  # the parent's chain: the new snapshot's is this plus itself
    reason: str = ""


def not_possible(major: int, summarize_wal: str | None) -> str | None:
    """Why this server cannot take incremental backups at all; None when it can."""
    if major < FIRST_MAJOR:
        return f"PostgreSQL {major} has no incremental backups (PostgreSQL {FIRST_MAJOR} and later)"
    if (summarize_wal or "off") != "on":
        return "summarize_wal is off on the server: set summarize_wal = on in postgresql.conf and reload it"
    return None


def choose_parent(snapshots: Iterable[Manifest], *, system_identifier: str, timeline: int, major: int,
                  database: str) -> ParentChoice:
    """Pure: the newest complete snapshot the next incremental can build on (module docstring), or why none."""
    every = list(snapshots)
    known = {m.id: m for m in every}
    same = [m for m in every if m.kind == "snapshot" and m.state == "complete" and m.database == database
            and m.system_identifier == system_identifier and major_of(m.server_version) == major]
    if not same:
        return ParentChoice(None, reason=f"no complete snapshot of this PostgreSQL {major} system to build on yet")
    newest = max(same, key=lambda m: (m.started_at, m.id))
    if newest.timeline != timeline:
        return ParentChoice(None, reason=f"the server is on timeline {timeline}, the newest snapshot {newest.id} on "
                                         f"timeline {newest.timeline}: a new chain starts after a timeline change")
    if newest.verification is not None and not newest.verification.ok:
        return ParentChoice(None, reason=f"the newest snapshot {newest.id} failed its latest verification")
    problem = chain_problem(newest, known)
    if problem is not None:
        return ParentChoice(None, reason=f"the newest snapshot {newest.id}: {problem}")
    chain = tuple(chain_ids(newest))
    if len(chain) >= MAX_CHAIN:
        return ParentChoice(None, reason=f"the chain of {newest.id} has {len(chain)} members already "
                                         f"(at most {MAX_CHAIN}): a new chain starts")
    return ParentChoice(newest, chain)


def parent_manifest_key(parent: Manifest) -> str | None:
    """The key of the parent's stored ``backup_manifest`` (role ``backup_manifest`` in ``files``)."""
    return next((k for k, v in (parent.files or {}).items() if v.get("role") == "backup_manifest"), None)


# --- combining ---------------------------------------------------------------------------------------------

def unpack_members(storage: Storage, owner_id: str, members: list[Manifest], scratch: Path,
                   identities: Mapping[str, Identities | None], *, fallback: bool = True,
                   parallel: bool = False, cancelled: threading.Event | None = None,
                   root_dir: Path | None = None, every_wal: bool = True) -> list[Path]:
    """Unpack each of ``members`` (checking every stored byte) into ``scratch/<id>`` (the first into ``root_dir``
    when given), with its backup_manifest; the directories, in chain order.

    A member missing or damaged in storage is a broken link of the chain of ``owner_id`` (``BackupCorrupt``
    naming the oldest such); a failure of this machine (a full disk) is raised as it is. ``fallback``: from
    BACKUP_COPY_TO when BACKUP_DIR's object is damaged (restores). ``parallel``: all at once (each incremental
    costs two tar processes and a WAL tar: measured on 1 GB, a full and six incrementals took 7.6 s one at a time,
    3.9-5.5 s at once). ``cancelled``: checked between members (a snapshot that gave up). ``every_wal=False``: the WAL
    tar of the newest member only (a combined chain has that member's WAL; pg_verifybackup of a member needs its own).
    """
    def one(member: Manifest) -> Path:
        if cancelled is not None and cancelled.is_set():
            raise ChainUnusable("cancelled")
        directory = root_dir if root_dir is not None and member is members[0] else scratch / member.id
        unpack_member(storage, owner_id, member, directory, identities.get(member.id), fallback=fallback,
                      wal=every_wal or member is members[-1])
        return directory

    if not parallel or len(members) < 2:
        return [one(member) for member in members]
    # Threads: decompression and hashing release the GIL, and tar runs as its own process.
    with ThreadPoolExecutor(max_workers=min(len(members), PARALLEL_UNPACKS)) as pool:
        futures = [pool.submit(one, member) for member in members]
        return [future.result() for future in futures]  # in chain order: the oldest broken link is named


#: Members unpacked at once by a restore: the full and two incrementals keep two cores busy.
PARALLEL_UNPACKS = 3


def unpack_member(storage: Storage, owner_id: str, member: Manifest, directory: Path,
                  identities: Identities | None, *, fallback: bool = True, wal: bool = True) -> None:
    """One member of the chain of ``owner_id`` into ``directory``, its backup_manifest beside its files."""
    from backup_tasks.physical.unpack import read_snapshot_object, unpack_snapshot, unpack_with_fallback

    unpack = unpack_with_fallback if fallback else unpack_snapshot
    key = parent_manifest_key(member)
    try:
        if key is None:
            raise BackupCorrupt("it stored no backup_manifest")
        unpack(storage, member, directory, identities, wal=wal)
        (directory / "backup_manifest").write_bytes(read_snapshot_object(storage, member, key, identities))
    except (BackupCorrupt, ObjectMissing) as exc:
        if member.id == owner_id:
            raise
        raise BackupCorrupt(broken(owner_id, member.id, first_line(str(exc)))) from None


def describe_chain(manifest: Manifest) -> str:
    return f"the chain of snapshot {manifest.id} ({' -> '.join(chain_ids(manifest))})"


def unpack_chain(storage: Storage, chain: list[Manifest], data_dir: Path, scratch: Path,
                 identities: Mapping[str, Identities | None], *, fallback: bool = True,
                 every_wal: bool = False) -> list[Path]:
    """The chain (root first) unpacked, all at once: the root full into ``data_dir`` (where its files stay), each
    incremental into ``scratch/<id>``; every member's backup_manifest beside its files (``unpack_members``). The
    directories, root first."""
    return unpack_members(storage, chain[-1].id, chain, scratch, identities, fallback=fallback, parallel=True,
                          root_dir=data_dir, every_wal=every_wal)


def combine_unpacked(settings: Settings, chain: list[Manifest], directories: list[Path], scratch: Path) -> Combined:
    """The unpacked chain (``unpack_chain``) combined into its root's directory: checked by ``pg_combinebackup
    --dry-run`` first, then written in place (``physical.combine``). A chain the tool rejects: ``BackupCorrupt``."""
    owner = chain[-1]
    major = major_of(owner.server_version)
    tool = find_tool("pg_combinebackup", exact_major=major, bin_dir=settings.pg_bin_dir,
                     why=f"to check {describe_chain(owner)} (PostgreSQL {major})")
    problem = dry_run(tool.path, directories, scratch)
    if problem is not None:
        raise BackupCorrupt(f"pg_combinebackup cannot combine {describe_chain(owner)}: {problem}")
    return combine_in_place(directories[0], directories[1:])


def restore_chain(settings: Settings, storage: Storage, chain: list[Manifest], data_dir: Path,
                  identities: Mapping[str, Identities | None], *, scratch: Path) -> Combined:
    """The chain (root first) restored into ``data_dir``; ``scratch`` (the caller deletes it) holds the incrementals."""
    return combine_unpacked(settings, chain, unpack_chain(storage, chain, data_dir, scratch, identities), scratch)


def scratch_beside(data_dir: Path) -> Path:
    """Where a chain restored into ``data_dir`` is unpacked: beside it, so that its newest member's whole files
    move into the data directory with a rename."""
    from backup_tasks.postgres.leftovers import owned_tempdir

    try:
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        return owned_tempdir(f".{data_dir.name}.backup-tasks-chain-", data_dir.parent)
    except OSError as exc:
        from backup_tasks.physical.unpack import local_os_error

        raise local_os_error(exc, doing=f"making a scratch directory beside {data_dir}") from exc


# --- a new incremental: its base, and the check of the chain it makes ---------------------------------------

class ChainUnusable(Exception):
    """The incremental cannot be taken or checked on this chain: the snapshot is taken full instead (the reason)."""


@dataclass
class IncrementalBase:
    """What ``pg_basebackup --incremental`` builds on: the parent, its chain, its backup_manifest in staging."""

    parent: Manifest
    chain: list[Manifest]  # the parent's chain, root first
    manifest_path: Path
    identities: dict[str, Identities | None]

    def chain_of(self, backup_id: str) -> ChainFacts:
        return ChainFacts(self.parent.id, (*(m.id for m in self.chain), backup_id))


def prepare_base(settings: Settings, storage: Storage, *, system_identifier: str, timeline: int, major: int,
                 summarize_wal: str | None, database: str, staging: Path) -> tuple[IncrementalBase | None, str]:
    """The base for an incremental of this server, or None and why a full is taken instead."""
    from backup_tasks.catalog.keys import identities_for
    from backup_tasks.errors import CryptoError
    from backup_tasks.physical.unpack import read_snapshot_object

    why = not_possible(major, summarize_wal)
    if why is not None:
        return None, why
    choice = choose_parent(catalog.catalog(storage, kind="snapshot"), system_identifier=system_identifier,
                           timeline=timeline, major=major, database=database)
    if choice.parent is None:
        return None, choice.reason
    parent = choice.parent
    try:
        chain = resolve_chain(storage, parent)
        identities = {m.id: identities_for(settings, m) for m in chain}
        key = parent_manifest_key(parent)
        if key is None:
            return None, f"the newest snapshot {parent.id} stored no backup_manifest to build on"
        path = staging / "parent.backup_manifest"
        path.write_bytes(read_snapshot_object(storage, parent, key, identities[parent.id]))
    except CryptoError as exc:
        return None, f"the chain of {parent.id} cannot be decrypted here ({first_line(str(exc))})"
    except (BackupCorrupt, StorageError) as exc:
        return None, f"the chain of {parent.id} cannot be read: {first_line(str(exc))}"
    return IncrementalBase(parent, chain, path, identities), ""


#: What pg_basebackup (or the server) says when it cannot take this incremental: no or incomplete WAL
#: summaries ("WAL summaries are required on timeline ..."), summarization off, a manifest of another system
#: or timeline. Anything else (unreachable, authentication) fails a full the same way and is raised.
INCREMENTAL_REFUSAL = re.compile(r"^.*(summar|incremental|manifest|timeline).*$", re.IGNORECASE | re.MULTILINE)


def refused_incremental(stderr: str) -> str | None:
    """The line of pg_basebackup's stderr refusing the incremental, if any."""
    lines = [m[0].strip() for m in INCREMENTAL_REFUSAL.finditer(stderr) if "error" in m[0].lower()]
    return lines[0] if lines else None


def verifybackup_problem(pg_verifybackup: Path, directory: Path) -> str | None:
    """pg_verifybackup of a directory holding its own backup_manifest: None, or its first complaints."""
    result = subprocess.run([str(pg_verifybackup), str(directory)], capture_output=True, text=True, check=False)
    if result.returncode == 0:
        return None
    return "; ".join([ln for ln in (result.stderr or result.stdout).splitlines() if ln.strip()][:5])


class Ancestors:
    """The parent's chain, ready to be checked with a new incremental: prepared in a thread while pg_basebackup
    runs (the server does that work; this process mostly waits for it).

    From the chain cache when it holds this chain (one directory, the combined chain's skeleton, taken out of the
    cache: it is the next entry once the new incremental is applied to it); else every member unpacked from storage,
    each stored byte checked against the catalog.
    """

    def __init__(self, storage: Storage, base: IncrementalBase, backup_id: str, scratch: Path,
                 cache: ChainCache | None) -> None:
        self.storage, self.base, self.backup_id, self.scratch, self.cache = storage, base, backup_id, scratch, cache
        self.key = manifests_key(base.chain)
        self.from_cache = False
        self.cancelled = threading.Event()
        self._directories: list[Path] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"chain of {backup_id}", daemon=True)

    def start(self) -> Ancestors:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self._directories = self._prepare()
        except BaseException as exc:  # handed to result(), in the snapshot's own thread
            self._error = exc

    def _prepare(self) -> list[Path]:
        self.scratch.mkdir(parents=True, exist_ok=True)
        taken = self.cache.take(self.key, self.scratch / "cached") if self.cache is not None else None
        if taken is not None:
            self.from_cache = True
            return [taken]
        return self.unpack()

    def unpack(self) -> list[Path]:
        """Every member from storage (also after the cached skeleton failed the check: it is gone)."""
        self.from_cache = False
        shutil.rmtree(self.scratch / "cached", ignore_errors=True)
        try:
            return unpack_members(self.storage, self.backup_id, self.base.chain, self.scratch, self.base.identities,
                                  cancelled=self.cancelled, every_wal=False)
        except BackupCorrupt as exc:
            raise ChainUnusable(first_line(str(exc))) from None

    def result(self) -> list[Path]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._directories

    def close(self) -> None:
        """Stop after the member being unpacked (a snapshot that gave up), and wait for it."""
        self.cancelled.set()
        self._thread.join()


def check_incremental(settings: Settings, base: IncrementalBase, backup_id: str, major: int, ancestors: Ancestors,
                      unpacked: Path, scratch: Path) -> Path:
    """Check that the parent's chain (``ancestors``) and the new incremental (unpacked in ``unpacked``, already
    checked by pg_verifybackup against its own manifest) combine: ``pg_combinebackup --dry-run``, which reads every
    incremental file's header and needs each incremental file of an older member present and long enough (a whole
    file cut short is not caught: pg_combinebackup would fill its blocks with zeros). Then the
    new incremental is applied to the chain's skeleton (lengths, no data), the chain cache's next entry (returned).

    A broken ancestor: ``ChainUnusable`` (a full is taken instead); a rejected chain: ``SnapshotFailed``, after a
    second try from storage when the first used the cached skeleton.
    """
    from backup_tasks.errors import SnapshotFailed

    tool = find_tool("pg_combinebackup", exact_major=major, bin_dir=settings.pg_bin_dir,
                     why=f"to check the chain of the new snapshot {backup_id} (PostgreSQL {major})")
    what = f"the chain of the new snapshot {backup_id} ({' -> '.join(base.chain_of(backup_id).chain)})"
    directories = ancestors.result()
    problem = dry_run(tool.path, [*directories, unpacked], scratch)
    if problem is not None and ancestors.from_cache:
        log.warning("pg_combinebackup rejected %s with the cached chain (%s): checking the chain from storage instead",
                    what, problem)
        directories = ancestors.unpack()
        problem = dry_run(tool.path, [*directories, unpacked], scratch)
    if problem is not None:
        raise SnapshotFailed(f"pg_combinebackup rejected {what}: {problem}")
    combine_in_place(directories[0], [*directories[1:], unpacked], data=False)
    sparse_skeleton(directories[0])
    return directories[0]


# --- the chain cache: the newest chain's skeleton, kept for the next incremental's check ---------------------

CACHE_DIR = "backup-tasks-chain-cache"
#: An entry no snapshot used for this long is removed (weekly fulls and daily incrementals use theirs daily).
CACHE_UNUSED_SECONDS = 8 * 86400


def chain_key(members: Iterable[tuple[str, Mapping[str, Mapping[str, Any]]]]) -> str:
    """What a combined chain is made of: each member's id and the size and sha256 of each of its stored objects."""
    text = json.dumps([[backup_id, sorted([key, info.get("size"), info.get("sha256")] for key, info in files.items())]
                       for backup_id, files in members])
    return hashlib.sha256(text.encode()).hexdigest()


def manifests_key(chain: Iterable[Manifest]) -> str:
    return chain_key((m.id, m.files or {}) for m in chain)


@dataclass(frozen=True)
class ChainCache:
    """The newest chain of one database and system as the next incremental's check needs it, kept beside the
    staging area between snapshots: then the check reads two directories (this one and the new incremental) instead
    of unpacking the whole chain (on 1 GB, the full alone takes 3-4 s).

    An entry is the combined chain's *skeleton* (``combine.sparse_skeleton``): its backup_label and pg_control,
    and each relation file at its combined length with no data in it. That is all ``pg_combinebackup --dry-run``
    reads of an older member, and it keeps neither the database's contents (encrypted backups use it too) nor its
    size on disk. An entry is named by its chain's key (``chain_key``): it serves only the chain whose stored objects
    it was made from; it is published with one rename, and taken out of the cache (another rename) while a snapshot
    applies its incremental to it, so an entry that exists is whole.
    """

    root: Path
    owner: str  # a digest of (database, system identifier): one entry per database and system

    @classmethod
    def beside(cls, staging: Path, *, database: str, system_identifier: str) -> ChainCache:
        owner = hashlib.sha256(f"{database}\0{system_identifier}".encode()).hexdigest()[:16]
        return cls(staging.parent / CACHE_DIR, owner)

    def entry(self, key: str) -> Path:
        return self.root / f"{self.owner}.{key[:32]}"

    def lookup(self, key: str) -> Path | None:
        entry = self.entry(key)
        return entry if (entry / "backup_label").is_file() and (entry / "global" / "pg_control").is_file() else None

    def take(self, key: str, destination: Path) -> Path | None:
        """The entry of ``key`` moved to ``destination`` (on this filesystem), out of the cache; None if none."""
        entry = self.lookup(key)
        if entry is None:
            return None
        try:
            entry.rename(destination)
            os.utime(destination)
        except OSError as exc:
            log.warning("the cached chain %s cannot be used (%s): unpacking the chain from storage", entry, exc)
            return None
        return destination

    def put(self, key: str, directory: Path) -> bool:
        """Keep ``directory`` (a skeleton, on this filesystem) as the entry of ``key``: one rename. False if not."""
        try:
            self.root.mkdir(mode=0o700, exist_ok=True)
            self.drop(key)
            directory.rename(self.entry(key))
            os.utime(self.entry(key))  # its last use, for keep_only
            return True
        except OSError as exc:
            log.warning("the chain cache is not kept in %s (%s): the next incremental unpacks its chain", self.root,
                        exc)
            return False

    def keep_only(self, key: str | None) -> None:
        """Remove this owner's other entries (chains nothing builds on any more), any owner's entries unused for
        ``CACHE_UNUSED_SECONDS`` (a database gone, a server replaced) and abandoned removals."""
        try:
            entries = [(p, p.lstat().st_mtime) for p in self.root.iterdir()]
        except OSError:
            return
        keep = self.entry(key).name if key else None
        for path, used in entries:
            if path.name.startswith(".dropped-"):
                remove_later(path)
            elif path.name != keep and (path.name.startswith(f"{self.owner}.") or
                                        time.time() - used > CACHE_UNUSED_SECONDS):
                self._set_aside(path)

    def drop(self, key: str) -> None:
        self._set_aside(self.entry(key))

    def _set_aside(self, entry: Path) -> None:
        aside = self.root / f".dropped-{uuid.uuid4().hex}"
        try:
            entry.rename(aside)  # out of use at once; deleted in the background
        except OSError:
            return
        remove_later(aside)


def remove_later(directory: Path) -> None:
    """Delete a tree in the background: a gigabyte of unlinks need not delay the result."""
    try:
        subprocess.Popen(["rm", "-rf", "--", str(directory)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    except OSError:
        shutil.rmtree(directory, ignore_errors=True)


# --- readiness (check, the daily workflow) -----------------------------------------------------------------

@dataclass(frozen=True)
class Readiness:
    """Whether the next ``snapshot --incremental`` would be incremental, for ``check`` and the daily workflow."""

    major: int
    summarize_wal: str
    possible: bool  # the server can take incremental backups
    parent: str | None  # the snapshot it would build on (None: a full would be taken)
    reason: str  # why not (empty when ``parent``)

    def describe(self) -> str:
        line = f"summarize_wal = {self.summarize_wal} (PostgreSQL {self.major}): "
        if self.parent:
            return line + f"incremental snapshots possible; the next builds on {self.parent}"
        if self.possible:
            return line + f"incremental snapshots possible, but the next one is full: {self.reason}"
        return line + f"incremental snapshots NOT possible: {self.reason}"


def readiness(settings: Settings) -> Readiness:
    """Ask the server and read the catalog (``BackupError`` when the server cannot be reached)."""
    from backup_tasks.postgres.connect import connect, server_major
    from backup_tasks.postgres.queries import system_identifier

    conninfo = settings.source()
    with connect(conninfo) as conn:
        major = server_major(conn)
        row = conn.execute("SELECT current_setting('summarize_wal', true)").fetchone()
        summarize = str(row[0]) if row and row[0] is not None else "unsupported"
        timeline = int(conn.execute("SELECT timeline_id FROM pg_control_checkpoint()").fetchone()[0])
        sysid = str(system_identifier(conn))
    why = not_possible(major, summarize if summarize != "unsupported" else None)
    if why is not None:
        return Readiness(major, summarize, False, None, why)
    try:
        snapshots = catalog.catalog(settings.locations(), kind="snapshot")
    except BackupError as exc:
        return Readiness(major, summarize, True, None, f"the catalog cannot be read: {exc}")
    choice = choose_parent(snapshots, system_identifier=sysid, timeline=timeline, major=major,
                           database=conninfo.dbname)
    return Readiness(major, summarize, True, choice.parent.id if choice.parent else None, choice.reason)
