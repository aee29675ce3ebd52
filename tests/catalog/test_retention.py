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


def chain_of(full: Manifest, days_after: list[float], *, verified: bool = True) -> list[Manifest]:
    """``full`` and one daily incremental per entry of ``days_after`` (days before NOW), each on the previous."""
    members = [full]
    for days in days_after:
        incremental = dump(days, verified=verified, kind="snapshot")
        incremental.parent = members[-1].id
        incremental.chain = [*members[-1].chain_ids, incremental.id]
        members.append(incremental)
    return members


def test_chains_are_counted_by_their_fulls_and_kept_whole() -> None:
    """A mixed catalog: three weekly fulls, each with six dailies on it; keep_weekly=2 keeps two whole chains."""
    chains = [chain_of(dump(7 * w + 6.5, verified=True, kind="snapshot"), [7 * w + d for d in (5, 4, 3, 2, 1, 0.5)])
              for w in range(3)]
    decisions = {d.backup_id: d for d in plan([m for c in chains for m in c], NOW, RetentionPolicy(keep_weekly=2))}
    assert {i for i, d in decisions.items() if d.keep} == {m.id for c in chains[:2] for m in c}
    assert all("older than the newest 2 chains" in decisions[m.id].reason for m in chains[2][1:])


def test_an_ancestor_of_a_kept_incremental_is_never_deleted() -> None:
    """The newest backup (always kept) is an incremental on an old chain: its full and every link stay with it."""
    old = chain_of(dump(40, verified=True, kind="snapshot"), [39, 38])
    newer_fulls = [dump(7 * w + 1, verified=True, kind="snapshot") for w in range(2)]
    newest = dump(0, verified=True, kind="snapshot")
    newest.parent, newest.chain = old[-1].id, [*old[-1].chain_ids, newest.id]
    decisions = {d.backup_id: d for d in plan([*old, *newer_fulls, newest], NOW, RetentionPolicy(keep_weekly=1))}
    assert all(decisions[m.id].keep for m in old), [decisions[m.id].reason for m in old]
    assert "a chain is kept whole" in decisions[old[0].id].reason
