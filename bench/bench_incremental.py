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
  full, twice each, alternating. Target: the chain's restore at most 1.3x the full's.
* a seventh day's changes, archived; then ``restore-pitr --start`` to the end of the week from the chain
  (its newest incremental is the start) and from the week's full: the WAL each replays (from its start
  LSN to where redo ended) against one day's WAL (from one daily snapshot's start to the next's).
  Target: the chain replays at most one day of WAL (the largest day's).

Every snapshot and restore is timed by phase (``Phases``: the wall time inside pg_basebackup's pass, the
checks, pg_combinebackup, the unpacks, the server's start and recovery; phases run in parallel overlap).

Results: a table on stdout, and ``bench/results/incremental-<stamp>.json`` + ``.md``.

    .venv/bin/python bench/bench_incremental.py                 # ~1 GB, a few minutes
    .venv/bin/python bench/bench_incremental.py --size-mb 200   # a quick look
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any

from support import MIB
from support.machine import host_facts
from support.paths import work_directory
from support.results import markdown_table, stamp, write_results

from backup_tasks.catalog.manifest import Manifest
from backup_tasks.physical.chain import ChainCache, chain_ids
from backup_tasks.physical.plan import latest_target
from backup_tasks.physical.restore import RestoreReport, restore_pitr
from backup_tasks.physical.snapshot import SHM, take_snapshot
from backup_tasks.postgres.cluster import ThrowawayCluster, as_server_user
from backup_tasks.postgres.connect import connect
from backup_tasks.postgres.sampledata import generate, signals_for_size
from backup_tasks.postgres.servercmd import archive_command, server_command
from backup_tasks.settings import Settings
from backup_tasks.wal.archive import WalArchive
from backup_tasks.wal.names import parse_lsn
from backup_tasks.wal.setup import prepare_archive

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.support.pg18 import pg18_bin_dir
from tests.support.pitr import switch_and_wait

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


#: The phases timed in every run: (module, function) -> name. Looked up by name at call time, so patched in place.
PHASES = {
    ("backup_tasks.physical.snapshot", "prepare_base"): "choose parent",
    ("backup_tasks.physical.snapshot", "_take"): "pg_basebackup + store + unpack",
    ("backup_tasks.physical.snapshot", "_run_verifybackup"): "pg_verifybackup (own files)",
    ("backup_tasks.physical.snapshot", "check_incremental"): "chain check",
    ("backup_tasks.physical.chain", "unpack_members"): "unpack chain members",
    ("backup_tasks.physical.chain", "verifybackup_problem"): "pg_verifybackup (chain)",
    ("backup_tasks.physical.chain", "combine"): "pg_combinebackup",
    ("backup_tasks.physical.restore", "plan_restore"): "plan",
    ("backup_tasks.physical.restore", "unpack_with_fallback"): "unpack full",
    ("backup_tasks.physical.restore", "restore_chain"): "unpack + combine chain",
    ("backup_tasks.physical.restore", "start_server"): "server start",
    ("backup_tasks.physical.restore", "wait_for_recovery"): "recovery",
}


class Phases:
    """Wall seconds spent inside each of ``PHASES`` (summed; calls in other threads overlap the caller's)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()
        self._saved: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> Phases:
        for (module_name, attr), name in PHASES.items():
            module = importlib.import_module(module_name)
            original = getattr(module, attr)
            self._saved.append((module, attr, original))
            setattr(module, attr, self._timed(name, original))
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        for module, attr, original in reversed(self._saved):
            setattr(module, attr, original)

    def _timed(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            began = time.monotonic()
            try:
                return function(*args, **kwargs)
            finally:
                with self._lock:
                    self.seconds[name] = self.seconds.get(name, 0.0) + time.monotonic() - began
        return timed

    def take(self) -> dict[str, float]:
        with self._lock:
            taken, self.seconds = {k: round(v, 3) for k, v in self.seconds.items()}, {}
        return taken


def describe(phases: dict[str, float]) -> str:
    return ", ".join(f"{name} {seconds:.2f}" for name, seconds in phases.items())


def timed_snapshot(settings: Settings, phases: Phases, *,
                   incremental: bool) -> tuple[Manifest, float, dict[str, float]]:
    phases.take()
    began = time.monotonic()
    manifest = take_snapshot(settings, incremental=incremental)
    return manifest, time.monotonic() - began, phases.take()


def timed_restore(settings: Settings, phases: Phases, snapshot_id: str,
                  data_dir: Path) -> tuple[float, RestoreReport, dict[str, float]]:
    phases.take()
    began = time.monotonic()
    report = restore_pitr(settings, latest_target(), data_dir, start=True, snapshot_id=snapshot_id, action="promote")
    seconds = time.monotonic() - began
    spent = phases.take()
    subprocess.run([*as_server_user(), str(settings.pg_bin_dir[0] / "pg_ctl"), "-D", str(data_dir), "-m",
                    "immediate", "stop"], capture_output=True, check=False, cwd="/")
    if not report.ok:
        raise SystemExit(f"restore from {snapshot_id} failed: {report.notes}")
    shutil.rmtree(data_dir, ignore_errors=True)
    return seconds, report, spent


def replayed_bytes(report: RestoreReport, start_lsn: str | None) -> int:
    """From the snapshot's start to where redo ended (the last record replayed)."""
    if report.outcome is None or not report.outcome.redo_done_at or not start_lsn:
        raise SystemExit(f"the restore from {report.snapshot_id} did not say where redo ended")
    return parse_lsn(report.outcome.redo_done_at) - parse_lsn(start_lsn)


def forget_cache(snapshot: Manifest) -> None:
    """The bench's chain cache entries go with its cluster (a gigabyte in RAM otherwise, for a week)."""
    for area in {Path(SHM), Path(tempfile.gettempdir())}:
        cache = ChainCache.beside(area / "staging", database=snapshot.database,
                                  system_identifier=snapshot.system_identifier or "")
        if cache is not None:
            cache.keep_only(None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--days", type=int, default=6)
    parser.add_argument("--share", type=float, default=0.02, help="share of the pages a day changes")
    parser.add_argument("--output", type=Path, default=None,
                        help="also write the results (JSON, with ``targets``) here (bench/run.py reads them)")
    args = parser.parse_args()
    try:
        bin_dir = pg18_bin_dir()
    except LookupError as exc:  # `make setup` installs it; without it there is nothing to measure here
        print(f"skipped: {exc}")
        if args.output is not None:
            args.output.write_text(json.dumps({"skipped": str(exc)}) + "\n")
        return 0
    with work_directory("bench-incremental-", mode=0o711) as base:
        return run(args, bin_dir, base)


def run(args: argparse.Namespace, bin_dir: Path, base: Path) -> int:
    results: dict[str, Any] = {"host": host_facts(), "size_mb": args.size_mb, "days": args.days,
                               "share": args.share}
    settings = Settings(backup_dir=str(base / "backups"), broker_url="memory://", lock_url=None,
                        pg_bin_dir=(bin_dir,))
    archive, _notes = prepare_archive(settings)
    command = archive_command(server_command(base / "tool"), archive.root)
    fulls: list[Manifest] = []
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
        print(f"generated {results['database_bytes'] / MIB:.0f} MiB in {time.monotonic() - began:.0f}s", flush=True)
        settings = replace(settings, database_url=cluster.url("aitrapp"))
        with Phases() as phases:
            try:
                results.update(measure(args, settings, conninfo, archive, phases, base, fulls))
            finally:
                for full in fulls[:1]:  # one system, one database: its entries, whichever chain they hold
                    forget_cache(full)
    lines, rows = report_lines(args, results)
    results["targets"] = [{"target": name, "measured": float(measured), "goal": goal, "pass": met,
                           "detail": "bench_incremental.py"} for name, measured, goal, met in rows]
    results["markdown"] = "\n".join(lines) + "\n"
    print("\n".join(lines))
    write_results(f"incremental-{stamp()}", {".json": json.dumps(results, indent=2) + "\n",
                                             ".md": results["markdown"]})
    if args.output is not None:
        args.output.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(row[3] for row in rows) else 1


def measure(args: argparse.Namespace, settings: Settings, conninfo: Any, archive: WalArchive, phases: Phases,
            base: Path, fulls: list[Manifest]) -> dict[str, Any]:
    """The snapshots and restores of one run, in the order the module docstring gives (``fulls``: as taken)."""
    out: dict[str, Any] = {}
    full, full_seconds, full_phases = timed_snapshot(settings, phases, incremental=False)
    fulls.append(full)
    print(f"full: {full.size_bytes / MIB:.1f} MiB stored in {full_seconds:.1f}s ({describe(full_phases)})",
          flush=True)
    incrementals: list[dict[str, Any]] = []
    taken: list[Manifest] = []
    for day in range(1, args.days + 1):
        change_a_day(conninfo, day, args.share)
        snap, seconds, spent = timed_snapshot(settings, phases, incremental=True)
        assert len(chain_ids(snap)) == day + 1, (snap.snapshot or {}).get("incremental_reason")
        taken.append(snap)
        checked_from = (snap.snapshot or {}).get("chain_checked_from")
        incrementals.append({"id": snap.id, "bytes": snap.size_bytes, "seconds": round(seconds, 3),
                             "chain_checked_from": checked_from, "phases": spent})
        print(f"day {day}: incremental {snap.size_bytes / MIB:.1f} MiB in {seconds:.1f}s, chain checked from "
              f"{checked_from} ({describe(spent)})", flush=True)
    last = taken[-1]
    same_full, same_full_seconds, same_phases = timed_snapshot(settings, phases, incremental=False)
    print(f"full of the same data: {same_full.size_bytes / MIB:.1f} MiB in {same_full_seconds:.1f}s "
          f"({describe(same_phases)})", flush=True)
    restores: dict[str, list[dict[str, Any]]] = {"chain": [], "full": []}
    for round_number in range(2):  # alternating, so that a slower moment of the machine hits both
        for label, snapshot_id in (("chain", last.id), ("full", same_full.id)):
            seconds, report, spent = timed_restore(settings, phases, snapshot_id,
                                                   base / f"restore-{label}-{round_number}")
            restores[label].append({"seconds": round(seconds, 3), "chain": report.chain, "phases": spent})
            print(f"restore from the {label} ({len(report.chain)} snapshots): {seconds:.1f}s ({describe(spent)})",
                  flush=True)
    # The seventh day: its WAL archived, then the end of the week restored from the chain and from the full.
    change_a_day(conninfo, args.days + 1, args.share)
    switch_and_wait(conninfo, archive)
    week: dict[str, Any] = {}
    for label, snapshot in (("chain", last), ("full", full)):
        seconds, report, spent = timed_restore(settings, phases, snapshot.id, base / f"week-end-{label}")
        week[label] = {"snapshot_id": snapshot.id, "seconds": round(seconds, 3), "phases": spent,
                       "replayed_bytes": replayed_bytes(report, snapshot.start_lsn)}
        print(f"end of the week from the {label}: {seconds:.1f}s, replayed "
              f"{week[label]['replayed_bytes'] / MIB:.1f} MiB of WAL ({describe(spent)})", flush=True)
    starts = [parse_lsn(s.start_lsn or "0/0") for s in [full, *taken]]
    week["day_wal_bytes"] = [b - a for a, b in itertools.pairwise(starts)]
    # The full of the same data, taken for the restore ratio, is no part of a week's schedule: its WAL (a checkpoint,
    # the backup's records and the switch to the next segment) is in the end of the week's replay and is left out.
    size = int(same_full.wal_segment_size or 16 << 20)
    extra = (parse_lsn(same_full.stop_lsn or "0/0") // size + 1) * size - parse_lsn(same_full.start_lsn or "0/0")
    week["extra_full_wal_bytes"] = extra
    week["chain"]["replayed_bytes_without_extra_full"] = week["chain"]["replayed_bytes"] - extra
    out.update({
        "full": {"bytes": full.size_bytes, "seconds": round(full_seconds, 3), "phases": full_phases},
        "full_same_data": {"bytes": same_full.size_bytes, "seconds": round(same_full_seconds, 3),
                           "phases": same_phases},
        "incrementals": incrementals, "chain": chain_ids(last), "restores": restores, "week_end": week,
    })
    return out


def report_lines(args: argparse.Namespace, results: dict[str, Any]) -> tuple[list[str], list[tuple[Any, ...]]]:
    """The ratios against the issue's targets (into ``results``), and the Markdown report's lines."""
    full, same_full, incrementals = results["full"], results["full_same_data"], results["incrementals"]
    full_bytes = statistics.mean([full["bytes"], same_full["bytes"]])
    full_time = statistics.mean([full["seconds"], same_full["seconds"]])
    incr_bytes = statistics.mean(i["bytes"] for i in incrementals)
    incr_time = statistics.mean(i["seconds"] for i in incrementals)
    restore_chain = statistics.mean(r["seconds"] for r in results["restores"]["chain"])
    restore_full = statistics.mean(r["seconds"] for r in results["restores"]["full"])
    week = results["week_end"]
    one_day = max(week["day_wal_bytes"])
    results["ratios"] = {"incremental_size": round(incr_bytes / full_bytes, 4),
                         "incremental_time": round(incr_time / full_time, 4),
                         "restore_chain_vs_full": round(restore_chain / restore_full, 4),
                         "week_end_replay_vs_one_day": round(
                             week["chain"]["replayed_bytes_without_extra_full"] / one_day, 4)}
    ratios = results["ratios"]
    rows = [("incremental / full stored size", f"{ratios['incremental_size']:.3f}", f"<= {TARGET_SIZE}",
             ratios["incremental_size"] <= TARGET_SIZE),
            ("incremental / full time", f"{ratios['incremental_time']:.3f}", f"<= {TARGET_TIME}",
             ratios["incremental_time"] <= TARGET_TIME),
            (f"restore full+{args.days} incrementals / full", f"{ratios['restore_chain_vs_full']:.3f}",
             f"<= {TARGET_RESTORE}", ratios["restore_chain_vs_full"] <= TARGET_RESTORE),
            ("end-of-week restore: WAL replayed / one day's", f"{ratios['week_end_replay_vs_one_day']:.3f}",
             "<= 1", ratios["week_end_replay_vs_one_day"] <= 1)]
    lines = [f"# Incremental snapshots, PostgreSQL 18, {results['database_bytes'] / MIB:.0f} MiB, "
             f"{args.share:.0%} of the pages a day", "",
             *markdown_table(("measure", "ratio", "target", "met"), rows), "",
             f"full {full['bytes'] / MIB:.1f} MiB in {full['seconds']:.1f}s (same data as day {args.days}: "
             f"{same_full['bytes'] / MIB:.1f} MiB in {same_full['seconds']:.1f}s); incrementals "
             f"{incr_bytes / MIB:.1f} MiB in {incr_time:.1f}s on average "
             f"({', '.join(str(i['seconds']) for i in incrementals)} s); restore from the chain "
             f"{restore_chain:.1f}s, from the full {restore_full:.1f}s.", "",
             f"End of the week (a seventh day's changes after the sixth incremental): from the chain "
             f"{week['chain']['seconds']:.1f}s replaying {week['chain']['replayed_bytes'] / MIB:.1f} MiB of WAL "
             f"({week['chain']['replayed_bytes_without_extra_full'] / MIB:.1f} MiB without the "
             f"{week['extra_full_wal_bytes'] / MIB:.1f} MiB of the full taken for the restore ratio), "
             f"from the week's full {week['full']['seconds']:.1f}s replaying "
             f"{week['full']['replayed_bytes'] / MIB:.1f} MiB; one day's WAL {one_day / MIB:.1f} MiB at most "
             f"({', '.join(f'{b / MIB:.1f}' for b in week['day_wal_bytes'])}).", "",
             "Phases (wall seconds; a thread's overlap the caller's):", "",
             f"* full: {describe(full['phases'])}",
             *(f"* day {n}: {describe(i['phases'])}" for n, i in enumerate(incrementals, start=1)),
             *(f"* restore from the {label}: {describe(r['phases'])}"
               for label in ("chain", "full") for r in results["restores"][label]),
             *(f"* end of the week from the {label}: {describe(week[label]['phases'])}" for label in ("chain", "full"))]
    return lines, rows


if __name__ == "__main__":
    sys.exit(main())
