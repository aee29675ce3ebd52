"""Clocks: records apply in an order a skewed clock cannot invert, and prune refuses to trust a clock that runs
implausibly ahead of what the backup locations stamped themselves."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from backup_tasks.catalog import manifest as catalog
from backup_tasks.catalog.manifest import RECORD_STAMP, Manifest, Verification
from backup_tasks.catalog.prune import prune
from backup_tasks.clock import isoformat, utcnow
from backup_tasks.errors import ClockAhead
from backup_tasks.settings import Settings
from backup_tasks.storage.base import Storage
from backup_tasks.storage.local import LocalStorage


def store(storage: Storage, days_ago: float) -> Manifest:
    started = (utcnow() - timedelta(days=days_ago)).replace(microsecond=0)
    backup_id = f"aitrapp-dump-{started:%Y%m%dT%H%M%SZ}"
    manifest = Manifest(id=backup_id, kind="dump", database="aitrapp", server="db:5432", server_version="15.4",
                        started_at=isoformat(started), finished_at=isoformat(started + timedelta(minutes=3)),
                        path=f"{backup_id}.dump.zst", size_bytes=4, sha256="0" * 64, compression="zstd")
    storage.put_bytes(manifest.path, b"dump")
    catalog.save_new(storage, manifest)
    return manifest


def verdict(ok: bool, at: datetime) -> Verification:
    return Verification(ok=ok, verified_at=isoformat(at), duration_seconds=1.0, method="throwaway-cluster",
                        checked=["sha256", "restore", "row-counts"], problems=[] if ok else ["row counts differ"])


# --- records --------------------------------------------------------------------------------------------------

def test_a_host_whose_clock_runs_ahead_cannot_let_its_older_ok_override_a_later_failed(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "backups")
    backup = store(storage, 1)
    # A worker whose clock is a day ahead verifies first: OK, stamped tomorrow.
    skewed = utcnow() + timedelta(days=1)
    catalog.add_record(storage, backup.id, "verification", asdict(verdict(True, skewed)), now=skewed)
    # Later, a worker with the right clock finds the backup damaged.
    seen = catalog.record_verification(storage, backup.id, verdict(False, utcnow()))
    assert seen.verification is not None and not seen.verification.ok, "the later FAILED verdict stands"
    assert not catalog.catalog(storage)[0].verified_ok
    assert seen.record_sequence == 2
    # And a host whose clock runs behind still writes after what it read.
    late = utcnow() - timedelta(days=2)
    catalog.add_record(storage, backup.id, "verification", asdict(verdict(True, late)), now=late)
    assert catalog.load(storage, backup.id).verified_ok


def test_records_of_earlier_versions_keep_their_order_and_newer_ones_follow(tmp_path: Path) -> None:
    """Records without a sequence (earlier versions) apply by their stamps, as before; any newer record after them."""
    storage = LocalStorage(tmp_path / "backups")
    backup = store(storage, 1)
    now = utcnow()
    for ok, at in ((True, now - timedelta(hours=2)), (False, now - timedelta(hours=1))):
        key = f"{backup.id}.{at.strftime(RECORD_STAMP)}-abcdef.verification.record.json"
        storage.put_new(key, json.dumps({"backup_id": backup.id, "kind": "verification", "recorded_at": isoformat(at),
                                         "data": asdict(verdict(ok, at))}).encode())
    assert not catalog.load(storage, backup.id).verified_ok, "the later legacy verdict (FAILED) stands"
    behind = now - timedelta(days=3)  # a clock behind both legacy stamps
    catalog.add_record(storage, backup.id, "verification", asdict(verdict(True, behind)), now=behind)
    assert catalog.load(storage, backup.id).verified_ok


# --- retention ------------------------------------------------------------------------------------------------

def settings_for(tmp_path: Path, **values: object) -> Settings:
    return Settings(backup_dir=str(tmp_path / "backups"), broker_url="memory://", lock_url=None, keep_daily_days=7,
                    **values)  # type: ignore[arg-type]


def test_prune_refuses_when_this_hosts_clock_is_days_ahead(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    storage = LocalStorage(tmp_path / "backups")
    dumps = [store(storage, days) for days in (6, 5, 3, 1, 0)]  # a week of dumps: nothing is old enough to go
    ahead = utcnow() + timedelta(days=3)  # ... unless the clock is three days ahead

    preview = prune(settings, dry_run=True, now=ahead)
    assert preview.deleted == [] and preview.clock_refusal is not None
    assert str(tmp_path / "backups") in preview.clock_refusal and "3.0 days" in preview.clock_refusal
    assert dumps[0].id in preview.clock_refusal and dumps[1].id in preview.clock_refusal
    flagged = [d.backup_id for d in preview.decisions if "only this host's clock" in d.reason]
    assert flagged == [dumps[0].id, dumps[1].id], "the dry run shows which deletions the clock alone decides"

    with pytest.raises(ClockAhead, match="prune deletes nothing") as refused:
        prune(settings, now=ahead)
    assert refused.value.exit_code == 2 and "timedatectl" in str(refused.value)
    assert [m.id for m in catalog.catalog(storage)] == [m.id for m in dumps], "nothing was deleted"

    # With the right clock (or one ahead less than the tolerance) the same catalog prunes as usual.
    assert prune(settings, now=utcnow() + timedelta(minutes=30)).deleted == []


def test_a_clock_that_decides_nothing_does_not_stop_prune(tmp_path: Path) -> None:
    """A deletion the plan makes at the location's own time too does not depend on the clock: done."""
    settings = settings_for(tmp_path)
    storage = LocalStorage(tmp_path / "backups")
    old, recent = store(storage, 30), store(storage, 1)
    report = prune(settings, now=utcnow() + timedelta(days=2))
    assert report.deleted == [old.id] and report.clock_refusal is None
    assert [m.id for m in catalog.catalog(storage)] == [recent.id]


def test_a_clock_ahead_all_along_shows_against_the_copy(tmp_path: Path) -> None:
    """The files this host wrote carry its own (wrong) clock: the copy's stamps still give it away."""
    settings = settings_for(tmp_path, copy_to=str(tmp_path / "copy"))
    storage = settings.locations()
    dumps = [store(storage, days) for days in (6, 5, 1)]
    ahead = utcnow() + timedelta(days=3)
    for path in (tmp_path / "backups").iterdir():  # as if written by this host's clock, three days ahead
        os.utime(path, (ahead.timestamp(), ahead.timestamp()))
    with pytest.raises(ClockAhead, match=str(tmp_path / "copy")):
        prune(settings, now=ahead)
    assert [m.id for m in catalog.catalog(storage)] == [m.id for m in dumps]
