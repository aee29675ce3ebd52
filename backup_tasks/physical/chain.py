"""Incremental snapshots (PostgreSQL 17+): parents, chains, and a chain combined into one data directory.

An incremental snapshot is a snapshot like any other (kind ``snapshot``, its own base and WAL tars,
its own WAL range and restorable range), taken with ``pg_basebackup --incremental`` against the
``backup_manifest`` of its parent. It is restorable only together with its *chain*: the full snapshot
at its root and every incremental between. The chain is recorded in the snapshot's manifest
(``Manifest.parent``, ``Manifest.chain``; retention, below this package, reads them too).

Restoring a chain: each member is unpacked (every stored byte checked against the catalog, as for a
full) into a scratch directory on the target's filesystem, its ``backup_manifest`` beside its files,
and ``pg_combinebackup --link`` writes the synthetic full into the target: unchanged files are hard
links to the unpacked full's (no second copy of the cluster), so a chain restores in about the time
of its full plus the changed blocks. A missing or damaged member is a broken link, named
(``BackupCorrupt``: "the chain of X is broken at Y").

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
                   parallel: bool = False, cancelled: threading.Event | None = None) -> list[Path]:
    """Unpack each of ``members`` (checking every stored byte) into ``scratch/<id>``, with its backup_manifest.

    A member missing or damaged in storage is a broken link of the chain of ``owner_id`` (``BackupCorrupt``
    naming the oldest such); a failure of this machine (a full disk) is raised as it is. ``fallback``: from
    BACKUP_COPY_TO when BACKUP_DIR's object is damaged (restores). ``parallel``: all at once (each incremental
    costs two tar processes and a WAL tar: measured on 1 GB, a full and six incrementals took 7.6 s one at a time,
    3.9-5.5 s at once). ``cancelled``: checked between members (a snapshot that gave up).
    """
    def one(member: Manifest) -> Path:
        if cancelled is not None and cancelled.is_set():
            raise ChainUnusable("cancelled")
        directory = scratch / member.id
        unpack_member(storage, owner_id, member, directory, identities.get(member.id), fallback=fallback)
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
                  identities: Identities | None, *, fallback: bool = True) -> None:
    """One member of the chain of ``owner_id`` into ``directory``, its backup_manifest beside its files."""
    from backup_tasks.physical.unpack import read_snapshot_object, unpack_snapshot, unpack_with_fallback

    unpack = unpack_with_fallback if fallback else unpack_snapshot
    key = parent_manifest_key(member)
    try:
        if key is None:
            raise BackupCorrupt("it stored no backup_manifest")
        unpack(storage, member, directory, identities)
        (directory / "backup_manifest").write_bytes(read_snapshot_object(storage, member, key, identities))
    except (BackupCorrupt, ObjectMissing) as exc:
        if member.id == owner_id:
            raise
        raise BackupCorrupt(broken(owner_id, member.id, first_line(str(exc)))) from None


def combine(settings: Settings, major: int, what: str, directories: list[Path], output: Path, *,
            manifest: bool = True) -> None:
    """``pg_combinebackup --link`` of ``directories`` (root first) into ``output`` (absent or empty).

    Hard links, not copies: a chain costs no second copy of its full. ``output`` must be on the filesystem
    of ``directories`` (callers arrange it), and must not be written while they are read. ``manifest``: write
    the synthetic full's backup_manifest (a CRC32C of every reconstructed block); a restore, which has no use
    for it, saves that work.
    """
    tool = find_tool("pg_combinebackup", exact_major=major, bin_dir=settings.pg_bin_dir,
                     why=f"to combine {what} (PostgreSQL {major})")
    if output.exists() and not any(output.iterdir()):
        output.rmdir()  # pg_combinebackup creates it (0700) itself
    argv = [str(tool.path), "--link", "--no-sync", *([] if manifest else ["--no-manifest"]), "-o", str(output),
            *map(str, directories)]
    result = subprocess.run(argv, capture_output=True, text=True, check=False, cwd="/")
    if result.returncode == 0:
        return
    problems = [ln for ln in result.stderr.splitlines() if ln.strip() and "--link mode was used" not in ln]
    text = "; ".join(problems[:5]) or f"exit status {result.returncode}"
    shutil.rmtree(output, ignore_errors=True)
    if any(marker in text for marker in ("No space left", "Disk quota")):
        from backup_tasks.physical.unpack import local_error

        raise local_error(text, full=True, doing=f"combining {what} into {output}",
                          intact="the backup is not at fault")
    if "Permission denied" in text or "Invalid cross-device link" in text:
        raise StorageError(f"combining {what} into {output} failed on this machine ({text}); check that directory "
                           f"and run again")
    raise BackupCorrupt(f"pg_combinebackup could not combine {what}: {text}")


def describe_chain(manifest: Manifest) -> str:
    return f"the chain of snapshot {manifest.id} ({' -> '.join(chain_ids(manifest))})"


def restore_chain(settings: Settings, storage: Storage, chain: list[Manifest], data_dir: Path,
                  identities: Mapping[str, Identities | None], *, scratch: Path) -> None:
    """The chain (root first) combined into ``data_dir``; ``scratch`` (same filesystem) holds the unpacked members.

    The caller owns ``scratch`` and deletes it after (``data_dir``'s files are links: they survive it).
    """
    owner = chain[-1]
    directories = unpack_members(storage, owner.id, chain, scratch, identities, parallel=True)
    # No synthetic manifest: a restored data directory has no use for it (every stored byte was checked above).
    combine(settings, major_of(owner.server_version), describe_chain(owner), directories, data_dir, manifest=False)
    (data_dir / "backup_manifest").unlink(missing_ok=True)


def scratch_beside(data_dir: Path) -> Path:
    """Where a chain restored into ``data_dir`` is unpacked: beside it, so that ``--link`` can link."""
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
    """The parent's chain, ready to be combined with a new incremental: prepared in a thread while pg_basebackup
    runs (the server does that work; this process mostly waits for it).

    From the chain cache when it holds this chain (one directory, the synthetic full, checked by pg_verifybackup
    again before use); else every member unpacked from storage, each stored byte checked against the catalog.
    """

    def __init__(self, settings: Settings, storage: Storage, base: IncrementalBase, backup_id: str, scratch: Path,
                 cache: ChainCache | None, pg_verifybackup: Path) -> None:
        self.settings, self.storage, self.base, self.backup_id = settings, storage, base, backup_id
        self.scratch, self.cache, self.pg_verifybackup = scratch, cache, pg_verifybackup
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
        cached = self.cache.lookup(self.key) if self.cache is not None else None
        if cached is not None:
            os.utime(cached)  # in use (keep_only removes entries unused for a week)
            problem = verifybackup_problem(self.pg_verifybackup, cached)
            if problem is None:
                self.from_cache = True
                return [cached]
            log.warning("the cached chain %s fails pg_verifybackup (%s): unpacking the chain from storage", cached,
                        problem)
        return self.unpack()

    def unpack(self) -> list[Path]:
        """Every member from storage (also after the cached copy failed a check: it is dropped)."""
        if self.cache is not None:
            self.cache.drop(self.key)
        self.from_cache = False
        self.scratch.mkdir(parents=True, exist_ok=True)
        try:
            return unpack_members(self.storage, self.backup_id, self.base.chain, self.scratch, self.base.identities,
                                  cancelled=self.cancelled)
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
                      unpacked: Path, manifest_path: Path, scratch: Path, pg_verifybackup: Path) -> Path:
    """Combine the parent's chain (``ancestors``) and the new incremental (unpacked in ``unpacked``) into
    ``scratch/combined`` and check it with ``pg_verifybackup``; returns that directory (the chain cache's next
    entry). A broken ancestor: ``ChainUnusable`` (a full is taken instead); a rejected combination:
    ``SnapshotFailed``, after a second try from storage when the first combined the cached copy."""
    from backup_tasks.errors import SnapshotFailed

    shutil.copyfile(manifest_path, unpacked / "backup_manifest")
    combined = scratch / "combined"
    what = f"the chain of the new snapshot {backup_id} ({' -> '.join(base.chain_of(backup_id).chain)})"
    problem = _combine_and_check(settings, major, what, [*ancestors.result(), unpacked], combined, pg_verifybackup)
    if problem is not None and ancestors.from_cache:
        log.warning("%s (with the cached chain): combining the chain from storage instead", problem)
        problem = _combine_and_check(settings, major, what, [*ancestors.unpack(), unpacked], combined,
                                     pg_verifybackup)
    if problem is not None:
        raise SnapshotFailed(problem)
    return combined


def _combine_and_check(settings: Settings, major: int, what: str, directories: list[Path], combined: Path,
                       pg_verifybackup: Path) -> str | None:
    shutil.rmtree(combined, ignore_errors=True)
    try:
        combine(settings, major, what, directories, combined)
    except BackupCorrupt as exc:
        return str(exc)
    problem = verifybackup_problem(pg_verifybackup, combined)
    return None if problem is None else f"pg_verifybackup rejected {what} combined: {problem}"


# --- the chain cache: the newest chain combined, kept for the next incremental's check -----------------------

#: ``off`` keeps no chain cache: every incremental then unpacks and combines its whole chain for its check.
CHAIN_CACHE_ENV = "BACKUP_TASKS_CHAIN_CACHE"
CACHE_DIR = "backup-tasks-chain-cache"
#: An entry no snapshot used for this long is removed (weekly fulls and daily incrementals use theirs daily).
CACHE_UNUSED_SECONDS = 8 * 86400


def chain_key(members: Iterable[tuple[str, Mapping[str, Mapping[str, Any]]]]) -> str:
    """What a synthetic full is made of: each member's id and the size and sha256 of each of its stored objects."""
    text = json.dumps([[backup_id, sorted([key, info.get("size"), info.get("sha256")] for key, info in files.items())]
                       for backup_id, files in members])
    return hashlib.sha256(text.encode()).hexdigest()


def manifests_key(chain: Iterable[Manifest]) -> str:
    return chain_key((m.id, m.files or {}) for m in chain)


@dataclass(frozen=True)
class ChainCache:
    """The newest chain of one database and system, combined into one synthetic full (its backup_manifest inside),
    kept on the staging area's filesystem between snapshots: the next incremental's check then combines two
    directories (this one and the new incremental) instead of unpacking and combining the whole chain.

    An entry is named by its chain's key (``chain_key``): it serves only the chain whose stored objects it was made
    from, and only after pg_verifybackup has checked it again (``Ancestors``). It was published with one rename
    once it had passed the same check, so an entry that exists is whole. It holds the database in plaintext (0700,
    like the staging area while a snapshot runs); ``BACKUP_TASKS_CHAIN_CACHE=off`` keeps none.
    """

    root: Path
    owner: str  # a digest of (database, system identifier): one entry per database and system

    @classmethod
    def beside(cls, staging: Path, *, database: str, system_identifier: str) -> ChainCache | None:
        if os.environ.get(CHAIN_CACHE_ENV, "").strip().lower() in ("off", "0", "no", "false"):
            return None
        owner = hashlib.sha256(f"{database}\0{system_identifier}".encode()).hexdigest()[:16]
        return cls(staging.parent / CACHE_DIR, owner)

    def entry(self, key: str) -> Path:
        return self.root / f"{self.owner}.{key[:32]}"

    def lookup(self, key: str) -> Path | None:
        entry = self.entry(key)
        return entry if (entry / "backup_manifest").is_file() else None

    def put(self, key: str, directory: Path) -> bool:
        """Keep ``directory`` (checked, on this filesystem) as the entry of ``key``: one rename. False if it cannot."""
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
