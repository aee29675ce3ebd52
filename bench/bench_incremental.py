#!/usr/bin/env python3
"""Incremental snapshots on PostgreSQL 18 (the PyPI wheel): stored size and time against a full, and the restore.

On a throwaway 18 cluster (``summarize_wal = on``) archiving through ``backup-tasks wal-push``, with a
generated trading database of about 1 GB (``--size-mb``), in one run:

* day 0: a full snapshot (``take_snapshot``); then six "days", each changing about 2 % of the pages
  (a contiguous band of rows of every table, as a day's updates cluster), each followed by
  ``snapshot --incremental``: its stored size and wall time against the full's.
  Targets: an incremental at most 10 % of a full's stored size and 25 % of its time.
* a full snapshot of the same data as the sixth incremental; then ``restore-pitr --start`` (to the end
  of the archive) from the chain (full + six incrementals, combined by pg_combinebackup) and from that
  full. Target: the chain's restore at most 1.3x the full's.

Results: a table on stdout, and ``bench/results/incremental-<stamp>.json`` + ``.md``.

    .venv/bin/python bench/bench_incremental.py                 # ~1 GB, a few minutes
    .venv/bin/python bench/bench_incremental.py --size-mb 200   # a quick look
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from support import MIB
from support.machine import host_facts
from support.paths import work_directory
from support.results import markdown_table, stamp, write_results

from backup_tasks.catalog.manifest import Manifest
from backup_tasks.physical.chain import chain_ids
from backup_tasks.physical.plan import latest_target
from backup_tasks.physical.restore import restore_pitr
from backup_tasks.physical.snapshot import take_snapshot
from backup_tasks.postgres.cluster import ThrowawayCluster, as_server_user
from backup_tasks.postgres.connect import connect
from backup_tasks.postgres.sampledata import generate, signals_for_size
from backup_tasks.postgres.servercmd import archive_command, server_command
from backup_tasks.settings import Settings
from backup_tasks.wal.setup import prepare_archive

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.support.pg18 import pg18_bin_dir

TARGET_SIZE = 0.10
TARGET_TIME = 0.25
TARGET_RESTORE = 1.3
#: Each table and a column a day's update sets (to itself plus a little: a new row version, in place or not).
TABLES = {"signals": "ts = ts + interval '1 second'", "decisions": "ts = ts + interval '1 second'",
          "orders": "ts = ts + interval '1 second'", "positions": "qty = qty + 1",
          "trades": "ts = ts + interval '1 second'", "audit_logs": "ts = ts + interval '1 second'"}


def change_a_day(conninfo: Any, day: int, share: float) -> None:
    """Update a contiguous band of ``share`` of every table's rows: about that share of its pages."""
    with connect(conninfo) as conn:
        for table, change in TABLES.items():
            top = int(conn.execute(f"SELECT coalesce(max(id), 0) FROM {table}").fetchone()[0])
            width = max(1, int(top * share))
            first = (day * 7919 * width) % max(1, top - width)
            conn.execute(f"UPDATE {table} SET {change} WHERE id > %s AND id <= %s",
                         (first, first + width))
        conn.execute("CHECKPOINT")


def timed_snapshot(settings: Settings, *, incremental: bool) -> tuple[Manifest, float]:
    began = time.monotonic()
    manifest = take_snapshot(settings, incremental=incremental)
    return manifest, time.monotonic() - began


def timed_restore(settings: Settings, snapshot_id: str, data_dir: Path) -> tuple[float, list[str]]:
    began = time.monotonic()
    report = restore_pitr(settings, latest_target(), data_dir, start=True, snapshot_id=snapshot_id, action="promote")
    seconds = time.monotonic() - began
    subprocess.run([*as_server_user(), str(settings.pg_bin_dir[0] / "pg_ctl"), "-D", str(data_dir), "-m",
                    "immediate", "stop"], capture_output=True, check=False, cwd="/")
    if not report.ok:
        raise SystemExit(f"restore from {snapshot_id} failed: {report.notes}")
    shutil.rmtree(data_dir, ignore_errors=True)
    return seconds, report.chain


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--days", type=int, default=6)
    parser.add_argument("--share", type=float, default=0.02, help="share of the pages a day changes")
    args = parser.parse_args()
    bin_dir = pg18_bin_dir()
    with work_directory("bench-incremental-", mode=0o711) as base:
        return run(args, bin_dir, base)


def run(args: argparse.Namespace, bin_dir: Path, base: Path) -> int:
    results: dict[str, Any] = {"host": host_facts(), "size_mb": args.size_mb, "days": args.days,
                               "share": args.share}
    if True:  # one block, as it was written: the work directory goes with the context manager
        settings = Settings(backup_dir=str(base / "backups"), broker_url="memory://", lock_url=None,
                            pg_bin_dir=(bin_dir,))
        archive, _notes = prepare_archive(settings)
        command = archive_command(server_command(base / "tool"), archive.root)
        with ThrowawayCluster(exact_major=18, bin_dir=bin_dir, settings={
                "wal_level": "replica", "max_wal_senders": "4", "archive_mode": "on", "summarize_wal": "on",
                "archive_command": shlex.quote(command), "archive_timeout": "0", "max_wal_size": "4GB",
                "shared_buffers": "256MB"}) as cluster:
            with connect(cluster.conninfo()) as conn:
                conn.execute("CREATE DATABASE aitrapp")
            conninfo = cluster.conninfo("aitrapp")
            began = time.monotonic()
            generate(conninfo, signals=signals_for_size(args.size_mb))
            with connect(conninfo) as conn:
                conn.execute("VACUUM ANALYZE")
                results["database_bytes"] = int(conn.execute("SELECT pg_database_size('aitrapp')").fetchone()[0])
            print(f"generated {results['database_bytes'] / MIB:.0f} MiB in {time.monotonic() - began:.0f}s",
                  flush=True)
            settings = replace(settings, database_url=cluster.url("aitrapp"))
            full, full_seconds = timed_snapshot(settings, incremental=False)
            print(f"full: {full.size_bytes / MIB:.1f} MiB stored in {full_seconds:.1f}s", flush=True)
            incrementals = []
            for day in range(1, args.days + 1):
                change_a_day(conninfo, day, args.share)
                taken, seconds = timed_snapshot(settings, incremental=True)
                assert len(chain_ids(taken)) == day + 1, (taken.snapshot or {}).get("incremental_reason")
                incrementals.append({"id": taken.id, "bytes": taken.size_bytes, "seconds": round(seconds, 3)})
                print(f"day {day}: incremental {taken.size_bytes / MIB:.1f} MiB in {seconds:.1f}s", flush=True)
            last = incrementals[-1]["id"]
            same_full, same_full_seconds = timed_snapshot(settings, incremental=False)  # the data of the last
            print(f"full of the same data: {same_full.size_bytes / MIB:.1f} MiB in {same_full_seconds:.1f}s",
                  flush=True)
            chain_restore, chain = timed_restore(settings, last, base / "restore-chain")
            full_restore, _ = timed_restore(settings, same_full.id, base / "restore-full")
            chain_restore_2, _ = timed_restore(settings, last, base / "restore-chain-2")  # alternate the order
            full_restore_2, _ = timed_restore(settings, same_full.id, base / "restore-full-2")
        full_bytes = statistics.mean([full.size_bytes, same_full.size_bytes])
        full_time = statistics.mean([full_seconds, same_full_seconds])
        incr_bytes = statistics.mean(i["bytes"] for i in incrementals)
        incr_time = statistics.mean(i["seconds"] for i in incrementals)
        restore_chain = statistics.mean([chain_restore, chain_restore_2])
        restore_full = statistics.mean([full_restore, full_restore_2])
        results.update({
            "full": {"bytes": full.size_bytes, "seconds": round(full_seconds, 3)},
            "full_same_data": {"bytes": same_full.size_bytes, "seconds": round(same_full_seconds, 3)},
            "incrementals": incrementals, "chain": chain,
            "restore_seconds": {"chain": [round(chain_restore, 3), round(chain_restore_2, 3)],
                                "full": [round(full_restore, 3), round(full_restore_2, 3)]},
            "ratios": {"incremental_size": round(incr_bytes / full_bytes, 4),
                       "incremental_time": round(incr_time / full_time, 4),
                       "restore_chain_vs_full": round(restore_chain / restore_full, 4)},
        })
        ratios = results["ratios"]
        rows = [("incremental / full stored size", f"{ratios['incremental_size']:.3f}", f"<= {TARGET_SIZE}",
                 ratios["incremental_size"] <= TARGET_SIZE),
                ("incremental / full time", f"{ratios['incremental_time']:.3f}", f"<= {TARGET_TIME}",
                 ratios["incremental_time"] <= TARGET_TIME),
                (f"restore full+{args.days} incrementals / full", f"{ratios['restore_chain_vs_full']:.3f}",
                 f"<= {TARGET_RESTORE}", ratios["restore_chain_vs_full"] <= TARGET_RESTORE)]
        lines = [f"# Incremental snapshots, PostgreSQL 18, {results['database_bytes'] / MIB:.0f} MiB, "
                 f"{args.share:.0%} of the pages a day", "",
                 *markdown_table(("measure", "ratio", "target", "met"), rows), "",
                 f"full {full.size_bytes / MIB:.1f} MiB in {full_seconds:.1f}s (same data as day {args.days}: "
                 f"{same_full.size_bytes / MIB:.1f} MiB in {same_full_seconds:.1f}s); incrementals "
                 f"{incr_bytes / MIB:.1f} MiB in {incr_time:.1f}s on average; restore from the chain "
                 f"{restore_chain:.1f}s, from the full {restore_full:.1f}s"]
        print("\n".join(lines))
        write_results(f"incremental-{stamp()}", {".json": json.dumps(results, indent=2) + "\n",
                                                 ".md": "\n".join(lines) + "\n"})
        return 0 if all(row[3] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
