"""A major upgrade (``pg_upgrade``) without losing the way back: ``backup-tasks upgrade``'s three steps.

The runbook (README) is three commands around the operator's own ``pg_upgrade``::

    backup-tasks upgrade --begin          against the OLD server (DATABASE_URL), writers stopped
    pg_ctl stop; pg_upgrade --link ...; pg_ctl start   (same archive_command)
    backup-tasks upgrade --finish         against the NEW server
    ...weeks later: backup-tasks upgrade --release-old   the old generation's last chain may be pruned

``begin`` makes the last moment before the upgrade restorable: a final snapshot of the old server
(``take_snapshot=False``: the newest one must reach the end instead), then ``pg_switch_wal()`` and a
bounded wait until that segment is archived (``pg_stat_archiver`` and the archive itself: a clean
shutdown archives nothing more of what was written before it), then checks that a snapshot of this
server and the archived WAL reach that segment unbroken. Only then is the open upgrade recorded
(``generations/upgrade-<stamp>.begin.json``, create-only, in every catalog location and the WAL
archive), with the old system, its major and the last segment: while it is open, the first WAL or
backup of a new system of a higher major opens the new generation (``wal.system.admission``).

``finish`` checks the server is a new system of a higher major than the upgrade's old one, opens its
generation in the catalog, switches WAL so the archive sees the new system at once (the archive's
generation record names its first segment, where the old generation's WAL ends: ``wal.absence``),
takes its first snapshot and records the finish. ``release_old`` records that every generation before
the newest may lose its last chain to retention (``catalog.retention``).

The records themselves (keys, fields, who reads them) are ``wal.system``'s; the merged view is
``catalog.generations``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from backup_tasks.catalog import manifest as catalog
from backup_tasks.catalog.generations import GenerationView, read_generations
from backup_tasks.catalog.system import claim_catalog
from backup_tasks.errors import ConfigError, ObjectMissing, SystemMismatch, WalArchiveError
from backup_tasks.physical import snapshot
from backup_tasks.physical.ranges import SnapshotRange, format_moment, snapshot_ranges
from backup_tasks.postgres.archiver import archiver_stats
from backup_tasks.postgres.connect import connect, server_major, server_version
from backup_tasks.postgres.queries import database_names, system_identifier
from backup_tasks.settings import Settings
from backup_tasks.storage.base import Storage, members
from backup_tasks.wal.archive import WalArchive
from backup_tasks.wal.names import position
from backup_tasks.wal.system import generation_key, put_record

#: Seconds ``begin`` and ``finish`` wait for the switched segment to be archived, by default.
ARCHIVE_WAIT = 120.0
POLL_SECONDS = 0.2


@dataclass(frozen=True)
class ServerFacts:
    """The server an upgrade step runs against."""

    label: str
    system: str
    major: int
    version: str
    databases: list[str]


@dataclass
class UpgradeStep:
    """What ``begin`` or ``finish`` did (``upgrade --json``'s document)."""

    action: str  # "begin" or "finish"
    ok: bool
    server: str
    system_identifier: str
    major: int
    server_version: str
    upgrade_id: str | None = None
    snapshot: str | None = None  # the final (begin) or first (finish) snapshot
    last_segment: str | None = None  # begin: archived, the old server's last; finish: the new one's first switched
    restorable_until: str | None = None  # begin: the way back reaches this moment
    previous_system: str | None = None  # finish: the old generation
    previous_major: int | None = None
    next_steps: list[str] = field(default_factory=list)


def server_facts(settings: Settings) -> ServerFacts:
    """The server of DATABASE_URL: a primary (a standby cannot switch WAL), its system, major and databases."""
    conninfo = settings.source()
    with connect(conninfo) as conn:
        if conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
            raise ConfigError(f"{conninfo.server_label} is a standby (in recovery): run `backup-tasks upgrade` against "
                              f"the primary")
        return ServerFacts(conninfo.server_label, system_identifier(conn), server_major(conn), server_version(conn),
                           database_names(conn))


def switch_and_wait(settings: Settings, archive: WalArchive, wait: float) -> str:
    """``pg_switch_wal()`` on the server, then wait (at most ``wait`` s) until the segment it closed is archived:
    the server's archiver says so and ``archive`` (ours) holds it. Returns the segment's name.

    ``WalArchiveError`` when it is not, naming why: the server's archiver failing, or an
    archive_command that archives somewhere else.
    """
    conninfo = settings.source()
    with connect(conninfo) as conn:
        conn.execute("SELECT txid_current()")  # a commit record: something to switch away from
        segment = str(conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0])
        deadline = time.monotonic() + wait
        while True:
            stats = archiver_stats(conn)
            done = str(stats.get("last_archived_wal") or "")[:24]
            server_done = bool(done) and done[:8] == segment[:8] and position(done) >= position(segment)
            if server_done and archive.exists(segment):
                return segment
            if time.monotonic() > deadline:
                raise WalArchiveError(f"the WAL segment {segment} was not archived within {wait:.0f} s: "
                                      f"{_why_not_archived(stats, server_done, archive, done)}. Do not stop the "
                                      f"server yet: fix archiving and run this again (--wait SECONDS waits longer)")
            time.sleep(POLL_SECONDS)


def _why_not_archived(stats: dict[str, Any], server_done: bool, archive: WalArchive, done: str) -> str:
    if server_done:
        return (f"the server says it archived it, but {archive.location} does not hold it: its archive_command "
                f"archives somewhere else (it must be `backup-tasks wal-push` into this archive)")
    if stats.get("failing"):
        return (f"archive_command fails (last failure: {stats.get('last_failed_wal')} at "
                f"{stats.get('last_failed_time')}; see the server log)")
    return f"the server archived up to {done or 'nothing'} so far"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _archive_locations(archive: WalArchive) -> list[Storage]:
    """The WAL archive and its copy (``<BACKUP_COPY_TO>/wal``: a restore from the copy alone reads records there)."""
    return [archive.primary, *([archive.copy] if archive.copy is not None else [])]


def _record_everywhere(storage: Storage, archive: WalArchive, key: str, document: dict[str, Any]) -> None:
    """A create-only record in every catalog location and in the WAL archive and its copy (all read generations)."""
    for location in [*members(storage), *_archive_locations(archive)]:
        put_record(location, key, document)


def _copy_generation(archive: WalArchive, system: str) -> None:
    """The archive's record of ``system``'s generation (written by the wal-push that opened it, with its first
    segment: where the old generation's WAL ends for ``wal-fetch``) into the copy too, create-only."""
    if archive.copy is None:
        return
    try:
        data = archive.primary.read_bytes(generation_key(system))
    except ObjectMissing:
        return  # not opened by WAL yet (archive_command elsewhere): switch_and_wait said so already
    archive.copy.put_new(generation_key(system), data)


def _way_back(storage: Storage, archive: WalArchive, system: str) -> SnapshotRange | None:
    """The range of this system's snapshot that reaches furthest into the archive (the old generation's way back)."""
    ranges = [r for r in snapshot_ranges(storage, archive, catalog.catalog(storage, kind="snapshot"))
              if r.snapshot.system_identifier == system and r.coverage.end_segment]
    return max(ranges, key=lambda r: (position(str(r.coverage.end_segment)), r.restorable_until), default=None)


def begin(settings: Settings, *, wait: float = ARCHIVE_WAIT, take_snapshot: bool = True,
          progress: Callable[[str], None] = lambda _: None) -> UpgradeStep:
    """``upgrade --begin`` against the old server (see the module docstring)."""
    facts = server_facts(settings)
    storage = settings.locations()
    archive = WalArchive.for_settings(settings, read_copy=False)
    # The catalog must be this server's (its newest generation): --begin against the new server is a mistake.
    claim_catalog(storage, facts.system, backup=f"upgrade --begin on {facts.label}", record=False)
    known = read_generations(storage, archive.primary)
    if known.newest is not None and known.newest.system != facts.system:
        raise SystemMismatch(f"{facts.label} is system {facts.system} (PostgreSQL {facts.major}), but the newest "
                             f"generation in the catalog is {known.newest.label}: run --begin against the server "
                             f"being upgraded, before upgrading it")
    final_id: str | None = None
    if take_snapshot:
        progress("taking the final snapshot of the old server")
        final_id = snapshot.take_snapshot(settings).id
    progress("switching WAL and waiting for the archive")
    segment = switch_and_wait(settings, archive, wait)
    reach = _way_back(storage, archive, facts.system)
    if reach is None or position(str(reach.coverage.end_segment)) < position(segment):
        reached = reach.describe() if reach else "no snapshot of this server"
        raise WalArchiveError(f"the way back does not reach the last segment {segment}: {reached}. Take a snapshot "
                              f"(drop --no-snapshot) or fix the archive's gap, then run --begin again; do not "
                              f"upgrade yet")
    upgrade_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    # The old system's major, for a first generation recorded before majors were (its identity object stays).
    for location in [*members(storage), *_archive_locations(archive)]:
        put_record(location, generation_key(facts.system),
                   {"system_identifier": facts.system, "major": facts.major, "opened_at": None, "reason": "first",
                    "opened_by": "upgrade --begin"})
    _record_everywhere(storage, archive, f"generations/upgrade-{upgrade_id}.begin.json", {
        "upgrade_id": upgrade_id, "old_system": facts.system, "old_major": facts.major, "old_version": facts.version,
        "began_at": _now(), "last_segment": segment, "final_snapshot": reach.snapshot.id,
        "restorable_until": reach.restorable_until.isoformat(), "databases": facts.databases})
    step = UpgradeStep("begin", True, facts.label, facts.system, facts.major, facts.version, upgrade_id,
                       final_id or reach.snapshot.id, segment, reach.restorable_until.isoformat())
    step.next_steps = [
        "keep writers stopped: anything committed from now on is not in the old generation's way back "
        f"(restorable up to {format_moment(reach.restorable_until)})",
        "stop the old server cleanly (pg_ctl stop -m fast)",
        "pg_upgrade --link to the new major, keeping the same archive_command (backup-tasks wal-push)",
        "start the new server, then: backup-tasks upgrade --finish (DATABASE_URL of the new server; PG_BIN_DIR "
        "untouched: each operation picks the binaries of the major it touches)",
        "if the upgrade fails: backup-tasks restore-pitr --target-time "
        f"'{reach.restorable_until.isoformat()}' brings the old server back (its major's binaries are used)"]
    return step


def finish(settings: Settings, *, wait: float = ARCHIVE_WAIT,
           progress: Callable[[str], None] = lambda _: None) -> UpgradeStep:
    """``upgrade --finish`` against the new server (see the module docstring)."""
    facts = server_facts(settings)
    storage = settings.locations()
    archive = WalArchive.for_settings(settings, read_copy=False)
    known = read_generations(storage, archive.primary)
    upgrade = known.open_upgrade
    previous = _previous_generation(known.generations, upgrade.old_system if upgrade else None, facts.system)
    if previous is None:
        raise ConfigError("the catalog records no system yet: there is nothing to upgrade from; take a snapshot "
                          "(`backup-tasks snapshot`)")
    old_major = (upgrade.old_major if upgrade else None) or previous.major
    if facts.system == previous.system:
        raise SystemMismatch(f"{facts.label} is still system {facts.system} (PostgreSQL {facts.major}), the one being "
                             f"upgraded: run --finish against the NEW server, after pg_upgrade")
    if old_major is not None and facts.major <= old_major:
        raise SystemMismatch(f"{facts.label} is PostgreSQL {facts.major}, not newer than the old generation's "
                             f"PostgreSQL {old_major}: not an upgrade of it (another deployment?)")
    claim_catalog(storage, facts.system, backup=f"upgrade --finish on {facts.label}", major=facts.major,
                  databases=facts.databases)
    progress("switching WAL: the archive opens the new generation from its first segment")
    first_switched = switch_and_wait(settings, archive, wait)
    _copy_generation(archive, facts.system)
    progress("taking the first snapshot of the new server")
    first = snapshot.take_snapshot(settings)
    upgrade_id = upgrade.upgrade_id if upgrade else time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    finished_at = _now()
    if upgrade is None:  # no --begin: record one, so the pair tells the story
        _record_everywhere(storage, archive, f"generations/upgrade-{upgrade_id}.begin.json", {
            "upgrade_id": upgrade_id, "old_system": previous.system, "old_major": old_major,
            "began_at": finished_at, "last_segment": None, "final_snapshot": None})
    _record_everywhere(storage, archive, f"generations/upgrade-{upgrade_id}.finish.json", {
        "upgrade_id": upgrade_id, "new_system": facts.system, "new_major": facts.major, "new_version": facts.version,
        "finished_at": finished_at, "first_snapshot": first.id, "previous_system": previous.system})
    step = UpgradeStep("finish", True, facts.label, facts.system, facts.major, facts.version, upgrade_id,
                       first.id, first_switched, previous_system=previous.system, previous_major=old_major)
    step.next_steps = [
        "resume writers; `backup-tasks health` is green once the snapshot is verified (`backup-tasks verify "
        f"{first.id}`)",
        f"the old generation (PostgreSQL {old_major}, system {previous.system}) keeps its newest snapshot and WAL "
        f"(the way back); once the new server has proven itself: backup-tasks upgrade --release-old"]
    return step


def _previous_generation(generations: list[GenerationView], upgrading: str | None,
                         system: str) -> GenerationView | None:
    """The generation ``system`` follows: the open upgrade's old one; else the newest, or the one before it when the
    newest is ``system``'s own (opened already by its WAL or a backup)."""
    if upgrading is not None:
        return next((g for g in generations if g.system == upgrading), None)
    if len(generations) > 1 and generations[-1].system == system:
        return generations[-2]
    return generations[-1] if generations else None


def release_old(settings: Settings) -> dict[str, Any]:
    """``upgrade --release-old``: every generation before the newest may lose its last chain to retention."""
    storage = settings.locations()
    known = read_generations(storage, None)
    if len(known.generations) < 2:
        raise ConfigError("the catalog holds one generation: there is no old one to release")
    if known.open_upgrade is not None:
        raise ConfigError("an upgrade is still open (`upgrade --finish` has not run): the old generation is the way "
                          "back; finish the upgrade first")
    released = [g for g in known.generations[:-1] if not g.released]
    for generation in released:
        for member in members(storage):
            put_record(member, f"generations/release-{generation.system}.json",
                       {"system_identifier": generation.system, "major": generation.major, "released_at": _now()})
    return {"ok": True, "released": [g.to_dict() for g in released], "kept": known.generations[-1].to_dict()}
