"""Health of the catalog: is there a recent, non-empty, verified backup? (The seed's health check.)"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from backup_tasks.catalog import manifest as catalog
from backup_tasks.catalog.manifest import Manifest, utcnow
from backup_tasks.errors import StorageError
from backup_tasks.settings import Settings
from backup_tasks.storage.base import Storage
from backup_tasks.storage.locations import open_locations

#: A dump this young may still be in its verify step: not yet a problem.
VERIFY_GRACE = timedelta(hours=2)


@dataclass
class HealthReport:
    ok: bool
    problems: list[str] = field(default_factory=list)
    newest_backup: str | None = None
    newest_finished_at: str | None = None
    verified: bool | None = None


def assess(manifests: list[Manifest], stored_sizes: dict[str, int | None], now: datetime,
           max_age: timedelta) -> HealthReport:
    """Pure: judge the newest dump from the manifests and the sizes actually found in storage."""
    if not manifests:
        return HealthReport(ok=False, problems=["no backup found in the catalog"])
    newest = manifests[-1]
    problems = []
    finished = catalog.parse_time(newest.finished_at)
    age = now - finished
    if age > max_age:
        problems.append(f"newest backup {newest.id} is {age.total_seconds() / 3600:.1f} hours old "
                        f"(expected one every {max_age.total_seconds() / 3600:.0f} hours)")
    stored = stored_sizes.get(newest.id)
    if stored is None:
        problems.append(f"newest backup {newest.id}: file {newest.path} is missing")
    elif stored == 0 or newest.size_bytes == 0:
        problems.append(f"newest backup {newest.id} is empty (0 bytes)")
    elif stored != newest.size_bytes:
        problems.append(f"newest backup {newest.id} is {stored} bytes, its manifest says {newest.size_bytes}")
    if newest.verification is None:
        if age > VERIFY_GRACE:
            problems.append(f"newest backup {newest.id} has never been verified")
    elif not newest.verification.ok:
        problems.append(f"newest backup {newest.id} failed verification: " + "; ".join(newest.verification.problems))
    return HealthReport(ok=not problems, problems=problems, newest_backup=newest.id,
                        newest_finished_at=newest.finished_at,
                        verified=None if newest.verification is None else newest.verification.ok)


def check_health(settings: Settings, *, now: datetime | None = None, storage: Storage | None = None) -> HealthReport:
    """Judge the catalog in ``storage`` (default: the settings' locations)."""
    if storage is None:
        storage = open_locations(settings.backup_dir, settings.copy_to)
    database = settings.source().dbname if settings.database_url else None
    manifests = catalog.catalog(storage, kind="dump", database=database)
    sizes: dict[str, int | None] = {}
    if manifests:
        newest = manifests[-1]
        try:
            sizes[newest.id] = storage.size(newest.path)
        except StorageError:
            sizes[newest.id] = None
    return assess(manifests, sizes, now or utcnow(), timedelta(hours=settings.health_max_age_hours))
