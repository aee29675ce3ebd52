#!/usr/bin/env python3
"""The daily cycle's benchmark: our dump and verify against the seed's own commands, in one run.

For each size (default 250 MB and 1100 MB) a generated trading database ``bt_bench_<MB>`` on the
local server is dumped, round after round, by

* ``seed_dump``     the seed's ``pg_dump "$DB_CONN" | gzip > f.sql.gz``
* ``floor``         ``pg_dump "$DB_CONN" > /dev/null``: nothing can be faster than reading the data
* ``floor_custom``  ``pg_dump --format=custom --compress=0 > /dev/null``: the same in our archive format
* ``ours_dump``     ``backup-tasks dump`` (zstd, sha256, fsync, same-snapshot row counts, manifest)

and, at the largest size, restored by

* ``seed_restore``  the seed's ``createdb X; gunzip -c f.sql.gz | psql X`` into the local server
* ``ours_verify``   ``backup-tasks verify ID``: checksum, restore into a throwaway cluster, row-count
                    comparison, amcheck, result recorded in the manifest

The order of the commands rotates from round to round and every run starts on a quiet machine
(see ``--settle-*``), because other work shares the cores; each figure is the median of the rounds.
Every run is measured from ``/proc`` (``support/measure.py``): wall time, CPU of the command's process
tree and of the server processes working for it, and peak RSS of the tree sampled every 50 ms. The
databases, the runners and the experiments' orchestration are in ``support/`` (``databases``,
``runners``, ``tuning``); this file compares the runs: medians, the targets, the report.

Then, in a child process with its own PostgreSQL 18 cluster (the PyPI wheel), ``bench_incremental.py``:
incremental snapshots against fulls on about 1 GB (``--incremental-size-mb``), its targets checked with
the others (``--no-incremental`` skips it; without the wheel it is skipped and says so).

Results: a table on stdout, and ``bench/results/<stamp>.json`` + ``.md`` (also ``latest.*``).

    .venv/bin/python bench/run.py                      # the issues' targets, ~15 minutes
    .venv/bin/python bench/run.py --sizes 1100 --rounds 5
    .venv/bin/python bench/run.py --experiments        # also the tuning experiments (experiments.py)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from support import MIB
from support.databases import SERVER_URL, BenchDatabase, drop_bench_database, ensure_database
from support.machine import host_facts, server_facts
from support.measure import rotated
from support.paths import CLI, RESULTS_DIR, work_directory
from support.results import markdown_table, stamp, write_results
from support.runners import DUMP_RUNNERS, FLOOR, RESTORE_RUNNERS, Bench, Run
from support.tuning import run_experiments

from backup_tasks.conninfo import ConnInfo
from backup_tasks.postgres.connect import connect

#: The issue's targets (Speed section of issue 3).
TARGET_SPEEDUP_VS_SEED = 2.5
TARGET_VS_FLOOR = 1.15
TARGET_VERIFY_VS_SEED_RESTORE = 0.6
MIN_TARGET_DB_BYTES = 1 << 30
#: "Flat" memory: the peak at the largest size is at most this much above the smallest size's peak.
FLAT_MEMORY_FACTOR = 1.2
FLAT_MEMORY_SLACK = 8 * MIB


# --- analysis ---------------------------------------------------------------------------------

def median_of(runs: Sequence[Run], size_mb: int, runner: str, value: Callable[[Run], float | None]) -> float | None:
    values = [v for r in runs if r.size_mb == size_mb and r.runner == runner and r.counts
              for v in [value(r)] if v is not None]
    return statistics.median(values) if values else None


def summarize(runs: Sequence[Run], sizes: Sequence[int]) -> dict[int, dict[str, dict[str, Any]]]:
    table: dict[int, dict[str, dict[str, Any]]] = {}
    for size in sizes:
        table[size] = {}
        for runner in (*DUMP_RUNNERS, *RESTORE_RUNNERS):
            every = [r for r in runs if r.size_mb == size and r.runner == runner]
            mine = [r for r in every if not r.disturbed]
            if not mine:
                continue
            walls = [r.measurement.wall_seconds for r in mine if r.ok]
            table[size][runner] = {
                "rounds": len(mine), "failed": sum(not r.ok for r in mine),
                "disturbed_repeated": sum(r.disturbed for r in every),
                "wall_median": median_of(runs, size, runner, lambda r: r.measurement.wall_seconds),
                "wall_min": min(walls) if walls else None, "wall_max": max(walls) if walls else None,
                "tree_cpu_median": median_of(runs, size, runner, lambda r: r.measurement.tree_cpu_seconds),
                "server_cpu_median": median_of(runs, size, runner, lambda r: r.measurement.server_cpu_seconds),
                "foreign_cpu_median": median_of(runs, size, runner, lambda r: r.measurement.foreign_cpu_seconds),
                "tree_peak_rss_max": max(r.measurement.tree_peak_rss_bytes for r in mine),
                "file_bytes": median_of(runs, size, runner, lambda r: r.file_bytes),
            }
    return table


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


Summary = dict[int, dict[str, dict[str, Any]]]


def evaluate(summary: Summary, databases: dict[int, BenchDatabase]) -> list[dict[str, Any]]:
    """The issue's targets, checked at the largest size (memory across all sizes)."""
    size = max(summary)
    at = summary[size]

    def wall(runner: str) -> float | None:
        return at.get(runner, {}).get("wall_median")

    def secs(runner: str) -> str:
        return _fmt(wall(runner), ".2f", "s")

    def size_of(runner: str) -> float | None:
        return at.get(runner, {}).get("file_bytes")

    checks: list[dict[str, Any]] = []

    def check(name: str, measured: float | None, target: str, passed: bool | None, detail: str) -> None:
        checks.append({"target": name, "measured": None if measured is None else round(measured, 3),
                       "goal": target, "pass": passed, "detail": detail})

    big_enough = databases[size].size_bytes >= MIN_TARGET_DB_BYTES
    check("database size", databases[size].size_bytes / MIB, ">= 1024 MiB", big_enough,
          f"{databases[size].name} (pg_database_size)")
    speedup = _ratio(wall("seed_dump"), wall("ours_dump"))
    check("dump speed-up vs seed (seed / ours)", speedup, f">= {TARGET_SPEEDUP_VS_SEED}",
          None if speedup is None else speedup >= TARGET_SPEEDUP_VS_SEED,
          f"seed {secs('seed_dump')}, ours {secs('ours_dump')}")
    ours_size, seed_size = size_of("ours_dump"), size_of("seed_dump")
    check("dump file size vs seed (ours / seed)", _ratio(ours_size, seed_size), "<= 1.0",
          None if ours_size is None or seed_size is None else ours_size <= seed_size,
          f"seed {_mib(seed_size, ' MiB')}, ours {_mib(ours_size, ' MiB')}")
    vs_floor = _ratio(wall("ours_dump"), wall("floor"))
    check("dump vs floor (ours / pg_dump > /dev/null)", vs_floor, f"<= {TARGET_VS_FLOOR}",
          None if vs_floor is None else vs_floor <= TARGET_VS_FLOOR,
          f"floor {secs('floor')} (custom format {secs('floor_custom')}), ours {secs('ours_dump')}")
    verify = _ratio(wall("ours_verify"), wall("seed_restore"))
    check("verify vs seed restore (ours / seed)", verify, f"<= {TARGET_VERIFY_VS_SEED_RESTORE}",
          None if verify is None else verify <= TARGET_VERIFY_VS_SEED_RESTORE,
          f"seed restore {secs('seed_restore')}, ours verify {secs('ours_verify')}")
    peaks = {s: summary[s].get("ours_dump", {}).get("tree_peak_rss_max") for s in summary}
    known = {s: p for s, p in peaks.items() if p}
    if len(known) >= 2:
        small, large = min(known), max(known)
        flat = known[large] <= known[small] * FLAT_MEMORY_FACTOR + FLAT_MEMORY_SLACK
        check("dump peak RSS, largest / smallest size", known[large] / known[small],
              f"flat (<= {FLAT_MEMORY_FACTOR}x + {FLAT_MEMORY_SLACK // MIB} MiB)", flat,
              ", ".join(f"{s} MB: {p / MIB:.1f} MiB" for s, p in sorted(known.items())))
    else:
        check("dump peak RSS", None, "two sizes needed", None,
              ", ".join(f"{s} MB: {p / MIB:.1f} MiB" for s, p in sorted(known.items())))
    return checks


# --- incremental snapshots (a child process: its own PostgreSQL 18 cluster) ------------------------------

def run_incremental(args: argparse.Namespace, workdir: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """``bench_incremental.py`` as a child process (its progress on our stdout): its results, or why there are none."""
    output = workdir / "incremental.json"
    say(f"incremental snapshots: bench_incremental.py --size-mb {args.incremental_size_mb} (PostgreSQL 18 wheel)")
    result = subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "bench_incremental.py"),
                             "--size-mb", str(args.incremental_size_mb), "--output", str(output)], check=False)
    if not output.exists():  # exit 1 with results is a missed target, not a failure
        return {"error": f"bench_incremental.py exited {result.returncode} without results (see its output above)"}
    return dict(json.loads(output.read_text()))


def incremental_targets(incremental: dict[str, Any] | None) -> list[dict[str, Any]]:
    """bench_incremental.py's targets, in this report's shape (a crash: one check without a verdict)."""
    if incremental is None:
        return []
    if "error" in incremental or "skipped" in incremental:
        return [{"target": "incremental snapshots", "measured": None, "goal": "measured", "pass": None,
                 "detail": incremental.get("error") or f"skipped: {incremental['skipped']}"}]
    return [{**check, "target": f"incremental: {check['target']}"} for check in incremental["targets"]]


# --- output -----------------------------------------------------------------------------------

def _fmt(value: float | None, spec: str = ".2f", unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def _mib(value: float | None, unit: str = "") -> str:
    return _fmt(value and value / MIB, ".1f", unit)


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    verdicts = {True: "PASS", False: "FAIL", None: "n/a"}
    lines = [f"# backup-tasks daily-cycle benchmark, {report['started_at']}", "",
             f"Machine: {m['cpu_model']}, {m['nproc']} cores, {m['memory_gib']} GiB RAM, Linux {m['kernel']}; "
             f"PostgreSQL {m['postgresql_server']} ({m['pg_dump']}); Python {m['python']}, zstandard {m['zstandard']}. "
             f"Local server: " + ", ".join(f"{k}={v}" for k, v in sorted(m["local_server_settings"].items())) + ".",
             "", f"Rounds: {report['rounds']} (median reported), order rotated every round; "
             f"settle: wait up to {report['settle_timeout']}s for < {report['settle_cores']} busy cores before "
             f"each run; a run during which other work used > {report['max_foreign_cores']} cores was repeated "
             f"(up to {report['retries']} times) and left out of the medians.", "", "## Databases", ""]
    lines += markdown_table(
        ("database", "requested", "pg_database_size", "rows"),
        ((db["name"], f"{db['requested_mb']} MB", f"{db['size_bytes'] / MIB:.0f} MiB", f"{sum(db['rows'].values()):,}")
         for db in report["databases"]), "lrrr")
    lines += ["", "## Targets", ""]
    lines += markdown_table(
        ("target", "measured", "goal", "result", "detail"),
        ((c["target"], _fmt(c["measured"], ".3f"), c["goal"], verdicts[c["pass"]], c["detail"])
         for c in report["targets"]), "lr")
    lines += ["", "## Medians", ""]
    lines += markdown_table(
        ("size", "runner", "wall s (min-max)", "CPU tree s", "CPU server s", "foreign CPU s", "peak RSS tree MiB",
         "file MiB"),
        ((size, runner, f"{_fmt(s['wall_median'])} ({_fmt(s['wall_min'])}-{_fmt(s['wall_max'])})",
          _fmt(s["tree_cpu_median"]), _fmt(s["server_cpu_median"]), _fmt(s["foreign_cpu_median"]),
          _mib(s["tree_peak_rss_max"]), _mib(s["file_bytes"]))
         for size, runners in report["summary"].items() for runner, s in runners.items()), "rlrrrrrr")
    lines += ["", "## Every run", ""]
    lines += markdown_table(
        ("size", "round", "runner", "ok", "wall s", "CPU tree s", "CPU server s", "foreign s", "peak RSS MiB",
         "per-process peak MiB", "file MiB", "note"),
        ((r["size_mb"], r["round"], r["runner"],
          ("yes" if r["ok"] else "NO") + (" (disturbed, repeated)" if r["disturbed"] else ""),
          f"{r['wall_seconds']:.2f}", f"{r['tree_cpu_seconds']:.2f}", f"{r['server_cpu_seconds']:.2f}",
          f"{r['foreign_cpu_seconds']:.2f}", _mib(r["tree_peak_rss_bytes"]),
          ", ".join(f"{k} {v / MIB:.0f}" for k, v in sorted(r["process_peak_rss_bytes"].items())),
          _mib(r["file_bytes"]), r["note"])
         for r in report["runs"]), "rrllrrrrrlrl")
    if report.get("experiments"):
        lines += ["", "## Tuning experiments", "", report["experiments"]["markdown"]]
    if report.get("incremental"):
        incremental = report["incremental"]
        lines += ["", "## Incremental snapshots (bench_incremental.py)", "",
                  incremental.get("markdown") or
                  f"not measured: {incremental.get('error') or incremental.get('skipped')}"]
    lines += ["", "CPU tree: the command and its children (exact, from wait4). CPU server: PostgreSQL processes "
              "serving the run (local backends of the bench databases, verify's throwaway cluster), sampled every "
              "100 ms. Foreign: everything else the machine did meanwhile (other users, the sampler).", ""]
    return "\n".join(lines)


def print_table(report: dict[str, Any]) -> None:
    print()
    print(f"{'size':>6} {'runner':14} {'wall s':>8} {'min':>7} {'max':>7} {'cpu tree':>9} {'cpu srv':>8} "
          f"{'foreign':>8} {'rss MiB':>8} {'file MiB':>9}")
    for size, runners in report["summary"].items():
        for runner, s in runners.items():
            print(f"{size:>6} {runner:14} {_fmt(s['wall_median']):>8} {_fmt(s['wall_min']):>7} "
                  f"{_fmt(s['wall_max']):>7} {_fmt(s['tree_cpu_median']):>9} {_fmt(s['server_cpu_median']):>8} "
                  f"{_fmt(s['foreign_cpu_median']):>8} {s['tree_peak_rss_max'] / MIB:>8.1f} {_mib(s['file_bytes']):>9}")
    print()
    for c in report["targets"]:
        verdict = {True: "PASS", False: "FAIL", None: " n/a"}[c["pass"]]
        print(f"  {verdict}  {c['target']:45} {_fmt(c['measured'], '.3f'):>8}  (goal {c['goal']})  {c['detail']}")
    print()


# --- main -------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="250,1100",
                        help="database sizes in MB, comma-separated; the targets are checked at the largest "
                             "(default 250,1100)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per size (default 3; median reported)")
    parser.add_argument("--server-url", default=os.environ.get("BENCH_SERVER_URL", SERVER_URL),
                        help="maintenance database of the server to benchmark on (env BENCH_SERVER_URL)")
    parser.add_argument("--regenerate", action="store_true", help="drop and regenerate the bench databases")
    parser.add_argument("--drop", action="store_true", help="drop the bench databases at the end")
    parser.add_argument("--no-restore", action="store_true", help="skip seed_restore / ours_verify")
    parser.add_argument("--compression-level", type=int, default=None,
                        help="BACKUP_COMPRESSION_LEVEL for our dump (default: the package default)")
    parser.add_argument("--settle-cores", type=float, default=0.35,
                        help="before each run, wait until the machine uses fewer busy cores than this")
    parser.add_argument("--settle-timeout", type=float, default=45.0,
                        help="...but at most this many seconds (0 disables waiting)")
    parser.add_argument("--max-foreign-cores", type=float, default=0.25,
                        help="a run during which other work used more cores than this on average is repeated "
                             "(default 0.25)")
    parser.add_argument("--retries", type=int, default=2, help="how often a disturbed run is repeated (default 2)")
    parser.add_argument("--experiments", action="store_true", help="also run the tuning experiments")
    parser.add_argument("--no-incremental", action="store_true",
                        help="skip the incremental-snapshot benchmark (bench_incremental.py, ~5 minutes)")
    parser.add_argument("--incremental-size-mb", type=int, default=1024,
                        help="database size for bench_incremental.py (default 1024)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed (not only on errors)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--workdir-parent", default=None, help="where the temporary work directory goes")
    parser.add_argument("--keep-files", action="store_true", help="keep the work directory (dumps) at the end")
    args = parser.parse_args(argv)
    try:
        args.sizes = sorted({int(s) for s in str(args.sizes).split(",") if s.strip()})
    except ValueError:
        parser.error("--sizes takes whole numbers of MB, e.g. 250,1100")
    if not args.sizes or min(args.sizes) < 1:
        parser.error("--sizes needs at least one positive size")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    server = ConnInfo.from_url(args.server_url, setting="--server-url")
    if not CLI.exists():
        raise SystemExit(f"{CLI} is missing: run `make setup` first")
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    workdir_of_run = work_directory("bt-bench-", parent=args.workdir_parent, keep=args.keep_files)
    with connect(server) as admin, workdir_of_run as workdir:
        bench = Bench(args, server, workdir)
        facts = {**host_facts(), **server_facts(admin)}
        bench.say(f"{facts['cpu_model']}, {facts['nproc']} cores, {facts['memory_gib']} GiB; "
                  f"PostgreSQL {facts['postgresql_server']}; work dir {workdir}")
        databases = {size: ensure_database(admin, server, size, regenerate=args.regenerate, say=bench.say)
                     for size in args.sizes}
        if max(databases.values(), key=lambda d: d.size_bytes).size_bytes < MIN_TARGET_DB_BYTES:
            bench.say("note: the issue's targets are defined on at least 1 GiB; the largest size here is smaller")
        target_size = max(args.sizes)
        try:
            for size in args.sizes:
                db = databases[size]
                bench.say(f"warming the page cache: pg_dump {db.name} > /dev/null (not timed)")
                subprocess.run(["bash", "-c", FLOOR], env=bench.seed_env(db), check=True)
                for rnd in range(args.rounds):
                    for runner in rotated(DUMP_RUNNERS, rnd):
                        bench.run_one(db, rnd, runner)
                    if size == target_size and not args.no_restore:
                        for runner in rotated(RESTORE_RUNNERS, rnd):
                            bench.run_one(db, rnd, runner)
            experiments = None
            if args.experiments:
                experiments = run_experiments(bench, databases[target_size])
            incremental = None if args.no_incremental else run_incremental(args, workdir, bench.say)
        finally:
            with connect(server) as cleanup:
                drop_bench_database(cleanup, bench.restore_db_name())
                if args.drop:
                    for db in databases.values():
                        drop_bench_database(cleanup, db.name)
        summary = summarize(bench.runs, args.sizes)
        report: dict[str, Any] = {
            "started_at": started_at, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": facts, "rounds": args.rounds, "settle_cores": args.settle_cores,
            "settle_timeout": args.settle_timeout, "compression_level": args.compression_level,
            "max_foreign_cores": args.max_foreign_cores, "retries": args.retries,
            "databases": [vars(db) for db in databases.values()],
            "summary": summary, "targets": evaluate(summary, databases) + incremental_targets(incremental),
            "runs": [r.to_dict() for r in bench.runs], "experiments": experiments, "incremental": incremental,
        }
    print_table(report)
    written = write_results(stamp(), {".json": json.dumps(report, indent=2, default=str), ".md": markdown(report)},
                            directory=args.results_dir, also_as="latest")
    print(f"results: {written}.json and .md")
    missed = [c for c in report["targets"] if c["pass"] is False]
    crashed = incremental is not None and "error" in incremental
    return 1 if any(not r.ok for r in bench.runs) or crashed or (args.strict and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
