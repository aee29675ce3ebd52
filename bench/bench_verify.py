#!/usr/bin/env python3
"""Verify against the restore floor: how much does ``verify_backup`` add to a bare ``pg_restore``?

One dump of a generated trading database (default ``bt_bench_1100``, shared with ``run.py`` and made
when missing: ``support/databases.py``) is taken with ``run_dump`` into a temporary BACKUP_DIR. Then, in
interleaved rounds (the order alternates, each run starts on a quiet machine):

* ``floor``   a throwaway cluster is started and a database created (not timed), then
              ``zstd -dc ARCHIVE | pg_restore --single-transaction --exit-on-error -d DB`` is timed:
              the restore every verify must do, into a server that is already running;
* ``verify``  ``verify_backup`` end to end (checksum of every location, throwaway cluster, restore,
              row counts, amcheck, manifest record), timed, with its phases from the progress callback.

Prints the medians and ``verify / floor`` (the issue's goal: at most 1.2) and writes the runs as
JSON (``--json PATH``). Keep it to a few minutes: ``--rounds 3`` on 1.1 GB is about 3-4 minutes.

    flock -x /tmp/bt-machine.lock .venv/bin/python bench/bench_verify.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from support.databases import SERVER_URL, database_url, ensure_database
from support.measure import wait_for_quiet
from support.paths import work_directory

from backup_tasks.catalog.manifest import Manifest
from backup_tasks.conninfo import ConnInfo
from backup_tasks.logical.dump import run_dump
from backup_tasks.logical.verify import verify_backup
from backup_tasks.postgres.cluster import ThrowawayCluster
from backup_tasks.postgres.connect import connect
from backup_tasks.postgres.queries import create_database
from backup_tasks.postgres.tools import find_tool, tool_env
from backup_tasks.settings import Settings


def time_floor(archive: Path, work: Path) -> dict[str, Any]:
    """The bare restore into a cluster that is already up: what verify cannot go below."""
    pg_restore = find_tool("pg_restore")
    with ThrowawayCluster(parent_dir=work) as cluster:
        with connect(cluster.conninfo()) as admin:
            create_database(admin, "floor")
        target = cluster.conninfo("floor")
        started = time.monotonic()
        # zstd in its own process, as a shell pipeline would do it.
        with subprocess.Popen(["zstd", "-dc", "--", str(archive)], stdout=subprocess.PIPE) as unzstd:
            assert unzstd.stdout is not None
            subprocess.run([str(pg_restore.path), "--single-transaction", "--exit-on-error", "-d", target.dbname],
                           stdin=unzstd.stdout, env=tool_env(target), check=True, stdout=subprocess.DEVNULL)
            unzstd.stdout.close()
        if unzstd.returncode != 0:
            raise RuntimeError(f"zstd -dc exited {unzstd.returncode}")
        return {"runner": "floor", "wall": time.monotonic() - started}


def time_verify(settings: Settings, manifest: Manifest) -> dict[str, Any]:
    marks: list[tuple[str, float]] = []

    def progress(phase: str, **_info: object) -> None:
        marks.append((phase, time.monotonic()))

    started = time.monotonic()
    result = verify_backup(settings, manifest.id, progress=progress)
    ended = time.monotonic()
    if not result.ok:
        raise RuntimeError(f"verify failed: {result.problems}")
    phases: dict[str, float] = {}
    for (phase, at), (_next, until) in zip(marks, [*marks[1:], ("end", ended)], strict=True):
        phases[phase] = round(phases.get(phase, 0.0) + until - at, 3)
    return {"runner": "verify", "wall": ended - started, "phases": phases,
            "tables_compared": result.tables_compared, "indexes_checked": result.indexes_checked}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1100, help="the bt_bench_<MB> database (default 1100)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--server-url", default=os.environ.get("BENCH_SERVER_URL", SERVER_URL))
    parser.add_argument("--settle-cores", type=float, default=0.35)
    parser.add_argument("--settle-timeout", type=float, default=30.0)
    parser.add_argument("--json", type=Path, help="write the runs and medians here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    server = ConnInfo.from_url(args.server_url)
    with connect(server) as admin:
        database = ensure_database(admin, server, args.size_mb, regenerate=False, say=print)
    # Under /tmp (not a 0700 pytest-style directory): the throwaway clusters run as the postgres user.
    with work_directory("bt-bench-verify-", parent="/tmp") as work:
        settings = Settings(database_url=database_url(server, database.name), backup_dir=str(work / "backups"),
                            broker_url="memory://", lock_url=None)
        manifest, _ = run_dump(settings)
        archive = Path(settings.backup_dir) / manifest.path
        print(f"{database.name}: {database.size_bytes / 1e6:.0f} MB, archive {manifest.size_bytes / 1e6:.0f} MB")
        runs: list[dict[str, Any]] = []
        for round_no in range(args.rounds):
            order = ["floor", "verify"] if round_no % 2 == 0 else ["verify", "floor"]
            for runner in order:
                wait_for_quiet(max_cores=args.settle_cores, timeout=args.settle_timeout)
                run = time_floor(archive, work) if runner == "floor" else time_verify(settings, manifest)
                run["round"] = round_no
                runs.append(run)
                print(f"round {round_no} {runner:6s} {run['wall']:7.2f} s {run.get('phases', '')}", flush=True)
        floor = statistics.median(r["wall"] for r in runs if r["runner"] == "floor")
        verify = statistics.median(r["wall"] for r in runs if r["runner"] == "verify")
        print(f"median floor {floor:.2f} s, verify {verify:.2f} s, ratio {verify / floor:.3f} (goal <= 1.2)")
        if args.json:
            args.json.write_text(json.dumps({"database": database.name, "size_bytes": database.size_bytes,
                                             "archive_bytes": manifest.size_bytes, "runs": runs,
                                             "median_floor": floor, "median_verify": verify,
                                             "ratio": verify / floor}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
