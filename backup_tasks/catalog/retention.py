"""Retention policy as a pure function: manifests and a clock in, keep/delete decisions out.

No I/O here: ``prune`` applies the answer, ``--dry-run`` prints it. Rules, per database and kind:
- dumps: keep those started less than ``keep_daily_days`` days ago;
- snapshots: keep the newest ``keep_weekly`` complete chains (a full and the incrementals taken against it,
  PostgreSQL 17+: ``Manifest.chain``). Chains are kept whole: an incremental is kept with its chain's
  full, and every ancestor of a kept incremental is kept, whatever else the policy says;
- always keep the newest backup and the newest verified backup, whatever their age, so the last
  good backup is never expired before its replacement has been proven;
- across a major upgrade (``catalog.generations``: one system identifier per generation), keep each
  generation's newest complete snapshot, the start of its restorable chain (the WAL from it is kept
  by ``wal_expiry``, which keeps WAL from the oldest kept snapshot), until the operator releases that
  generation (``backup-tasks upgrade --release-old``: ``released``). The newest generation's is kept
  by the rules above anyway.

Ages come from a clock, and a host's clock can be days ahead. ``clock_doubt`` compares it with the
newest object each location stamped itself (S3's LastModified, a file's mtime): when the clock is
further ahead of one than ``clock_tolerance`` *and* the plan would delete a backup that only the clock
makes old enough (kept by the plan as of that stamp plus the tolerance), prune refuses. A quiet
catalog whose deletions do not depend on the clock is pruned as usual.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from backup_tasks.catalog.manifest import Manifest
from backup_tasks.clock import isoformat
from backup_tasks.errors import BackupError

#: How far this host's clock may run ahead of the newest object a location stamped before prune doubts it.
CLOCK_TOLERANCE = timedelta(hours=1)


@dataclass(frozen=True)
class RetentionPolicy:
    keep_daily_days: int = 7
    keep_weekly: int = 12
    clock_tolerance: timedelta = CLOCK_TOLERANCE


@dataclass(frozen=True)
class Decision:
    backup_id: str
    kind: str
    database: str
    keep: bool
    reason: str


def plan(manifests: list[Manifest], now: datetime, policy: RetentionPolicy, *,
         released: Collection[str] = ()) -> list[Decision]:
    """The decision on every manifest. ``released``: systems whose generation ``upgrade --release-old`` let go."""
    groups: dict[tuple[str, str], list[Manifest]] = defaultdict(list)
    for manifest in manifests:
        groups[(manifest.database, manifest.kind)].append(manifest)
    systems = {m.system_identifier for m in manifests if m.system_identifier}
    decisions: list[Decision] = []
    for (_database, kind), group in sorted(groups.items()):
        group.sort(key=lambda m: (m.started, m.id))
        newest = group[-1]
        verified = [m for m in group if m.verified_ok]
        newest_verified = verified[-1] if verified else None
        # Counted in chains: their fulls (an incremental's fate is its chain's, below).
        recent_snapshots = {m.id for m in [m for m in group if m.state == "complete" and not m.parent]
                            [-policy.keep_weekly:]}
        way_back = _generation_chains(group, released) if kind == "snapshot" and len(systems) > 1 else {}
        group_decisions = [_decide(m, kind, now, policy, newest, newest_verified, recent_snapshots, way_back)
                           for m in group]
        if kind == "snapshot":
            group_decisions = _chains_whole(group, group_decisions, recent_snapshots, policy.keep_weekly)
        decisions += group_decisions
    return decisions


def _chains_whole(group: list[Manifest], decisions: list[Decision], recent_roots: set[str],
                  keep: int) -> list[Decision]:
    """Incrementals live and die with their chain: kept when its full is one of the newest ``keep`` chains; every
    ancestor of a kept snapshot is kept (the newest backup may be an incremental), whatever else the policy says."""
    result = {d.backup_id: d for d in decisions}
    for m in group:
        chain = m.chain_ids
        if len(chain) > 1 and not result[m.id].keep:
            if chain[0] in recent_roots:
                result[m.id] = replace(result[m.id], keep=True, reason=f"incremental in the chain of {chain[0]}, "
                                                                      f"one of the newest {keep} chains")
            else:
                result[m.id] = replace(result[m.id], reason=f"incremental in the chain of {chain[0]}, "
                                                            f"older than the newest {keep} chains")
    for m in reversed(group):  # newest first: an ancestor kept here keeps its own ancestors too
        if result[m.id].keep:
            for ancestor in m.chain_ids[:-1]:
                if ancestor in result and not result[ancestor].keep:
                    result[ancestor] = replace(result[ancestor], keep=True,
                                               reason=f"ancestor of kept incremental {m.id}: a chain is kept whole")
    return [result[d.backup_id] for d in decisions]


def _generation_chains(snapshots: list[Manifest], released: Collection[str]) -> dict[str, str]:
    """The newest complete snapshot of each generation (system identifier) not released: id -> its system."""
    newest: dict[str, Manifest] = {}
    for m in snapshots:  # oldest first: the last one of each system wins
        if m.state == "complete" and m.system_identifier and m.system_identifier not in released:
            newest[m.system_identifier] = m
    return {m.id: system for system, m in newest.items()}


def _decide(manifest: Manifest, kind: str, now: datetime, policy: RetentionPolicy, newest: Manifest,
            newest_verified: Manifest | None, recent_snapshots: set[str], way_back: dict[str, str]) -> Decision:
    def decision(keep: bool, reason: str) -> Decision:
        return Decision(manifest.id, kind, manifest.database, keep, reason)

    if manifest is newest_verified:
        return decision(True, "newest verified backup")
    if manifest is newest:
        return decision(True, "newest backup")
    if manifest.id in way_back:
        return decision(True, f"newest snapshot of the generation of PostgreSQL system {way_back[manifest.id]} "
                              f"(PostgreSQL {manifest.server_version.split()[0]}): its way back, kept until "
                              f"`backup-tasks upgrade --release-old`")
    if kind == "snapshot":
        if manifest.id in recent_snapshots:
            return decision(True, f"one of the newest {policy.keep_weekly} snapshots")
        return decision(False, f"older than the newest {policy.keep_weekly} snapshots")
    age = now - manifest.started
    if age < timedelta(days=policy.keep_daily_days):
        return decision(True, f"within {policy.keep_daily_days} days")
    return decision(False, f"{age.days} days old, retention is {policy.keep_daily_days} days")


@dataclass(frozen=True)
class ClockDoubt:
    """This host's clock is further ahead of what ``location`` stamped last than the tolerance, and the plan would
    delete backups (``on_clock_only``) that only that clock makes old enough."""

    location: str
    newest_stamped: datetime
    now: datetime
    tolerance: timedelta
    on_clock_only: list[str]

    @property
    def message(self) -> str:
        ahead = self.now - self.newest_stamped
        return (f"this host's clock says {isoformat(self.now)}, but the newest object in {self.location} was stamped "
                f"{isoformat(self.newest_stamped)} by the location itself: {_duration(ahead)} earlier, more than the "
                f"{_duration(self.tolerance)} allowed. Only this clock makes {', '.join(self.on_clock_only)} old "
                f"enough to delete, so prune deletes nothing. Check the clock (timedatectl, NTP); if it is right and "
                f"nothing was written for that long, take a backup (`backup-tasks dump`) and prune after it")


def clock_doubt(manifests: list[Manifest], now: datetime, policy: RetentionPolicy,
                newest_stamped: dict[str, datetime], *, released: Collection[str] = ()) -> ClockDoubt | None:
    """Pure: whether the plan at ``now`` depends on a clock implausibly ahead of what the locations stamped.

    ``newest_stamped``: each location's newest object, by the location's own timestamp (locations holding
    nothing left out). The location that stamped least recently is the judge: with a copy in a bucket,
    a clock that was ahead all along (so are the mtimes of the files it wrote) still shows against S3's.
    """
    if not newest_stamped:
        return None
    location, newest = min(newest_stamped.items(), key=lambda item: item[1])
    if now - newest <= policy.clock_tolerance:
        return None
    plausible = newest + policy.clock_tolerance  # the latest moment the location vouches for, and the tolerance
    kept_then = {d.backup_id for d in plan(manifests, plausible, policy, released=released) if d.keep}
    on_clock_only = [d.backup_id for d in plan(manifests, now, policy, released=released)
                     if not d.keep and d.backup_id in kept_then]
    if not on_clock_only:
        return None
    return ClockDoubt(location, newest, now, policy.clock_tolerance, on_clock_only)


def _duration(span: timedelta) -> str:
    hours = span.total_seconds() / 3600
    return f"{hours / 24:.1f} days" if hours >= 48 else f"{hours:.1f} hours" if hours >= 1 else \
        f"{span.total_seconds() / 60:.0f} minutes"


@dataclass(frozen=True)
class WalExpiry:
    """Which archived WAL files may go: everything before the start of the oldest kept snapshot."""

    keep_from: str | None  # the oldest kept snapshot's first segment (None: keep every file)
    delete: list[str]
    reason: str


def wal_expiry(kept_snapshots: list[Manifest], archived: list[str]) -> WalExpiry:
    """Pure: the kept snapshots and the archive's file names in, the names to delete out.

    A snapshot needs every segment from its start onwards (its own range, then the WAL after it for
    point-in-time recovery). Timeline history files are always kept (tiny, and recovery needs them to
    follow timelines). With no snapshot kept, or one whose start is unknown, nothing is expired.
    """
    from backup_tasks.wal.names import (
        kind_of,  # import-light module; kept local so retention stays pure and cheap
        position,
    )

    if not kept_snapshots:
        return WalExpiry(None, [], "no snapshot is kept, so no WAL is expired")
    starts = [m.start_segment for m in kept_snapshots]
    if any(not start for start in starts):
        unknown = next(m.id for m in kept_snapshots if not m.start_segment)
        return WalExpiry(None, [], f"snapshot {unknown} does not say where its WAL starts, so no WAL is expired")
    oldest = min((str(s) for s in starts), key=position)
    limit = position(oldest)
    delete = []
    for name in archived:
        if position(name) >= limit:
            continue  # most of a twelve-week archive: decided by one string comparison, no name parsing
        try:
            kind = kind_of(name)
        except BackupError:
            continue
        if kind != "history":
            delete.append(name)
    owner = min(kept_snapshots, key=lambda m: position(str(m.start_segment))).id
    return WalExpiry(oldest, delete, f"WAL before {oldest}, where the oldest kept snapshot {owner} starts")
