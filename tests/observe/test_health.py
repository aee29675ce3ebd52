"""Health of the newest dump (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from backup_tasks.observe.health import assess_dumps
from tests.support.data import NOW, dump

DAY = timedelta(hours=26)


def test_no_backup_is_unhealthy() -> None:
    health = assess_dumps([], {}, NOW, DAY)
    assert health.problems == ["no backup found in the catalog"] and health.newest is None


def test_recent_verified_backup_is_healthy() -> None:
    newest = dump(0.1, verified=True)
    health = assess_dumps([dump(2, verified=True), newest], {newest.id: newest.size_bytes}, NOW, DAY)
    assert health.problems == [] and health.newest == newest.id and health.verified is True


def test_stale_empty_missing_failed_unverified_are_each_named() -> None:
    stale = dump(3, verified=True)
    assert "hours old" in assess_dumps([stale], {stale.id: 10}, NOW, DAY).problems[0]
    fresh = dump(0.5, verified=True)
    assert "empty" in assess_dumps([fresh], {fresh.id: 0}, NOW, DAY).problems[0]
    assert "missing" in assess_dumps([fresh], {fresh.id: None}, NOW, DAY).problems[0]
    assert "manifest says" in assess_dumps([fresh], {fresh.id: 3}, NOW, DAY).problems[0]
    failed = dump(0.5, verified=False)
    assert "failed verification" in assess_dumps([failed], {failed.id: 10}, NOW, DAY).problems[0]
    unverified = dump(0.5)
    assert "never been verified" in assess_dumps([unverified], {unverified.id: 10}, NOW, DAY).problems[0]


def test_a_dump_still_in_its_verify_window_is_not_yet_a_problem() -> None:
    just_taken = dump(0.02)
    assert assess_dumps([just_taken], {just_taken.id: 10}, NOW, DAY).problems == []
    assert assess_dumps([just_taken], {just_taken.id: 10}, datetime(2026, 11, 27, 9, tzinfo=UTC), DAY).problems
