"""Prune: apply the retention plan to the catalog, data before manifest."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime

from . import manifest as catalog
from .locks import hold
from .manifest import utcnow
from .retention import Decision, RetentionPolicy, plan
from .settings import Settings
from .storage import open_storage

log = logging.getLogger(__name__)


@dataclass
class PruneReport:
    dry_run: bool
    decisions: list[Decision]
    deleted: list[str] = field(default_factory=list)
    freed_bytes: int = 0


def prune(settings: Settings, *, dry_run: bool = False, now: datetime | None = None) -> PruneReport:
    storage = open_storage(settings.backup_dir)
    with hold(settings, "prune", what="a prune of this backup directory"):
        manifests = catalog.catalog(storage)
        policy = RetentionPolicy(keep_daily_days=settings.keep_daily_days, keep_weekly=settings.keep_weekly)
        decisions = plan(manifests, now or utcnow(), policy)
        report = PruneReport(dry_run=dry_run, decisions=decisions)
        by_id = {m.id: m for m in manifests}
        for decision in decisions:
            if decision.keep:
                continue
            manifest = by_id[decision.backup_id]
            report.freed_bytes += manifest.size_bytes
            report.deleted.append(manifest.id)
            if dry_run:
                continue
            # Data first: an interruption leaves a manifest without data (pruned again next time),
            # never data without a manifest (which prune would never touch again).
            storage.delete(manifest.path)
            storage.delete(manifest.key)
            log.info("pruned %s (%s): %s", manifest.id, manifest.path, decision.reason)
        return report
