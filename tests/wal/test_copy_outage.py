"""An outage of the S3 copy during a steady write load: the server never waits on it, the copy catches up.

A throwaway cluster archives with ``wal-push --copy-to s3://... --copy-timeout 2`` into a moto S3
server of this test's own, while a writer commits and switches segments a few times a second. Then
the S3 server is frozen (SIGSTOP: connections are accepted and never answered, the worst kind of
outage) for a while, and thawed. Judged as the issue states it: the archiver never fails, pg_wal
stays within a few segments of normal, every segment reaches the local archive, the metrics show
the backlog and the copy behind, ``health`` runs and reports it; after the endpoint returns,
``wal-ship`` brings the copy to every segment (within five minutes; here, seconds).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backup_tasks.postgres.cluster import ThrowawayCluster
from backup_tasks.postgres.connect import connect
from backup_tasks.postgres.servercmd import archive_command
from backup_tasks.storage.locations import open_storage
from backup_tasks.wal.layout import object_key
from backup_tasks.wal.names import segment_number
from tests.support.pitr import PitrEnv, cli_env, reachable_dir, run_cli
from tests.support.s3 import S3Server, start_moto

COPY_TIMEOUT = 2
#: Long enough for several segments behind the backlog, short enough to keep the test quick.
OUTAGE_SECONDS = 12
SEGMENT = 16 << 20


@pytest.fixture
def frozen_s3(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], S3Server]]:
    """A moto server of this test's own: freezing it must not stall any other test's bucket."""
    proc, server = start_moto(tmp_path / "moto.log")
    try:
        yield proc, server
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait()


class Load:
    """Commits about 1 MiB of rows and switches the WAL segment every ``interval`` seconds, in a thread."""

    def __init__(self, conninfo: object, interval: float = 0.25) -> None:
        self.conninfo = conninfo
        self.interval = interval
        self.stop = threading.Event()
        self.switches = 0
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        with connect(self.conninfo) as conn:  # type: ignore[arg-type]
            conn.execute("CREATE TABLE IF NOT EXISTS ticks (at timestamptz DEFAULT now(), v text)")
            while not self.stop.is_set():
                conn.execute("INSERT INTO ticks (v) SELECT md5(g::text) || repeat('x', 200) "
                             "FROM generate_series(1, 4000) g")
                conn.execute("SELECT pg_switch_wal()")
                self.switches += 1
                self.stop.wait(self.interval)


class Watch:
    """Samples the server while the test runs: archiver failures, files waiting in pg_wal, segments archived."""

    def __init__(self, conninfo: object, data_dir: Path, archive_root: Path) -> None:
        self.conninfo = conninfo
        self.status = data_dir / "pg_wal" / "archive_status"
        self.archive_root = archive_root
        self.waiting: list[int] = []

    def ready(self) -> int:
        return sum(1 for entry in os.listdir(self.status) if entry.endswith(".ready"))

    def sample_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.waiting.append(self.ready())
            time.sleep(0.1)

    def archiver(self) -> tuple[int, str | None]:
        with connect(self.conninfo) as conn:  # type: ignore[arg-type]
            failed, last = conn.execute("SELECT failed_count, last_archived_wal FROM pg_stat_archiver").fetchone()
        return int(failed), last


def metrics(env: dict[str, str]) -> dict[str, float]:
    result = run_cli("metrics", "--json", env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    values = {}
    for name, samples in json.loads(result.stdout)["metrics"].items():
        for sample in samples:
            label = sample["labels"].get("location")
            values[f"{name}{{{label}}}" if label else name] = sample["value"]
    return values


def archived_segments(root: Path) -> list[str]:
    return sorted(p.name.removesuffix(".zst") for p in root.glob("0*/0*.zst") if len(p.name) == 28)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the server as the postgres user")
def test_a_copy_outage_under_load_never_holds_the_server_and_the_copy_catches_up(
        frozen_s3: tuple[subprocess.Popen[bytes], S3Server], monkeypatch: pytest.MonkeyPatch) -> None:
    moto, s3 = frozen_s3
    for name in list(os.environ):
        if name.startswith(("AWS_", "BACKUP_OBJECT_LOCK_")):
            monkeypatch.delenv(name)
    for name, value in s3.env().items():  # the server inherits them: archive_command reaches the bucket
        monkeypatch.setenv(name, value)
    copy_to = f"s3://{s3.new_bucket()}/offsite"
    env = PitrEnv(reachable_dir("bt-test-outage-"))
    try:
        command = archive_command(env.command, env.archive.root, copy_to=copy_to).replace(
            " %p", f" --copy-timeout {COPY_TIMEOUT} %p")
        cli = cli_env(env.settings, BACKUP_COPY_TO=copy_to, BACKUP_COPY_TIMEOUT_SECONDS=str(COPY_TIMEOUT),
                      **s3.env())
        with ThrowawayCluster(settings={"wal_level": "replica", "archive_mode": "on", "archive_timeout": "0",
                                        "archive_command": shlex.quote(command)}) as cluster:
            watch = Watch(cluster.conninfo(), cluster.data_dir, env.archive.root)
            load = Load(cluster.conninfo())
            load.thread.start()
            load_started = time.monotonic()
            try:
                # Fair weather: every segment in both places before wal-push answers.
                watch.sample_for(5)
                normal = max(watch.waiting)
                failed_before, _ = watch.archiver()
                assert archived_segments(env.archive.root), cluster.server_log()[-2000:]

                # The outage: the endpoint accepts connections and never answers.
                moto.send_signal(signal.SIGSTOP)
                outage_started = time.monotonic()
                watch.waiting.clear()
                watch.sample_for(OUTAGE_SECONDS)
                during = metrics(cli)
                health = run_cli("health", "--json", env=cli, timeout=120)
                failed_during, _ = watch.archiver()
                outage = time.monotonic() - outage_started
                worst, settled = max(watch.waiting), max(watch.waiting[-30:])  # the last 3 s of the outage
            finally:
                moto.send_signal(signal.SIGCONT)
                load.stop.set()
                load.thread.join(timeout=30)
                load_seconds = time.monotonic() - load_started
            assert failed_during == failed_before, f"archive_command failed: {cluster.server_log()[-3000:]}"
            # The first push waits out the bound once; then archiving runs at local speed again.
            assert settled <= normal + 3 and worst <= normal + 10, \
                f"pg_wal held {worst} segments waiting, {settled} at the end (normally {normal}): {watch.waiting}"
            assert during["backup_tasks_wal_copy_backlog_segments"] >= 3, during
            assert during["backup_tasks_wal_copy_backlog_bytes"] > 0
            assert during["backup_tasks_wal_copy_backlog_oldest_age_seconds"] > OUTAGE_SECONDS / 2
            assert during["backup_tasks_wal_last_archived_timestamp_seconds{copy}"] < \
                during["backup_tasks_wal_last_archived_timestamp_seconds{archive}"], "the copy shows behind"
            report = json.loads(health.stdout)  # it ran and judged, although the copy hangs
            assert health.returncode == 1 and report["wal"]["copy"]["reachable"] is False, health.stderr
            assert report["wal"]["copy"]["backlog"]["files"] >= 3
            assert any("cannot be reached" in p for p in report["problems"]), report["problems"]

            # Everything the server completed is in the local archive, with no hole.
            with connect(cluster.conninfo()) as conn:
                last = str(conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0])
            deadline = time.monotonic() + 60
            while watch.archiver()[1] != last:
                assert time.monotonic() < deadline, cluster.server_log()[-2000:]
                time.sleep(0.2)
            assert watch.archiver()[0] == failed_before
            local = archived_segments(env.archive.root)
            numbers = [segment_number(name, SEGMENT) for name in local]
            assert numbers == list(range(numbers[0], numbers[-1] + 1)) and local[-1] == last

            # The endpoint is back: wal-ship sends the backlog; the copy then holds every segment.
            began = time.monotonic()
            shipped = run_cli("wal-ship", "--json", env=cli, timeout=300)
            catch_up = time.monotonic() - began
            document = json.loads(shipped.stdout)
            assert shipped.returncode in (0, 1), shipped.stderr
            if shipped.returncode == 1:  # a wal-push was shipping meanwhile: once more
                shipped = run_cli("wal-ship", "--json", env=cli, timeout=300)
                document = json.loads(shipped.stdout)
            assert shipped.returncode == 0 and document["remaining"]["files"] == 0, document
            copy = open_storage(f"{copy_to}/wal", setting="BACKUP_COPY_TO")
            held = {info.key for info in copy.list()}
            assert [name for name in local if object_key(name) not in held] == []
            for name in local[-3:]:
                assert copy.read_bytes(object_key(name)) == env.archive.path_for(name).read_bytes()
            after = metrics(cli)
            assert after["backup_tasks_wal_copy_backlog_segments"] == 0
            assert after["backup_tasks_wal_last_archived_timestamp_seconds{copy}"] == \
                after["backup_tasks_wal_last_archived_timestamp_seconds{archive}"]
            assert catch_up < 300
            backlog = during["backup_tasks_wal_copy_backlog_segments"]
            backlog_mib = during["backup_tasks_wal_copy_backlog_bytes"] / 2**20
            print(f"\nsegments switched {load.switches} ({load.switches / load_seconds:.1f}/s); outage {outage:.1f}s; "
                  f"pg_wal waiting normally <= {normal}, during the outage <= {worst}; backlog {backlog:.0f} files, "
                  f"{backlog_mib:.1f} MiB; catch-up {catch_up:.1f}s ({len(document['shipped'])} shipped)")
    finally:
        shutil.rmtree(env.base, ignore_errors=True)
