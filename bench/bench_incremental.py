#!/usr/bin/env python3
"""Incremental snapshots on PostgreSQL 18 (the PyPI wheel): stored size and time against a full, and the restore.

On a throwaway 18 cluster (``summarize_wal = on``) archiving through ``backup-tasks wal-push``, with a
generated trading database of about 1 GB (``--size-mb``), in one run:

* day 0: a full snapshot (``take_snapshot``); then six "days", each changing about 2 % of the pages
  (``--share``: a contiguous band of rows of every table, as a day's updates cluster; updating a share
  of the rows changes about 2.3x that share of the pages here, index entries, new row versions and hint
  bits included, so each day's rows follow the share of pages the previous day's incremental held, by
  its backup_manifest), each followed by ``snapshot --incremental``: its stored size and wall time
  against the full's.
  Targets: an incremental at most 10 % of a full's stored size and 25 % of its time.
* a full snapshot of the same data as the sixth incremental; then ``restore-pitr --start`` (to the end
  of the archive) from the chain (full + six incrementals, checked by ``pg_combinebackup --dry-run`` and
  combined in place into the full's files) and from that full, ``--restore-rounds`` (3) times each,
  alternating. Target: the median chain restore at most 1.3x the median full restore.
* a seventh day's changes, archived; then ``restore-pitr --start`` to the end of the week from the chain
  (its newest incremental is the start) and from the week's full: the WAL each replays against one day's WAL.
  Target: the chain replays at most one day of WAL (the largest day's).

WAL is measured as the bytes of its *records* (``pg_waldump --stats``: the records and their full-page
images; the archived segments fetched into a scratch directory as ``wal-fetch`` restores them): a day from
one daily snapshot's start LSN to the next's, a restore from its snapshot's start LSN to where its redo ended.
The distance between the positions, the first measure (still reported), also counts what no record is: the
unused rest of the segment each backup's end switches away from, so every day came out a whole number of
16 MiB segments. And the full of the same data, taken only for the restore ratio, is no part of a week, but its
checkpoint, backup records and segment switch lie inside the window the end-of-week restore from the chain
replays: they are left out of the chain's figure (a few hundred bytes of records; a whole segment of positions).

Every snapshot and restore is timed by phase (``Phases``: the wall time inside pg_basebackup's pass, the
chain check (pg_combinebackup --dry-run, the skeleton), the unpacks, the in-place combine, the server's start
and recovery; phases run in parallel overlap; a function the code no longer has is skipped and named).

Results: a table on stdout, and ``bench/results/incremental-<stamp>.json`` + ``.md``.

    .venv/bin/python bench/bench_incremental.py                 # ~1 GB, a few minutes
    .venv/bin/python bench/bench_incremental.py --size-mb 200   # a quick look
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import itertools
import json
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any

from support import MIB
from support.machine import host_facts
from support.paths import work_directory
from support.results import markdown_table, stamp, write_results

from backup_tasks.catalog.manifest import Manifest
from backup_tasks.physical.chain import ChainCache, chain_ids, parent_manifest_key
from backup_tasks.physical.combine import BLCKSZ
from backup_tasks.physical.plan import latest_target
from backup_tasks.physical.restore import RestoreReport, restore_pitr
from backup_tasks.physical.snapshot import SHM, take_snapshot
from backup_tasks.physical.unpack import read_snapshot_object
from backup_tasks.postgres.cluster import ThrowawayCluster, as_server_user
from backup_tasks.postgres.connect import connect
from backup_tasks.postgres.sampledata import generate, signals_for_size
from backup_tasks.postgres.servercmd import archive_command, server_command
from backup_tasks.settings import Settings
from backup_tasks.wal.archive import WalArchive
from backup_tasks.wal.names import parse_lsn, segment_name
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
    """Update a contiguous band of ``share`` of every table's rows (more of its pages change: the new row versions,
    every index's entries, pages whose hint bits the day sets; ``measure`` calibrates the rows to the pages)."""
    with connect(conninfo) as conn:
        for table, change in TABLES.items():
            top = int(conn.execute(f"SELECT coalesce(max(id), 0) FROM {table}").fetchone()[0])
            width = max(1, int(top * share))
            first = (day * 7919 * width) % max(1, top - width)
            conn.execute(f"UPDATE {table} SET {change} WHERE id > %s AND id <= %s",
                         (first, first + width))
        conn.execute("CHECKPOINT")


#: The phases timed in every run: (module, attribute) -> name; an attribute may be ``Class.method``. A function
#: imported by name into another module is patched where it is looked up (``restore.restore_chain``, not
#: ``chain.restore_chain``). One that no longer exists is skipped and named in the results (``Phases.missing``).
#: The same function serves snapshots and restores: ``unpack_members`` is the chain's members from storage (an
#: incremental's check without the cache, a restore's unpack), ``combine_in_place`` the new incremental applied
#: to the skeleton (a snapshot) or the chain's blocks written into the full's files (a restore).
PHASES = {
    ("backup_tasks.physical.snapshot", "prepare_base"): "choose parent",
    ("backup_tasks.physical.snapshot", "_take"): "pg_basebackup + store + unpack",
    ("backup_tasks.physical.snapshot", "_run_verifybackup"): "pg_verifybackup (own files)",
    ("backup_tasks.physical.chain", "Ancestors._prepare"): "chain ready (cache or storage)",
    ("backup_tasks.physical.snapshot", "check_incremental"): "chain check",
    ("backup_tasks.physical.chain", "unpack_members"): "unpack chain members",
    ("backup_tasks.physical.chain", "dry_run"): "pg_combinebackup --dry-run",
    ("backup_tasks.physical.chain", "combine_in_place"): "combine in place",
    ("backup_tasks.physical.chain", "sparse_skeleton"): "sparse skeleton",
    ("backup_tasks.physical.snapshot", "_keep_for_next"): "keep chain cache",
    ("backup_tasks.physical.restore", "plan_restore"): "plan",
    ("backup_tasks.physical.restore", "unpack_with_fallback"): "unpack full",
    ("backup_tasks.physical.restore", "restore_chain"): "unpack + combine chain",
    ("backup_tasks.physical.restore", "start_server"): "server start",
    ("backup_tasks.physical.restore", "wait_for_recovery"): "recovery",
}


class Phases:
    """Wall seconds spent inside each of ``PHASES`` (summed; calls in other threads overlap the caller's).

    An entry whose module or attribute does not exist (the code moved on) is not timed and is listed in
    ``missing``: the bench measures what exists rather than stopping."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.missing: list[str] = []
        self._lock = threading.Lock()
        self._saved: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> Phases:
        for (module_name, attr), name in PHASES.items():
            owner_path, _, leaf = attr.rpartition(".")
            try:
                owner: Any = importlib.import_module(module_name)
                for part in filter(None, owner_path.split(".")):
                    owner = getattr(owner, part)
                # The class's own attribute (not an inherited one, nor a bound method): restored as it was.
                original = vars(owner)[leaf] if isinstance(owner, type) else getattr(owner, leaf)
            except (ImportError, AttributeError, KeyError):
                self.missing.append(f"{module_name}.{attr}")
                continue
            # A method is wrapped only when it is a plain function (a wrapper of a static or class method would
            # be bound as an instance method); anything else that is not callable is no phase either.
            if not callable(original) or (isinstance(owner, type) and not inspect.isfunction(original)):
                self.missing.append(f"{module_name}.{attr}")
                continue
            self._saved.append((owner, leaf, original))
            setattr(owner, leaf, self._timed(name, original))
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


RELATION_DIRS = ("base/", "global/", "pg_tblspc/")


def pages_held(settings: Settings, snapshot: Manifest) -> int:
    """The relation pages ``snapshot`` holds, from its backup_manifest: a full's whole files; an incremental's
    changed blocks (an ``INCREMENTAL.`` file is its header, padded to whole pages, and one page per block)."""
    key = parent_manifest_key(snapshot)
    assert key is not None, snapshot.id
    listed = json.loads(read_snapshot_object(settings.locations(), snapshot, key, None))["Files"]
    held = 0
    for entry in listed:
        path, size = str(entry["Path"]), int(entry["Size"])
        if not path.startswith(RELATION_DIRS):
            continue
        if not path.rpartition("/")[2].startswith("INCREMENTAL."):
            held += size // BLCKSZ
            continue
        for header_pages in range(1, 64):  # the header lists 4 bytes a block: one page up to 2045 blocks
            blocks = size // BLCKSZ - header_pages
            if blocks <= 0 or -(-(12 + 4 * blocks) // BLCKSZ) == header_pages:
                held += max(blocks, 0)
                break
    return held


def timed_snapshot(settings: Settings, phases: Phases, *,
                   incremental: bool) -> tuple[Manifest, float, dict[str, float]]:
    # Backup ids have a resolution of a second, so a snapshot started in the second of the previous one waits for
    # the next (``take_snapshot``). Days are a day apart; a bench day can be shorter than a second: wait outside the
    # timed part, so that no snapshot's figure includes that wait.
    time.sleep(1.05 - time.time() % 1)
    phases.take()
    began = time.monotonic()
    manifest = take_snapshot(settings, incremental=incremental)
    return manifest, time.monotonic() - began, phases.take()


def settle() -> None:
    """Write back what earlier steps left dirty and, as root, drop the page cache: each restore starts as after a
    disaster (its backups read from disk), and none pays for the writeback of the gigabyte the previous one wrote
    (measured: unpack times of the same restore then vary 2.3-2.6 s instead of 3.5-5.6 s)."""
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass  # not root: written back, still cached


def timed_restore(settings: Settings, phases: Phases, snapshot_id: str,
                  data_dir: Path) -> tuple[float, RestoreReport, dict[str, float]]:
    settle()
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


def redo_done_at(report: RestoreReport, start_lsn: str | None) -> str:
    """Where the restore's redo ended (the start of the last record replayed), from the server's log."""
    if report.outcome is None or not report.outcome.redo_done_at or not start_lsn:
        raise SystemExit(f"the restore from {report.snapshot_id} did not say where redo ended")
    return report.outcome.redo_done_at


@dataclass(frozen=True)
class WalBytes:
    """What pg_waldump --stats counts between two positions: the records' own bytes and their full-page images."""

    records: int
    fpi: int

    @property
    def total(self) -> int:
        return self.records + self.fpi

    def minus(self, other: WalBytes) -> WalBytes:
        return WalBytes(self.records - other.records, self.fpi - other.fpi)

    def as_dict(self) -> dict[str, int]:
        return {"records": self.records, "fpi": self.fpi, "total": self.total}


#: pg_waldump --stats's last line: "Total  <count>  <record bytes> [..%]  <FPI bytes> [..%]  <combined> [100%]".
WALDUMP_TOTAL = re.compile(r"^Total\s+(\d+)\s+(\d+)\s+\[[^]]*\]\s+(\d+)\s+\[[^]]*\]\s+(\d+)", re.MULTILINE)
#: A WAL page, and the header of a segment's first page (the longest page header).
WAL_PAGE, LONG_PAGE_HEADER = 8192, 40


def lsn_text(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


class WalRecords:
    """The bytes of WAL *records* between two positions of the archived WAL (``pg_waldump --stats``).

    Unlike the distance between the positions, this leaves out what no record is: the unused rest of a segment
    after a switch (every backup's end switches segments, so a "day" between two snapshots' starts is a whole
    number of 16 MiB segments) and the page headers. The archive keeps segments compressed: each one needed is
    fetched once (``WalArchive.fetch``, as ``wal-fetch`` restores it) into ``directory`` as a plain segment.
    """

    def __init__(self, archive: WalArchive, waldump: Path, directory: Path, *, timeline: int,
                 segment_size: int) -> None:
        self.archive, self.waldump, self.directory = archive, waldump, directory
        self.timeline, self.segment_size = timeline, segment_size
        directory.mkdir(parents=True, exist_ok=True)

    def _fetch(self, start: int, end: int) -> None:
        # The segment holding ``end`` too (a record may end in it); not past it.
        for segno in range(start // self.segment_size, (max(end, start + 1) - 1) // self.segment_size + 1):
            name = segment_name(self.timeline, segno, self.segment_size)
            if not (self.directory / name).is_file():
                self.archive.fetch(name, self.directory / name)

    def between(self, start: str, end: str | int) -> WalBytes:
        """The records from ``start`` (a record's start) to ``end``: those that end at or before it."""
        first, last = parse_lsn(start), end if isinstance(end, int) else parse_lsn(end)
        # An end just past a page's header (a snapshot's start after a segment switch is the new segment's first
        # record, 0x28 bytes in) is moved back to the page's start: no record lies between, and pg_waldump, given a
        # range ending there, reads the next record's header from the part of the page it was not given and fails.
        if last % WAL_PAGE <= LONG_PAGE_HEADER:
            last -= last % WAL_PAGE
        if last <= first:
            return WalBytes(0, 0)
        self._fetch(first, last)
        result = subprocess.run([str(self.waldump), "--stats", "-p", str(self.directory), "-t", str(self.timeline),
                                 "-s", lsn_text(first), "-e", lsn_text(last)],
                                capture_output=True, text=True, check=False, cwd="/")
        found = WALDUMP_TOTAL.search(result.stdout)
        if result.returncode != 0 or found is None:
            raise SystemExit(f"pg_waldump --stats {lsn_text(first)}..{lsn_text(last)} failed (exit "
                             f"{result.returncode}): {(result.stderr or result.stdout).strip()[-500:]}")
        return WalBytes(int(found[2]), int(found[3]))


def forget_cache(snapshot: Manifest) -> None:
    """The bench's chain cache entries go with its cluster (skeletons, but a week's worth otherwise)."""
    for area in {Path(SHM), Path(tempfile.gettempdir())}:
        ChainCache.beside(area / "staging", database=snapshot.database,
                          system_identifier=snapshot.system_identifier or "").keep_only(None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--days", type=int, default=6)
    parser.add_argument("--share", type=float, default=0.02, help="share of the pages a day changes (the rows "
                                                                   "updated are calibrated to it day by day)")
    parser.add_argument("--restore-rounds", type=int, default=3, help="restores from the chain and from the full, "
                                                                      "alternating; the ratio of their medians")
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
            # full_page_writes as production runs it (the throwaway default is off): a day's WAL is mostly page images.
            "shared_buffers": "256MB", "full_page_writes": "on"}) as cluster:
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
            results["phases_not_timed"] = phases.missing
            if phases.missing:
                print(f"not timed (no longer in the code): {', '.join(phases.missing)}", flush=True)
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
    # The day changes ``--share`` of the *pages*. Updating a share of the rows changes more pages than that
    # (about 2.3x here): the rows of each day follow the pages the previous day's incremental held.
    full_pages = pages_held(settings, full)
    rows_share = args.share / 2
    for day in range(1, args.days + 1):
        change_a_day(conninfo, day, rows_share)
        snap, seconds, spent = timed_snapshot(settings, phases, incremental=True)
        assert len(chain_ids(snap)) == day + 1, (snap.snapshot or {}).get("incremental_reason")
        taken.append(snap)
        checked_from = (snap.snapshot or {}).get("chain_checked_from")
        page_share = pages_held(settings, snap) / full_pages
        incrementals.append({"id": snap.id, "bytes": snap.size_bytes, "seconds": round(seconds, 3),
                             "chain_checked_from": checked_from, "phases": spent, "rows_share": rows_share,
                             "pages_share": round(page_share, 4)})
        print(f"day {day}: {rows_share:.2%} of the rows updated, {page_share:.2%} of the pages changed; incremental "
              f"{snap.size_bytes / MIB:.1f} MiB in {seconds:.1f}s, chain checked from {checked_from} "
              f"({describe(spent)})", flush=True)
        rows_share *= min(2.0, max(0.5, args.share / max(page_share, 1e-6)))
    out["rows_share_last"] = rows_share
    last = taken[-1]
    same_full, same_full_seconds, same_phases = timed_snapshot(settings, phases, incremental=False)
    print(f"full of the same data: {same_full.size_bytes / MIB:.1f} MiB in {same_full_seconds:.1f}s "
          f"({describe(same_phases)})", flush=True)
    restores: dict[str, list[dict[str, Any]]] = {"chain": [], "full": []}
    for round_number in range(args.restore_rounds):  # alternating, so that a slower moment of the machine hits both
        for label, snapshot_id in (("chain", last.id), ("full", same_full.id)):
            seconds, report, spent = timed_restore(settings, phases, snapshot_id,
                                                   base / f"restore-{label}-{round_number}")
            restores[label].append({"seconds": round(seconds, 3), "chain": report.chain, "phases": spent})
            print(f"restore from the {label} ({len(report.chain)} snapshots): {seconds:.1f}s ({describe(spent)})",
                  flush=True)
    # The seventh day: its WAL archived, then the end of the week restored from the chain and from the full.
    change_a_day(conninfo, args.days + 1, rows_share)
    switch_and_wait(conninfo, archive)
    week: dict[str, Any] = {}
    for label, snapshot in (("chain", last), ("full", full)):
        seconds, report, spent = timed_restore(settings, phases, snapshot.id, base / f"week-end-{label}")
        redo_end = redo_done_at(report, snapshot.start_lsn)
        week[label] = {"snapshot_id": snapshot.id, "seconds": round(seconds, 3), "phases": spent,
                       "start_lsn": snapshot.start_lsn, "redo_done_at": redo_end,
                       "replayed_bytes": parse_lsn(redo_end) - parse_lsn(snapshot.start_lsn or "0/0")}
        print(f"end of the week from the {label}: {seconds:.1f}s, replayed "
              f"{week[label]['replayed_bytes'] / MIB:.1f} MiB of WAL positions ({describe(spent)})", flush=True)
    week.update(wal_measures(settings, archive, base / "wal-plain", full, taken, same_full, week))
    out.update({
        "full": {"bytes": full.size_bytes, "seconds": round(full_seconds, 3), "phases": full_phases},
        "full_same_data": {"bytes": same_full.size_bytes, "seconds": round(same_full_seconds, 3),
                           "phases": same_phases},
        "incrementals": incrementals, "chain": chain_ids(last), "restores": restores, "week_end": week,
    })
    return out


def wal_measures(settings: Settings, archive: WalArchive, scratch: Path, full: Manifest, taken: list[Manifest],
                 same_full: Manifest, week: dict[str, Any]) -> dict[str, Any]:
    """One day's WAL and the end of the week's replay, both as the distance between WAL positions (the first
    measure, kept for comparison) and as the bytes of the WAL records between them (the one the target is checked
    with; ``WalRecords``). Adds each restore's ``replayed_records`` to ``week``; returns the days' and the extra
    full's figures.

    A day: from one daily snapshot's start to the next's. The end of the week: from the start of the snapshot the
    restore started from to where its redo ended. The full of the same data, taken only for the restore ratio,
    is no part of a week's schedule, but its WAL (a checkpoint, the backup's records and the switch to the next
    segment) lies in the chain's window: it is left out of the chain's figure, in both measures.
    """
    size = int(same_full.wal_segment_size or 16 << 20)
    starts = [s.start_lsn or "0/0" for s in [full, *taken]]
    extra_end = (parse_lsn(same_full.stop_lsn or "0/0") // size + 1) * size  # past its switch record
    extra = extra_end - parse_lsn(same_full.start_lsn or "0/0")
    week["chain"]["replayed_bytes_without_extra_full"] = week["chain"]["replayed_bytes"] - extra
    wal = WalRecords(archive, settings.pg_bin_dir[0] / "pg_waldump", scratch, timeline=int(full.timeline or 1),
                     segment_size=size)
    try:
        days = [wal.between(a, b) for a, b in itertools.pairwise(starts)]
        extra_records = wal.between(same_full.start_lsn or "0/0", extra_end)
        for label in ("chain", "full"):
            replayed = wal.between(week[label]["start_lsn"], week[label]["redo_done_at"])
            week[label]["replayed_records"] = replayed.as_dict()
            if label == "chain":
                week[label]["replayed_records_without_extra_full"] = replayed.minus(extra_records).as_dict()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"day_wal_bytes": [parse_lsn(b) - parse_lsn(a) for a, b in itertools.pairwise(starts)],
            "extra_full_wal_bytes": extra,
            "day_wal_records": [day.as_dict() for day in days],
            "extra_full_wal_records": extra_records.as_dict()}


def report_lines(args: argparse.Namespace, results: dict[str, Any]) -> tuple[list[str], list[tuple[Any, ...]]]:
    """The ratios against the issue's targets (into ``results``), and the Markdown report's lines."""
    full, same_full, incrementals = results["full"], results["full_same_data"], results["incrementals"]
    full_bytes = statistics.mean([full["bytes"], same_full["bytes"]])
    full_time = statistics.mean([full["seconds"], same_full["seconds"]])
    incr_bytes = statistics.mean(i["bytes"] for i in incrementals)
    incr_time = statistics.mean(i["seconds"] for i in incrementals)
    # Medians: one restore slowed by another tenant of the machine moves a mean of three by a third of its delay.
    restore_chain = statistics.median(r["seconds"] for r in results["restores"]["chain"])
    restore_full = statistics.median(r["seconds"] for r in results["restores"]["full"])
    week = results["week_end"]
    chain_week, full_week = week["chain"], week["full"]
    one_day = max(day["total"] for day in week["day_wal_records"])
    one_day_lsn = max(week["day_wal_bytes"])
    results["ratios"] = {"incremental_size": round(incr_bytes / full_bytes, 4),
                         "incremental_time": round(incr_time / full_time, 4),
                         "restore_chain_vs_full": round(restore_chain / restore_full, 4),
                         "week_end_replay_vs_one_day": round(
                             chain_week["replayed_records_without_extra_full"]["total"] / one_day, 4),
                         "week_end_replay_vs_one_day_lsn": round(
                             chain_week["replayed_bytes_without_extra_full"] / one_day_lsn, 4)}
    ratios = results["ratios"]
    rows = [("incremental / full stored size", f"{ratios['incremental_size']:.3f}", f"<= {TARGET_SIZE}",
             ratios["incremental_size"] <= TARGET_SIZE),
            ("incremental / full time", f"{ratios['incremental_time']:.3f}", f"<= {TARGET_TIME}",
             ratios["incremental_time"] <= TARGET_TIME),
            (f"restore full+{args.days} incrementals / full", f"{ratios['restore_chain_vs_full']:.3f}",
             f"<= {TARGET_RESTORE}", ratios["restore_chain_vs_full"] <= TARGET_RESTORE),
            ("end-of-week restore: WAL records replayed / one day's", f"{ratios['week_end_replay_vs_one_day']:.3f}",
             "<= 1", ratios["week_end_replay_vs_one_day"] <= 1)]

    def mib(value: int) -> str:
        return f"{value / MIB:.1f}"

    extra_records = week["extra_full_wal_records"]["total"]
    pages = [i["pages_share"] for i in incrementals]
    rows_updated = ", ".join(f"{i['rows_share']:.2%}" for i in incrementals)
    lines = [f"# Incremental snapshots, PostgreSQL 18, {results['database_bytes'] / MIB:.0f} MiB, "
             f"{args.share:.0%} of the pages a day", "",
             f"Pages changed a day (from each incremental's backup_manifest): "
             f"{', '.join(f'{share:.1%}' for share in pages)} (mean {statistics.mean(pages):.1%}); rows updated "
             f"{rows_updated}.", "",
             *markdown_table(("measure", "ratio", "target", "met"), rows), "",
             f"full {mib(full['bytes'])} MiB in {full['seconds']:.1f}s (same data as day {args.days}: "
             f"{mib(same_full['bytes'])} MiB in {same_full['seconds']:.1f}s); incrementals "
             f"{mib(incr_bytes)} MiB in {incr_time:.1f}s on average "
             f"({', '.join(str(i['seconds']) for i in incrementals)} s); restore from the chain "
             f"{restore_chain:.1f}s, from the full {restore_full:.1f}s.", "",
             f"End of the week (a seventh day's changes after the sixth incremental, restored to the end of the "
             f"archive): from the chain {chain_week['seconds']:.1f}s, from the week's full "
             f"{full_week['seconds']:.1f}s.", "",
             "WAL is measured as the bytes of its records (pg_waldump --stats: records + full-page images) between "
             "two positions: a day from one daily snapshot's start to the next's, a restore from its snapshot's "
             "start to where its redo ended. The full of the same data, taken only for the restore ratio, lies in "
             "the chain's window and is left out of its figure (it is no part of a week).", "",
             f"* records: the chain replayed {mib(chain_week['replayed_records_without_extra_full']['total'])} MiB "
             f"({mib(chain_week['replayed_records']['total'])} MiB with the {extra_records / 1024:.1f} KiB of the "
             f"extra full; of which full-page images "
             f"{mib(chain_week['replayed_records_without_extra_full']['fpi'])} MiB), the week's full "
             f"{mib(full_week['replayed_records']['total'])} MiB; one day {mib(one_day)} MiB at most "
             f"({', '.join(mib(day['total']) for day in week['day_wal_records'])}): ratio "
             f"{ratios['week_end_replay_vs_one_day']:.3f}.",
             f"* WAL positions (the first measure: a distance, so the unused rest of each segment a backup's end "
             f"switches away from counts too): the chain {mib(chain_week['replayed_bytes_without_extra_full'])} MiB "
             f"({mib(chain_week['replayed_bytes'])} MiB with the {mib(week['extra_full_wal_bytes'])} MiB of the "
             f"extra full), the week's full {mib(full_week['replayed_bytes'])} MiB; one day {mib(one_day_lsn)} MiB "
             f"at most ({', '.join(mib(b) for b in week['day_wal_bytes'])}): ratio "
             f"{ratios['week_end_replay_vs_one_day_lsn']:.3f}.", "",
             "Phases (wall seconds; a thread's overlap the caller's):", "",
             f"* full: {describe(full['phases'])}",
             *(f"* day {n}: {describe(i['phases'])}" for n, i in enumerate(incrementals, start=1)),
             *(f"* restore from the {label}: {describe(r['phases'])}"
               for label in ("chain", "full") for r in results["restores"][label]),
             *(f"* end of the week from the {label}: {describe(week[label]['phases'])}" for label in ("chain", "full")),
             *([f"* not timed (no longer in the code): {', '.join(results['phases_not_timed'])}"]
               if results.get("phases_not_timed") else [])]
    return lines, rows


if __name__ == "__main__":
    sys.exit(main())
