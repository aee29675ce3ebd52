"""Nothing outlives a killed run: SIGKILL of ``backup-tasks`` (its whole process group, as a supervisor
stopping it does) at any moment, then a normal rerun, leaves no server, no process, no scratch
directory in TMPDIR and nothing partial in the catalog, and every complete backup still verifies.

Every run is a real CLI subprocess in a session of its own with TMPDIR set to a directory of the
test's, so what it leaves there can be checked exactly.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from backup_tasks.catalog import manifest as catalog
from backup_tasks.catalog.ids import backup_id_of, dump_key, snapshot_keys
from backup_tasks.catalog.leftovers import clear_interrupted
from backup_tasks.conninfo import ConnInfo
from backup_tasks.logical.dump import run_dump
from backup_tasks.physical.snapshot import SHM, STAGING_PREFIX
from backup_tasks.postgres.cluster import DIR_PREFIX, ThrowawayCluster
from backup_tasks.postgres.connect import connect
from backup_tasks.postgres.leftovers import process_alive, stop_processes_in
from backup_tasks.postgres.sampledata import generate
from backup_tasks.settings import Settings
from backup_tasks.storage.base import PARTIAL_MARK
from backup_tasks.storage.locations import open_storage
from backup_tasks.storage.memory import MemoryStorage
from backup_tasks.storage.mirrored import MirroredStorage
from backup_tasks.wal.system import IDENTITY_KEY
from tests.support.paths import PYTHON, ROOT
from tests.support.pitr import PitrEnv, cli_env, reachable_dir, switch_and_wait

#: What the test's TMPDIR may hold after any run, by design: the file locks and the initdb template cache.
LOCKS, TEMPLATES = f"backup-tasks-locks-{os.getuid()}", f"backup-tasks-initdb-cache-{os.geteuid()}"


@dataclass
class Source:
    """A small trading database on a throwaway server archiving WAL into its backup directory's archive."""

    env: PitrEnv
    cluster: ThrowawayCluster
    settings: Settings
    tmpdir: Path  # TMPDIR of every run
    killed: list[int] = field(default_factory=list)  # pids (= session ids) of the runs killed

    def cli_env(self, **extra: str) -> dict[str, str]:
        return cli_env(self.settings, TMPDIR=str(self.tmpdir), **extra)

    def run(self, *args: str, env: dict[str, str] | None = None) -> dict:
        result = subprocess.run([PYTHON, "-m", "backup_tasks.cli", *args, "--json"], env=env or self.cli_env(),
                                cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 0, (args, result.stdout[-2000:], result.stderr[-2000:])
        return json.loads(result.stdout)

    def kill_when(self, args: list[str], moment: Callable[[], bool], *, timeout: float = 60,
                  env: dict[str, str] | None = None, group: bool = True) -> bool:
        """Start ``backup-tasks ARGS`` and SIGKILL its process group (or, not ``group``, the process alone, as
        Celery's hard time limit does) once ``moment()``; False if it finished first."""
        run = subprocess.Popen([PYTHON, "-m", "backup_tasks.cli", *args], env=env or self.cli_env(), cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.killed.append(run.pid)
        deadline = time.monotonic() + timeout
        try:
            while not moment():
                if run.poll() is not None:
                    return False
                assert time.monotonic() < deadline, f"{args}: the moment to kill never came"
                time.sleep(0.001)
            (os.killpg if group else os.kill)(run.pid, signal.SIGKILL)
            return True
        finally:
            run.wait()


@pytest.fixture
def source() -> Iterator[Source]:
    env = PitrEnv(reachable_dir("bt-test-killed-"))
    tmpdir = reachable_dir("bt-kt-")  # short: the clusters' socket paths must stay under 107 bytes
    try:
        with env.archiving_cluster() as cluster:
            generate(cluster.conninfo(), signals=2000)
            with connect(cluster.conninfo()) as conn:  # enough to stream for a while
                conn.execute("CREATE TABLE ticks AS SELECT g AS id, md5(g::text) AS payload "
                             "FROM generate_series(1, 300000) g")
            yield Source(env, cluster, env.for_cluster(cluster), tmpdir)
    finally:
        stop_processes_in(tmpdir)  # what a failed test left: postmasters by immediate shutdown, as the sweep does
        shutil.rmtree(tmpdir, ignore_errors=True)
        shutil.rmtree(env.base, ignore_errors=True)


# --- what a dead run may have left ---------------------------------------------------------------------

def processes_of(tmpdir: Path, sessions: list[int]) -> list[int]:
    """Processes of ours: in a killed run's session, working in TMPDIR (a postmaster and its backends: their
    cwd) or naming a path there or a snapshot staging tree (pg_ctl, initdb, wal-fetch, pg_basebackup)."""
    found = []
    staging = f"{SHM}/{STAGING_PREFIX}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            cwd = ""  # another user's, without the right to look: its command line still tells
        session = int(stat[stat.rindex(")") + 2:].split()[4])
        if session in sessions or cwd == str(tmpdir) or cwd.startswith(f"{tmpdir}/") \
                or os.fsencode(f"{tmpdir}/") in cmdline or staging in cmdline:
            found.append(int(entry))
    return found


def left_in_tmpdir(source: Source) -> list[str]:
    """What runs left in TMPDIR and /dev/shm beyond the locks and the template cache (and, in it, no build)."""
    left = sorted(name for name in os.listdir(source.tmpdir) if name not in (LOCKS, TEMPLATES))
    cache = source.tmpdir / TEMPLATES
    if cache.is_dir():
        left += [f"{cache.name}/{name}" for name in os.listdir(cache) if name.startswith(".")]
    if os.path.isdir(SHM):
        left += [f"{SHM}/{name}" for name in os.listdir(SHM) if name.startswith(STAGING_PREFIX)
                 and name.rpartition(".")[2] in {str(pid) for pid in source.killed}]
    return left


def partial_or_orphaned(backup_dir: Path) -> list[str]:
    """Partial objects of dead writers anywhere in the backup directory (the WAL archive's too), and objects
    of the catalog stored for a backup without a manifest."""
    bad = sorted(str(path.relative_to(backup_dir)) for path in backup_dir.rglob(f"*{PARTIAL_MARK}*")
                 if not being_written(path))
    names = {entry.name for entry in os.scandir(backup_dir) if entry.is_file()}
    for name in names - set(bad):
        backup_id = backup_id_of(name, "snapshot") or backup_id_of(name, "dump")
        if backup_id is not None and catalog.manifest_key(backup_id) not in names:
            bad.append(name)
    return bad


def being_written(partial: Path) -> bool:
    """Whether a live writer holds ``partial`` (its flock): the source archiving a segment right now, say."""
    try:
        fd = os.open(partial, os.O_RDONLY)
    except OSError:
        return True  # gone meanwhile: published or aborted by its writer
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def wait_gone(source: Source) -> None:
    """Until what the reruns themselves started in the background (a staging tree's ``rm -rf``) is done."""
    deadline = time.monotonic() + 10
    while processes_of(source.tmpdir, source.killed) and time.monotonic() < deadline:
        time.sleep(0.05)


def running_cluster(tmpdir: Path) -> tuple[Path, int] | None:
    """A throwaway cluster in ``tmpdir`` that accepts connections: its directory and postmaster pid."""
    for root in tmpdir.glob(f"{DIR_PREFIX}*"):
        try:
            lines = (root / "data" / "postmaster.pid").read_text().splitlines()
        except OSError:
            continue
        if len(lines) >= 8 and lines[7].strip() == "ready":  # postmaster.pid's status line
            return root, int(lines[0])
    return None


# --- what the next snapshot or dump clears, judged from BACKUP_DIR alone ----------------------------------

def test_what_an_interrupted_snapshot_stored_goes_but_nothing_of_a_shared_copy_or_of_dumps() -> None:
    primary, copy = MemoryStorage("backups"), MemoryStorage("copy")
    storage = MirroredStorage(primary, copy)
    complete, killed = "db-snapshot-20261127T100000Z", "db-snapshot-20261127T110000Z"
    for backup_id in (complete, killed):
        for key in snapshot_keys(backup_id).values():
            storage.put_bytes(key, b"data")
    storage.put_bytes(catalog.manifest_key(complete), b"{}")
    others = "db-snapshot-20261127T120000Z.base.tar.zst"  # another deployment sharing the copy, mid-snapshot
    copy.put_bytes(others, b"data")
    storage.put_bytes("db-dump-20261127T110000Z.dump.zst", b"data")  # a dump's: not the snapshot's business
    writer = storage.writer(snapshot_keys("db-snapshot-20261127T130000Z")["base"])
    writer.write(b"half")
    del writer  # its process died: the partial stays until someone clears it

    clear_interrupted(storage, "db", "snapshot")
    for member in (primary, copy):
        keys = {obj.key for obj in member.list()}
        assert set(snapshot_keys(complete).values()) <= keys
        assert not any(key.startswith(killed) for key in keys), keys
        assert "db-dump-20261127T110000Z.dump.zst" in keys
        assert member.clear_partials() == []
    assert copy.exists(others)
    assert backup_id_of(f"{complete}.base.tar.zst.age", "snapshot") == complete
    assert backup_id_of("x.manifest.json", "snapshot") is None
    assert backup_id_of(f"{complete}.dump.zst", "snapshot") is None


def test_what_an_interrupted_dump_stored_goes_but_not_a_shared_copys_a_live_writers_or_another_databases() -> None:
    primary, copy = MemoryStorage("backups"), MemoryStorage("copy")
    storage = MirroredStorage(primary, copy)
    complete, killed, killed_encrypted = ("db-dump-20261127T100000Z", "db-dump-20261127T110000Z",
                                          "db-dump-20261127T111500Z")
    kept = [dump_key(complete, "zstd"), catalog.manifest_key(complete)]
    for key in (*kept, dump_key(killed, "zstd"), dump_key(killed_encrypted, "gzip", encrypted=True)):
        storage.put_bytes(key, b"data")
    others = dump_key("db-dump-20261127T120000Z", "zstd")  # another deployment sharing the copy, mid-dump
    copy.put_bytes(others, b"data")
    # A database whose name merely starts like this one's ids, between its dump's data and its manifest.
    alike = dump_key("db-dump-x-dump-20261127T110000Z", "zstd")
    snapshot = snapshot_keys("db-snapshot-20261127T110000Z")["base"]  # a snapshot's: not the dump's business
    for key in (alike, snapshot):
        storage.put_bytes(key, b"data")
    live = storage.writer(dump_key("db-dump-20261127T130000Z", "zstd"))  # its writer still runs
    live.write(b"half")
    dead = storage.writer(dump_key("db-dump-20261127T140000Z", "zstd"))
    dead.write(b"half")
    del dead  # its process died: the partial stays until someone clears it

    clear_interrupted(storage, "db", "dump")
    for member in (primary, copy):
        keys = {obj.key for obj in member.list()}
        assert set(kept) | {alike, snapshot} <= keys, keys
        assert not any(key.startswith((killed, killed_encrypted)) for key in keys), keys
    assert copy.exists(others)
    live.commit()  # its partial survived in both locations
    assert primary.exists(dump_key("db-dump-20261127T130000Z", "zstd"))
    assert primary.clear_partials() == [] and copy.clear_partials() == []
    assert backup_id_of(f"{killed_encrypted}.dump.gz.age", "dump", database="db") == killed_encrypted
    assert backup_id_of(alike, "dump", database="db") is None and backup_id_of(snapshot, "dump") is None


@pytest.mark.slow
def test_the_next_dump_removes_a_dump_stored_without_its_manifest(
        trading_db: ConnInfo, settings_for: Callable[..., Settings]) -> None:
    settings = settings_for(trading_db)
    interrupted, _ = run_dump(settings)
    storage = open_storage(settings.backup_dir)
    storage.delete(interrupted.key)  # as if killed between the dump's data commit and its manifest
    time.sleep(1.05)  # ids have second resolution
    manifest, _ = run_dump(settings)
    assert interrupted.files and manifest.files  # the dump and its cluster objects (roles, database properties)
    assert not any(storage.exists(key) for key in interrupted.files)
    assert sorted(obj.key for obj in storage.list()) == sorted([*manifest.files, manifest.key, IDENTITY_KEY])


# --- each leftover of the issue, caught in the act ----------------------------------------------------------

@pytest.mark.slow
def test_a_killed_verify_leaves_a_server_that_the_next_verify_stops_and_removes(source: Source) -> None:
    source.run("dump")
    found: dict[str, tuple[Path, int]] = {}

    def cluster_up() -> bool:
        up = running_cluster(source.tmpdir)
        if up is not None:
            found["cluster"] = up
        return up is not None

    assert source.kill_when(["verify"], cluster_up)
    root, postmaster = found["cluster"]
    time.sleep(0.3)
    assert process_alive(postmaster), "the postmaster survives the kill of the run's process group"

    report = source.run("verify")
    assert report["ok"], report
    assert not process_alive(postmaster), "the next verify stopped the killed run's server"
    assert not root.exists(), "and removed its directory"
    wait_gone(source)
    assert processes_of(source.tmpdir, source.killed) == []
    assert left_in_tmpdir(source) == []


@pytest.mark.slow
def test_a_killed_snapshot_leaves_a_partial_that_the_next_snapshot_clears(source: Source) -> None:
    backup_dir = Path(source.settings.backup_dir)
    backup_dir.mkdir(parents=True, exist_ok=True)

    def uploading() -> bool:
        return any("base.tar.zst" in name and PARTIAL_MARK in name for name in os.listdir(backup_dir))

    assert source.kill_when(["snapshot"], uploading)
    assert partial_or_orphaned(backup_dir), "the killed run left its partial base.tar.zst"

    report = source.run("snapshot")
    assert partial_or_orphaned(backup_dir) == []
    assert catalog.load(open_storage(str(backup_dir)), report["id"]).state == "complete"
    wait_gone(source)
    assert processes_of(source.tmpdir, source.killed) == []
    assert left_in_tmpdir(source) == []


@pytest.mark.slow
def test_a_snapshot_killed_after_storing_its_objects_leaves_nothing_after_the_next(source: Source) -> None:
    """Killed during pg_verifybackup: base and WAL are stored, the manifest is not. The next run removes them."""
    backup_dir = Path(source.settings.backup_dir)
    backup_dir.mkdir(parents=True, exist_ok=True)

    def verifying() -> bool:
        return any(name.endswith(".backup_manifest") for name in os.listdir(backup_dir))

    assert source.kill_when(["snapshot"], verifying)
    left = partial_or_orphaned(backup_dir)
    assert any(name.endswith(".base.tar.zst") for name in left), left

    source.run("snapshot")
    assert partial_or_orphaned(backup_dir) == []
    wait_gone(source)
    assert processes_of(source.tmpdir, source.killed) == []
    assert left_in_tmpdir(source) == []


# --- the series -----------------------------------------------------------------------------------

COMMANDS = (["dump"], ["snapshot"], ["prune"], ["verify"], ["verify", "--snapshot"])
KILLS = 12


@pytest.mark.slow
def test_a_series_of_kills_at_random_moments_each_followed_by_a_normal_rerun(source: Source) -> None:
    """Twelve SIGKILLs at random moments (seeded) of dump, snapshot, prune and verify, mostly of the whole
    process group, each followed by a normal rerun: after each rerun and at the end nothing partial or
    orphaned is in the catalog, no server or child process of ours runs and nothing of ours is left in
    TMPDIR; at the end every complete backup verifies."""
    env = source.cli_env(BACKUP_KEEP_WEEKLY="2")  # prune has snapshots and WAL to delete
    backup_dir = Path(source.settings.backup_dir)
    durations = {}
    for args in COMMANDS:  # a normal run of each first: a catalog to work on, and how long each takes
        started = time.monotonic()
        source.run(*args, env=env)
        durations[" ".join(args)] = time.monotonic() - started
    rng = random.Random(18)
    outcomes: list[str] = []
    kills = 0
    while kills < KILLS:
        assert len(outcomes) < 2 * KILLS, "runs keep finishing before the moment chosen to kill them"
        args = rng.choice(COMMANDS)
        delay = rng.uniform(0.05, durations[" ".join(args)] * 0.9)
        group = rng.random() < 0.75  # else the process alone: its children (pg_basebackup...) live on
        started = time.monotonic()
        killed = source.kill_when(args, lambda started=started, delay=delay: time.monotonic() - started >= delay,
                                  env=env, group=group)
        kills += killed
        with connect(source.cluster.conninfo()) as conn:  # the trading day goes on
            conn.execute("INSERT INTO ticks SELECT g, md5(g::text) FROM generate_series(1, 1000) g")
        left = partial_or_orphaned(backup_dir) + left_in_tmpdir(source)
        survivors = len(processes_of(source.tmpdir, source.killed))
        if args == ["dump"]:  # dump ids have second resolution: one that finished this second would be taken
            time.sleep(1 - time.time() % 1)
        source.run(*args, env=env)
        outcomes.append(f"{' '.join(args):<18} {'group' if group else 'pid':<5} killed after {delay:4.2f}s: "
                        f"{killed!s:<5} left {survivors} process(es) and {left}")
        # The rerun cleared what the killed run left: nothing partial, no process, nothing in TMPDIR.
        wait_gone(source)
        assert (partial_or_orphaned(backup_dir), processes_of(source.tmpdir, source.killed),
                left_in_tmpdir(source)) == ([], [], []), outcomes[-1]
    print("\n" + "\n".join(outcomes))

    switch_and_wait(source.cluster.conninfo(), source.env.archive)
    storage = open_storage(str(backup_dir))
    for manifest in catalog.catalog(storage):
        report = source.run("verify", *(["--snapshot"] if manifest.kind == "snapshot" else []), manifest.id, env=env)
        assert report["ok"], (manifest.id, report)
    assert partial_or_orphaned(backup_dir) == []
    wait_gone(source)
    assert processes_of(source.tmpdir, source.killed) == []
    assert left_in_tmpdir(source) == []
