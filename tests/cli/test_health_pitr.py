"""``backup-tasks health`` on a real archiving PostgreSQL: a segment taken out of the archive is named as lost."""

from __future__ import annotations

import json
import shutil

import pytest

from backup_tasks.wal.names import segment_name, segment_number
from tests.support.pitr import Scenario, cli_env, run_cli, switch_and_wait


@pytest.mark.slow
def test_health_names_a_segment_lost_from_a_real_archive(scenario: Scenario) -> None:
    archive, snapshot = scenario.env.archive, scenario.snapshot
    conninfo = scenario.source.conninfo()
    switch_and_wait(conninfo, archive)
    newest = switch_and_wait(conninfo, archive)  # the snapshot's WAL now has a middle
    env = cli_env(scenario.settings)

    before = run_cli("health", "--json", env=env)
    document = json.loads(before.stdout)
    wal = document["wal"]
    assert (wal["from"], wal["to"], wal["lost"]) == (snapshot.start_segment, newest, [])
    assert wal["timeline"] == wal["server_timeline"] == 1 and wal["server_error"] is None
    assert document["snapshot"]["newest"] == snapshot.id and document["snapshot"]["pitr"] is True
    # The scenario takes no dump: that is its only problem.
    assert before.returncode == 1 and document["problems"] == ["no backup found in the catalog"]

    size = int(snapshot.wal_segment_size or 0)
    victim = segment_name(1, segment_number(str(snapshot.start_segment), size) + 1, size)
    stored = archive.path_for(victim)
    aside = scenario.env.base / "aside.zst"
    shutil.move(stored, aside)
    try:
        after = run_cli("health", "--json", env=env)
        document = json.loads(after.stdout)
        assert after.returncode == 1
        assert document["wal"]["lost"] == [{"from": victim, "to": victim, "segments": 1}]
        assert [p for p in document["problems"] if victim in p] == [
            f"WAL segment {victim} lost: missing from the archive {archive.root} while later segments are there "
            f"(recovery from an older snapshot stops before it)"]
        human = run_cli("health", env=env)
        assert human.returncode == 1 and any(victim in line for line in human.stdout.splitlines()[1:])
    finally:
        shutil.move(aside, stored)
