"""Generations: the PostgreSQL systems a catalog and a WAL archive have held, one after another, across upgrades.

A *generation* is one system identifier with its major version. ``pg_upgrade`` makes a new system
(a new identifier, a higher major) that keeps the old one's databases and goes on archiving into the
same archive; its backups go into the same catalog. Coverage, health, status, the metrics, ``list``
and retention judge each generation on its own: the old one keeps its way back (its newest snapshot
and the WAL after it, up to the old server's last segment), the new one needs a snapshot of its own.

Where they are recorded (``wal.system``, since ``wal-push`` records them; every object create-only, so
an Object Lock bucket holds them as well): the first generation is the identity object
``system_identifier.json``; each later one ``generations/<system identifier>.json`` in the same location
(every catalog location, and the WAL archive); ``backup-tasks upgrade`` adds
``generations/upgrade-<stamp>.begin.json`` / ``.finish.json`` and ``generations/release-<system>.json``.
A generation's end is not written anywhere: it ends where the next begins (its first segment, in the
archive; its ``opened_at``). Its *last seen*: its newest backup or, in the archive, the segment before
the next generation's first.

The catalog's and the archive's records are read and merged here (``read_generations``); the rest is
pure: which generation a backup belongs to (``generation_of``), where one generation's WAL ends and the
next one's begins (``boundaries``), which generation still lacks a snapshot (``without_snapshot``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from backup_tasks.catalog.manifest import Manifest
from backup_tasks.postgres.tools import major_of
from backup_tasks.storage.base import Storage, members
from backup_tasks.wal.names import position
from backup_tasks.wal.system import Generation, Upgrade, read_records


@dataclass(frozen=True)
class GenerationView:
    """One generation, as the catalog and the archive together record it."""

    system: str
    major: int | None
    opened_at: str | None
    reason: str = "first"
    previous: str | None = None
    first_segment: str | None = None  # in the WAL archive: where its WAL begins
    released: bool = False  # ``upgrade --release-old``: its last chain may be pruned

    @property
    def label(self) -> str:
        """``PostgreSQL 18, system 7412...``: how messages and ``list`` name it."""
        return f"PostgreSQL {self.major or '?'}, system {self.system}"

    def to_dict(self) -> dict[str, Any]:
        return {"system_identifier": self.system, "major": self.major, "opened_at": self.opened_at,
                "reason": self.reason, "previous": self.previous, "first_segment": self.first_segment,
                "released": self.released}


@dataclass
class Generations:
    """Every generation, oldest first, and the upgrades recorded (``read_generations``)."""

    generations: list[GenerationView] = field(default_factory=list)
    upgrades: list[Upgrade] = field(default_factory=list)

    @property
    def newest(self) -> GenerationView | None:
        return self.generations[-1] if self.generations else None

    @property
    def open_upgrade(self) -> Upgrade | None:
        return next((u for u in reversed(self.upgrades) if u.open), None)

    def of(self, system: str | None) -> GenerationView | None:
        return next((g for g in self.generations if g.system == system), None)

    @property
    def released(self) -> set[str]:
        return {g.system for g in self.generations if g.released}


def major_of_version(version: str | None) -> int | None:
    """15 for "15.20 (Debian ...)", None when there is no number."""
    return major_of(version or "") or None


def merge(catalog_records: Iterable[Generation], archive_records: Iterable[Generation], manifests: Sequence[Manifest],
          upgrades: Sequence[Upgrade] = (), released: Iterable[str] = ()) -> Generations:
    """Pure: the catalog's and the archive's records as one list of generations, oldest first (by major).

    A generation recorded without its major (a first one recorded by an earlier version) takes it from
    an upgrade's record of it, else from its backups' ``server_version``. The archive's record gives a
    generation its first segment; the earlier ``opened_at`` of the two stands.
    """
    views: dict[str, GenerationView] = {}
    released = set(released)
    for record in [*catalog_records, *archive_records]:
        known = views.get(record.system)
        if known is None:
            views[record.system] = GenerationView(record.system, record.major, record.opened_at, record.reason,
                                                  record.previous, record.first_segment, record.system in released)
            continue
        opened = min((t for t in (known.opened_at, record.opened_at) if t), default=None)
        views[record.system] = GenerationView(known.system, known.major or record.major, opened, known.reason,
                                              known.previous or record.previous,
                                              known.first_segment or record.first_segment, known.released)
    for system, view in list(views.items()):
        if view.major is None:
            major = next((u.old_major for u in upgrades if u.old_system == system and u.old_major), None) or \
                next((m for m in (major_of_version(b.server_version) for b in manifests
                                  if b.system_identifier == system) if m), None)
            views[system] = GenerationView(view.system, major, view.opened_at, view.reason, view.previous,
                                           view.first_segment, view.released)
    ordered = sorted(views.values(), key=lambda g: (g.reason != "first", g.major or 0, g.opened_at or ""))
    return Generations(ordered, list(upgrades))


def catalog_records(storage: Storage) -> tuple[list[Generation], list[Upgrade], set[str]]:
    """The generations recorded in the catalog: its first location that records a system (BACKUP_DIR, else the copy)."""
    for member in members(storage):
        generations, upgrades, released = read_records(member)
        if generations:
            return generations, upgrades, released
    return [], [], set()


def read_generations(storage: Storage | None, archive_storage: Storage | None,
                     manifests: Sequence[Manifest] = ()) -> Generations:
    """The catalog's (``storage``) and the WAL archive's (``archive_storage``: its primary) generations, merged."""
    catalog_gens, catalog_upgrades, catalog_released = catalog_records(storage) if storage is not None else \
        ([], [], set())
    archive_gens, archive_upgrades, archive_released = read_records(archive_storage) if archive_storage is not None \
        else ([], [], set())
    upgrades = {u.upgrade_id: u for u in [*archive_upgrades, *catalog_upgrades]}
    return merge(catalog_gens, archive_gens, manifests, sorted(upgrades.values(), key=lambda u: u.upgrade_id),
                 catalog_released | archive_released)


def generation_of(manifest: Manifest, generations: Generations) -> GenerationView | None:
    """Pure: the generation ``manifest`` belongs to: by its system identifier; a legacy one without one by the major
    of its ``server_version``; else the first."""
    found = generations.of(manifest.system_identifier)
    if found is not None:
        return found
    major = major_of_version(manifest.server_version)
    return next((g for g in generations.generations if g.major == major), None) or \
        (generations.generations[0] if generations.generations and manifest.system_identifier is None else None)


def boundaries(generations: Generations) -> list[str]:
    """Pure: where each later generation's WAL begins in the archive (its first segment), in WAL order."""
    return sorted((g.first_segment for g in generations.generations[1:] if g.first_segment), key=position)


def without_snapshot(generations: Generations, snapshots: Sequence[Manifest]) -> GenerationView | None:
    """Pure: the newest generation when it follows an older one and none of ``snapshots`` (complete ones) is of it:
    the new server has no way back of its own yet."""
    newest = generations.newest
    if newest is None or len(generations.generations) < 2:
        return None
    if any(s.state == "complete" and s.system_identifier == newest.system for s in snapshots):
        return None
    return newest


def no_snapshot_problem(generation: GenerationView) -> str:
    """The health problem while the newest generation has no snapshot, with the way to fix it."""
    return (f"the new server ({generation.label}) has no snapshot yet: take one (`backup-tasks upgrade --finish` "
            f"against it, or `backup-tasks snapshot`); until then nothing after the upgrade can be restored to a "
            f"moment, and the new server's WAL is not judged")
