"""Health assessment (pure) and the CLI's exit code on a real catalog."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from backup_tasks.catalog.health import assess
from tests.support.data import NOW, dump

DAY = timedelta(hours=26)


def test_no_backup_is_unhealthy() -> None:
    report = assess([], {}, NOW, DAY)
    assert not report.ok and "no backup" in report.problems[0]


def test_recent_verified_backup_is_healthy() -> None:
    newest = dump(0.1, verified=True)
    assert assess([newest], {newest.id: newest.size_bytes}, NOW, DAY).ok


def test_stale_empty_missing_failed_unverified_are_each_named() -> None:
    stale = dump(3, verified=True)
    assert "hours old" in assess([stale], {stale.id: 10}, NOW, DAY).problems[0]
    fresh = dump(0.5, verified=True)
    assert "empty" in assess([fresh], {fresh.id: 0}, NOW, DAY).problems[0]
    assert "missing" in assess([fresh], {fresh.id: None}, NOW, DAY).problems[0]
    assert "manifest says" in assess([fresh], {fresh.id: 3}, NOW, DAY).problems[0]
    failed = dump(0.5, verified=False)
    assert "failed verification" in assess([failed], {failed.id: 10}, NOW, DAY).problems[0]
    unverified = dump(0.5)
    assert "never been verified" in assess([unverified], {unverified.id: 10}, NOW, DAY).problems[0]


def test_a_dump_still_in_its_verify_window_is_not_yet_a_problem() -> None:
    just_taken = dump(0.02)
    assert assess([just_taken], {just_taken.id: 10}, NOW, DAY).ok
    assert assess([just_taken], {just_taken.id: 10}, datetime(2026, 11, 27, 9, tzinfo=UTC), DAY).problems
