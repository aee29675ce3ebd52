"""Retention is a pure function: these cases need no database and no files."""

from __future__ import annotations

from backup_tasks.catalog.manifest import Manifest
from backup_tasks.catalog.retention import RetentionPolicy, plan
from tests.support.data import NOW, dump


def kept(manifests: list[Manifest], policy: RetentionPolicy | None = None) -> set[str]:
    return {d.backup_id for d in plan(manifests, NOW, policy or RetentionPolicy()) if d.keep}


def test_keeps_exactly_the_last_seven_daily_dumps() -> None:
    dumps = [dump(d, verified=True) for d in range(0, 12)]  # one a day at 02:05, newest now
    assert kept(dumps) == {m.id for m in dumps[:7]}


def test_boundary_exactly_seven_days_old_goes() -> None:
    dumps = [dump(0, verified=True), dump(7, verified=True), dump(6.99, verified=True)]
    assert kept(dumps) == {dumps[0].id, dumps[2].id}


def test_never_deletes_the_newest_verified_even_when_old() -> None:
    old_verified = dump(30, verified=True)
    recent_failed = [dump(d, verified=False) for d in (0, 1)]
    recent_unverified = dump(2)
    result = kept([old_verified, *recent_failed, recent_unverified])
    assert old_verified.id in result
    assert {m.id for m in recent_failed} <= result


def test_the_only_backup_is_never_deleted() -> None:
    lonely = dump(400)
    assert kept([lonely]) == {lonely.id}


def test_policy_is_configurable_and_per_database() -> None:
    a = [dump(d, verified=True, database="aitrapp") for d in range(5)]
    b = [dump(d + 0.5, verified=True, database="other") for d in range(5)]
    result = kept(a + b, RetentionPolicy(keep_daily_days=2))
    assert result == {a[0].id, a[1].id, b[0].id, b[1].id}


def test_snapshots_keep_newest_n() -> None:
    snaps = [dump(7 * w, verified=True, kind="snapshot") for w in range(15)]
    assert kept(snaps, RetentionPolicy(keep_weekly=12)) == {m.id for m in snaps[:12]}


def test_every_decision_has_a_reason() -> None:
    for decision in plan([dump(d) for d in range(10)], NOW, RetentionPolicy()):
        assert decision.reason
