"""Throwaway clusters and scratch directories of killed runs: found, stopped and removed by the next run.

A run killed outright (SIGKILL of its process group) cleans up nothing, and pg_ctl started its
postmaster in a session of its own, so the kill does not reach it. The next cluster start sweeps.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backup_tasks.postgres.cluster import DIR_PREFIX, ThrowawayCluster
from backup_tasks.postgres.leftovers import (
    OWNER_FILE,
    UNKNOWN_OWNER_SECONDS,
    Owner,
    owned_tempdir,
    process_alive,
    processes_in,
    stop_processes_in,
    sweep,
)
from backup_tasks.postgres.template import TemplateCache
from tests.support.paths import ROOT

# A process that starts a throwaway cluster in ``parent``, says where, and waits to be killed.
START_AND_WAIT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from backup_tasks.postgres.cluster import ThrowawayCluster
    cluster = ThrowawayCluster(parent_dir=Path(sys.argv[1])).start()
    pid = (cluster.data_dir / "postmaster.pid").read_text().split()[0]
    print(cluster.root, pid, flush=True)
    time.sleep(600)
""")


@pytest.fixture
def parent() -> Iterator[Path]:
    """A short directory the postgres OS user can enter (socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="bt-sweep-"))
    os.chmod(path, 0o711)
    yield path
    stop_processes_in(path)  # a postmaster the test left (it failed): immediate shutdown, as the sweep does
    subprocess.run(["rm", "-rf", str(path)], check=False)


def postgres_processes_in(path: Path) -> list[int]:
    """Processes working in ``path`` (cwd: the postmaster and every backend) or naming it (pg_ctl, initdb)."""
    found = set(processes_in(path))
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cwd = os.readlink(f"/proc/{entry}/cwd")
            except OSError:
                continue
            if cwd == str(path) or cwd.startswith(f"{path}/"):
                found.add(int(entry))
    return sorted(found)


@pytest.mark.slow
def test_the_cluster_of_a_killed_run_is_stopped_and_removed_by_the_next_start(parent: Path) -> None:
    run = subprocess.Popen([sys.executable, "-c", START_AND_WAIT, str(parent)], stdout=subprocess.PIPE, text=True,
                           cwd=ROOT, start_new_session=True)
    assert run.stdout is not None
    root_text, postmaster = run.stdout.readline().split()
    dead_root, postmaster_pid = Path(root_text), int(postmaster)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    time.sleep(0.2)
    assert process_alive(postmaster_pid), "the postmaster outlives the killed run: what the sweep is for"
    assert dead_root.name.startswith(DIR_PREFIX) and dead_root.name.endswith(f".{run.pid}")

    with ThrowawayCluster(parent_dir=parent) as cluster:
        assert not process_alive(postmaster_pid), "the next start stopped the dead run's postmaster"
        assert not dead_root.exists(), "and removed its directory"
        assert postgres_processes_in(dead_root) == []
        assert cluster.root is not None and cluster.root.exists()
        assert Owner.parse((cluster.root / OWNER_FILE).read_text()) == Owner.this_process()
        assert postgres_processes_in(cluster.root), "a live run's cluster is left alone"
    assert os.listdir(parent) == []


def test_a_live_owner_keeps_its_directory_a_dead_or_reused_pid_does_not(parent: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    here = Owner.this_process()
    mine = owned_tempdir("bt-scratch-", parent)
    dead = owned_tempdir("bt-scratch-", parent)
    (dead / OWNER_FILE).write_text(Owner(gone.pid, here.start, here.boot, here.pid_namespace).record())
    reused = owned_tempdir("bt-scratch-", parent)  # our pid, but recorded with another start time: another process
    (reused / OWNER_FILE).write_text(Owner(here.pid, "1", here.boot, here.pid_namespace).record())
    rebooted = owned_tempdir("bt-scratch-", parent)
    (rebooted / OWNER_FILE).write_text(Owner(here.pid, here.start, "another-boot", here.pid_namespace).record())
    # Killed between its mkdir and its record: the pid in the name is all there is.
    unrecorded_dead = Path(tempfile.mkdtemp(prefix="bt-scratch-", suffix=f".{gone.pid}", dir=parent))
    unrecorded_live = Path(tempfile.mkdtemp(prefix="bt-scratch-", suffix=f".{os.getpid()}", dir=parent))
    assert sorted(sweep(parent, "bt-scratch-")) == sorted([dead, reused, rebooted, unrecorded_dead])
    assert sorted(parent.iterdir()) == sorted([mine, unrecorded_live])


def test_another_pid_namespace_is_not_judged_and_an_unknown_owner_waits_an_hour(parent: Path) -> None:
    elsewhere = owned_tempdir("bt-scratch-", parent)
    (elsewhere / OWNER_FILE).write_text(Owner(1 << 22, "1", None, "pid:[1]").record())
    legacy = Path(tempfile.mkdtemp(prefix="bt-scratch-", dir=parent))  # an older version's name: no owner
    assert sweep(parent, "bt-scratch-") == []
    old = time.time() - UNKNOWN_OWNER_SECONDS - 60
    os.utime(legacy, (old, old))
    assert sweep(parent, "bt-scratch-") == [legacy]
    assert elsewhere.exists()


def test_a_template_build_of_a_killed_run_is_removed_by_the_next_use_of_the_cache(parent: Path) -> None:
    cache = TemplateCache(parent / "cache")
    assert cache.usable_root()
    build = owned_tempdir(".build-", cache.root)
    (build / OWNER_FILE).write_text(Owner(1 << 22).record())  # no such pid
    live = owned_tempdir(".build-", cache.root)
    aside = cache.root / f".bad-{os.urandom(4).hex()}.{1 << 22}"
    aside.mkdir()
    cache.clear_abandoned()
    assert sorted(p.name for p in cache.root.iterdir()) == [live.name]
