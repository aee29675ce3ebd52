"""Which verification speaks for a series (``observe.verdict``): the rule, then metrics, health and status agreeing.

The issue's case: the newest dump FAILED verification and an older one was verified again (OK)
afterwards. The metric used to follow that later verdict (1, both verification alerts silent) while
``health`` exited 1. Now the metric says 0, health exits 1, status shows the failure, all of them
until a newer dump passes; a newer dump not verified yet does not clear it either.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from backup_tasks.catalog.manifest import Manifest, Verification, record_verification, save_new
from backup_tasks.clock import isoformat, parse_time, utcnow
from backup_tasks.observe.facts import collect
from backup_tasks.observe.health import assess_dumps
from backup_tasks.observe.html import failed_verdicts, render_page
from backup_tasks.observe.metrics import exposition
from backup_tasks.observe.status import document, render_text
from backup_tasks.observe.verdict import series_verdict
from backup_tasks.settings import Settings
from backup_tasks.storage.local import LocalStorage
from tests.support.data import NOW, dump
from tests.support.pitr import cli_env, run_cli

DUMP = {"database": "aitrapp", "kind": "dump"}


def verdict(ok: bool, at: str) -> Verification:
    return Verification(ok=ok, verified_at=at, duration_seconds=12.5, method="throwaway-cluster",
                        checked=["sha256", "restore", "row-counts"],
                        problems=[] if ok else ["public.orders: 9986 rows in the manifest, 9985 restored"])


def verified(m: Manifest, ok: bool, hours_later: float) -> Manifest:
    return replace(m, verification=verdict(ok, isoformat(parse_time(m.finished_at) + timedelta(hours=hours_later))))


# --- the rule (pure) ---------------------------------------------------------------------------------

def test_the_newest_backups_failure_outlives_an_older_backup_verified_again_later() -> None:
    older, newest = dump(2, verified=True), dump(1, verified=False)
    again = verified(older, True, hours_later=40)  # verified again after the newest failed
    found = series_verdict([again, newest])
    assert found.judged is newest and found.failed and not found.pending


def test_a_newer_backup_not_yet_verified_does_not_hide_a_failure() -> None:
    failed, pending = dump(1, verified=False), dump(0.1)
    found = series_verdict([dump(2, verified=True), failed, pending])
    assert found.pending and found.failed and found.judged is failed and found.newest is pending


def test_a_newer_backup_that_passes_clears_it() -> None:
    found = series_verdict([dump(2, verified=False), dump(1, verified=True)])
    assert not found.failed and found.verification is not None and found.verification.ok


def test_a_series_never_verified_has_no_verdict() -> None:
    found = series_verdict([dump(2), dump(1)])
    assert found.judged is None and found.verification is None and found.pending and not found.failed


def test_health_names_the_failure_that_stands_while_the_newest_awaits_its_verdict() -> None:
    failed, pending = dump(1, verified=False), dump(0.02)  # half an hour old: its verify may still run
    [problem] = assess_dumps([failed, pending], {pending.id: pending.size_bytes}, NOW, timedelta(hours=26)).problems
    assert f"backup {failed.id} failed verification" in problem and pending.id in problem
    other = dump(0.01, verified=True, database="other")  # another database's verdict is not this series'
    assert assess_dumps([failed, pending, other], {other.id: 10}, NOW, timedelta(hours=26)).problems == []


# --- metrics, health, status and the page on one catalog ---------------------------------------------------

def metric(settings: Settings, name: str) -> float | None:
    text = exposition(collect(settings))
    found = [s.value for family in text_string_to_metric_families(text) for s in family.samples
             if s.name == name and s.labels == DUMP]
    return found[0] if found else None


def health(settings: Settings) -> tuple[int, list[str]]:
    result = run_cli("health", "--json", env=cli_env(settings))
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)["problems"]


def status(settings: Settings) -> tuple[dict[str, object], str, list[str]]:
    facts = collect(settings)
    doc = document(facts, settings)
    text = render_text(doc, settings)
    page = render_page(facts, doc, text, settings)
    lines = failed_verdicts(doc)
    assert all(line.split(":")[0] in page for line in lines), "the page shows each in red"
    return doc, text, lines


@pytest.mark.slow
def test_metrics_health_and_status_follow_the_newest_dump_until_a_newer_one_passes(tmp_path: Path) -> None:
    settings = Settings(backup_dir=str(tmp_path / "backups"), broker_url="memory://")
    storage = LocalStorage(Path(settings.backup_dir))
    storage.ensure()
    now = utcnow()

    def taken(hours_ago: float) -> Manifest:
        m = dump((NOW - (now - timedelta(hours=hours_ago))) / timedelta(days=1))  # against the real clock
        save_new(storage, m)
        storage.put_bytes(m.path, b"x" * m.size_bytes)
        return m

    def record(m: Manifest, ok: bool, hours_ago: float) -> str:
        at = isoformat(now - timedelta(hours=hours_ago))
        record_verification(storage, m.id, verdict(ok, at))
        return at

    older = taken(50)
    record(older, True, 49)
    newest = taken(3)
    failed_at = record(newest, False, 2.5)
    record(older, True, 1)  # the older dump verified again, later: it says nothing about the newest

    assert metric(settings, "backup_tasks_last_verification_success") == 0
    assert metric(settings, "backup_tasks_last_verification_timestamp_seconds") == parse_time(failed_at).timestamp()
    code, problems = health(settings)
    assert code == 1 and problems == [f"newest backup {newest.id} failed verification: public.orders: 9986 rows "
                                      f"in the manifest, 9985 restored"]
    doc, text, red = status(settings)
    shown = doc["newest_dump"]
    assert isinstance(shown, dict) and shown["id"] == newest.id
    assert shown["series_verdict"]["backup_id"] == newest.id and shown["series_verdict"]["ok"] is False
    assert "VERIFICATION FAILED: public.orders" in text
    assert red == [f"dump {newest.id} failed verification: public.orders: 9986 rows in the manifest, 9985 restored"]

    # A newer dump, not verified yet (its verify task may still run): the failure still stands everywhere.
    pending = taken(0.2)
    assert metric(settings, "backup_tasks_last_verification_success") == 0
    code, problems = health(settings)
    assert code == 1 and len(problems) == 1
    assert f"backup {newest.id} failed verification" in problems[0] and pending.id in problems[0]
    doc, text, red = status(settings)
    assert f"NOT VERIFIED, and {newest.id} before it FAILED VERIFICATION: public.orders" in text
    assert red and red[0].startswith(f"dump {newest.id} failed verification and no newer dump has passed since")

    # It passes: green everywhere.
    passed_at = record(pending, True, 0.1)
    assert metric(settings, "backup_tasks_last_verification_success") == 1
    assert metric(settings, "backup_tasks_last_verification_timestamp_seconds") == parse_time(passed_at).timestamp()
    assert health(settings) == (0, [])
    doc, text, red = status(settings)
    assert "verified ok" in text and "FAILED" not in text and red == []
