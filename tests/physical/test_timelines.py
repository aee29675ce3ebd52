"""Timelines, as an operator meets them: a restore that branched onto timeline 2 and kept archiving
into the same archive while the original server went on on timeline 1 (and took a snapshot there).

Each restore must bring back exactly the rows committed on the chosen timeline up to the target, as
the commit timestamps (``track_commit_timestamp``) of the server that lived that timeline say, or
refuse with a message saying what to do.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from backup_tasks.catalog import manifest as catalog
from backup_tasks.conninfo import ConnInfo
from backup_tasks.physical.snapshot import take_snapshot
from backup_tasks.postgres.cluster import ThrowawayCluster
from backup_tasks.postgres.connect import connect
from backup_tasks.settings import Settings
from tests.support.pitr import PitrEnv, cli_env, insert, marks, reachable_dir, run_cli, stop_restored, wait_archived

pytestmark = pytest.mark.slow


@dataclass
class Fork:
    env: PitrEnv
    settings: Settings  # the original server's (timeline 1)
    tl1: ConnInfo
    tl2: ConnInfo
    before_fork: catalog.Manifest  # S1: timeline 1, before the fork
    after_fork: catalog.Manifest  # S2: timeline 1, after timeline 2 forked off
    fork_time: str
    tl1_mid: str  # on timeline 1 after the fork, while timeline 2 covers that time too
    tl2_time: str  # on timeline 2
    tl1_late: str  # on timeline 1 after everything timeline 2 archived
    restored: list[Path]


def now(conninfo: ConnInfo) -> str:
    """The server's clock, after a pause: commits before it and after it never share a microsecond."""
    time.sleep(0.05)
    with connect(conninfo) as conn:
        moment = str(conn.execute("SELECT clock_timestamp()::text").fetchone()[0])
    time.sleep(0.05)
    return moment


def switch(conninfo: ConnInfo, env: PitrEnv) -> None:
    """Close the current segment (it holds the rows just written) and wait until it is archived."""
    with connect(conninfo) as conn:
        name = str(conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0])
    wait_archived(env.archive, name)


def committed_by(conninfo: ConnInfo, moment: str | None = None) -> list[int]:
    """The rows the timeline's own server committed by ``moment`` (all of them without one), by commit time."""
    with connect(conninfo) as conn:
        if moment is None:
            return [r[0] for r in conn.execute("SELECT id FROM marks ORDER BY id")]
        return [r[0] for r in conn.execute("SELECT id FROM marks WHERE pg_xact_commit_timestamp(xmin) <= "
                                           "%s::timestamptz ORDER BY id", (moment,))]


def restore(fork: Fork, *args: str, start: bool = True) -> tuple[int, dict, str]:
    data_dir = fork.env.base / f"restored-{len(fork.restored)}-{random.randrange(1 << 30)}"
    fork.restored.append(data_dir)
    result = run_cli("restore-pitr", "--json", "--data-dir", str(data_dir), *args, *(["--start"] if start else []),
                     env=cli_env(fork.settings))
    return result.returncode, json.loads(result.stdout) if result.stdout.strip() else {}, result.stderr


@pytest.fixture(scope="module")
def fork() -> Iterator[Fork]:
    """Timeline 1 with S1; a restore to a time after it promoted onto timeline 2, archiving into the same
    archive; timeline 1 goes on and takes S2 after the fork."""
    env = PitrEnv(reachable_dir("bt-test-timelines-"))
    restored: list[Path] = []
    # Both servers archive into env's archive, with commit timestamps kept.
    archiving = {**env.archiving_cluster().settings, "track_commit_timestamp": "on"}
    try:
        with ThrowawayCluster(settings=archiving) as source:
            tl1 = source.conninfo()
            settings = env.for_cluster(source)
            with connect(tl1) as conn:
                conn.execute("CREATE TABLE marks (id int PRIMARY KEY, phase text NOT NULL)")
            before_fork = take_snapshot(settings)
            insert(tl1, 1, 100, "before the fork")
            fork_time = now(tl1)
            insert(tl1, 101, 150, "timeline 1 after the fork")
            tl1_mid = now(tl1)
            switch(tl1, env)

            # The branch: restore to fork_time (no start), then run it archiving into the same archive.
            branch = env.base / "branch"
            result = run_cli("restore-pitr", "--json", "--data-dir", str(branch), "--target-time", fork_time,
                             "--keep-archiving", env=cli_env(settings))
            assert result.returncode == 0, result.stderr + result.stdout
            promoted = ThrowawayCluster(settings=archiving, prepare=lambda data_dir: shutil.move(branch, data_dir))
            with promoted:
                tl2 = promoted.conninfo()
                deadline = time.monotonic() + 120
                while True:
                    with connect(tl2) as conn:
                        if not conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                            break
                    assert time.monotonic() < deadline, promoted.server_log()[-2000:]
                    time.sleep(0.2)
                insert(tl2, 1001, 1020, "timeline 2")
                tl2_time = now(tl2)
                insert(tl2, 1021, 1030, "timeline 2, later")
                switch(tl2, env)

                insert(tl1, 151, 160, "timeline 1, before S2")
                after_fork = take_snapshot(settings)
                insert(tl1, 161, 170, "timeline 1 after S2")
                tl1_late = now(tl1)
                insert(tl1, 171, 180, "timeline 1, last")
                switch(tl1, env)
                yield Fork(env, settings, tl1, tl2, before_fork, after_fork, fork_time, tl1_mid, tl2_time,
                           tl1_late, restored)
    finally:
        stop_restored(restored)
        shutil.rmtree(env.base, ignore_errors=True)


def test_after_a_fork_each_restore_follows_the_timeline_of_its_target(fork: Fork) -> None:
    s1, s2 = fork.before_fork.id, fork.after_fork.id

    # list: S1 restores onto both timelines, S2 (taken on timeline 1 after the fork) onto timeline 1 only.
    listed = run_cli("list", "--json", env=cli_env(fork.settings))
    assert listed.returncode == 0, listed.stderr
    ranges = {(r["backup_id"], r["timeline"]): r for r in json.loads(listed.stdout)["restorable"]}
    assert set(ranges) == {(s1, 1), (s1, 2), (s2, 1)}, ranges
    assert all(r["wal_gap"] is None for r in ranges.values()), "the other branch's segments are no gap"
    assert ranges[(s1, 2)]["restorable_until"] < ranges[(s1, 1)]["restorable_until"]

    # The latest point: the newest timeline, from the snapshot before the fork.
    code, report, stderr = restore(fork)
    assert code == 0, stderr + json.dumps(report.get("notes"))
    assert (report["snapshot_id"], report["timeline"]) == (s1, 2)
    assert report["recovery_settings"]["recovery_target_timeline"] == "2"
    assert marks(report["port"]) == committed_by(fork.tl2)

    # A time on timeline 2.
    code, report, stderr = restore(fork, "--target-time", fork.tl2_time)
    assert code == 0, stderr + json.dumps(report.get("notes"))
    assert (report["snapshot_id"], report["timeline"]) == (s1, 2)
    assert marks(report["port"]) == committed_by(fork.tl2, fork.tl2_time)
    assert set(range(1001, 1021)) <= set(marks(report["port"])), "timeline 2's own rows"

    # A time on timeline 1 after the fork, which timeline 2 covers too: timeline 2 unless told otherwise.
    code, report, stderr = restore(fork, "--target-time", fork.tl1_mid, start=False)
    assert code == 0 and report["timeline"] == 2, stderr
    assert any("--timeline" in note for note in report["notes"]), report["notes"]
    code, report, stderr = restore(fork, "--target-time", fork.tl1_mid, "--timeline", "1")
    assert code == 0, stderr + json.dumps(report.get("notes"))
    assert (report["snapshot_id"], report["timeline"]) == (s1, 1)
    assert marks(report["port"]) == committed_by(fork.tl1, fork.tl1_mid) == list(range(1, 151))

    # A time on timeline 1 after everything timeline 2 archived: timeline 1, from the snapshot after the fork.
    code, report, stderr = restore(fork, "--target-time", fork.tl1_late)
    assert code == 0, stderr + json.dumps(report.get("notes"))
    assert (report["snapshot_id"], report["timeline"]) == (s2, 1)
    assert marks(report["port"]) == committed_by(fork.tl1, fork.tl1_late) == list(range(1, 171))

    # Refusals that say what to do.
    code, report, stderr = restore(fork, "--snapshot", s2, start=False)
    assert code == 1 and "forked off" in stderr and "--timeline" in stderr, stderr
    code, report, stderr = restore(fork, "--timeline", "9", start=False)
    assert code == 2 and "timeline" in stderr, stderr

