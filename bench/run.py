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
Every run is measured from ``/proc`` (``measure.py``): wall time, CPU of the command's process tree
and of the server processes working for it, and peak RSS of the tree sampled every 50 ms.

Results: a table on stdout, and ``bench/results/<stamp>.json`` + ``.md`` (also ``latest.*``).

    .venv/bin/python bench/run.py                      # the issue's targets, ~10 minutes
    .venv/bin/python bench/run.py --sizes 1100 --rounds 5
    .venv/bin/python bench/run.py --experiments        # also the tuning experiments (experiments.py)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path[:0] = [str(ROOT), str(BENCH_DIR)]

import psycopg  # noqa: E402
from measure import Measurement, measure, wait_for_quiet  # noqa: E402
from psycopg import sql  # noqa: E402

from backup_tasks.conninfo import ConnInfo  # noqa: E402
from backup_tasks.postgres import sampledata  # noqa: E402
from backup_tasks.postgres.connect import connect  # noqa: E402
from backup_tasks.postgres.tools import find_tool  # noqa: E402

MIB = 1 << 20
DB_PREFIX = "bt_bench_"
#: Written on every database the bench generates; only databases carrying it are ever dropped.
DB_MARKER = "backup-tasks benchmark data"
SIZE_TOLERANCE = 0.10
CLI = ROOT / ".venv" / "bin" / "backup-tasks"

#: The issue's targets (Speed section of issue 3).
TARGET_SPEEDUP_VS_SEED = 2.5
TARGET_VS_FLOOR = 1.15
TARGET_VERIFY_VS_SEED_RESTORE = 0.6
MIN_TARGET_DB_BYTES = 1 << 30
#: "Flat" memory: the peak at the largest size is at most this much above the smallest size's peak.
FLAT_MEMORY_FACTOR = 1.2
FLAT_MEMORY_SLACK = 8 * MIB

DUMP_RUNNERS = ("seed_dump", "floor", "floor_custom", "ours_dump")
RESTORE_RUNNERS = ("seed_restore", "ours_verify")


# --- databases --------------------------------------------------------------------------------

@dataclass
class BenchDatabase:
    name: str
    requested_mb: int
    size_bytes: int
    generated: bool
    generate_seconds: float | None
    rows: dict[str, int]


def database_size(admin: psycopg.Connection, name: str) -> int | None:
    row = admin.execute("SELECT pg_database_size(%s)", (name,)).fetchone() if _exists(admin, name) else None
    return int(row[0]) if row else None


def _exists(admin: psycopg.Connection, name: str) -> bool:
    return admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


def _is_ours(admin: psycopg.Connection, name: str) -> bool:
    row = admin.execute("SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
                        (name,)).fetchone()
    return bool(row and row[0] and str(row[0]).startswith(DB_MARKER))


def drop_bench_database(admin: psycopg.Connection, name: str) -> None:
    """Drop ``name`` only if the bench made it (it carries ``DB_MARKER``)."""
    if not _exists(admin, name):
        return
    if not _is_ours(admin, name):
        raise SystemExit(f"refusing to drop {name}: it was not created by this benchmark")
    admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def create_bench_database(admin: psycopg.Connection, name: str, comment: str) -> None:
    ident = sql.Identifier(name)
    admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(ident))
    admin.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(ident, sql.Literal(comment)))


def row_counts(conninfo: ConnInfo) -> dict[str, int]:
    with connect(conninfo) as conn:
        rows = conn.execute("SELECT relname, n_live_tup FROM pg_stat_user_tables ORDER BY relname").fetchall()
    return {str(name): int(count) for name, count in rows}


def ensure_database(admin: psycopg.Connection, server: ConnInfo, size_mb: int, *, regenerate: bool,
                    say: Callable[[str], None]) -> BenchDatabase:
    """``bt_bench_<MB>`` with about ``size_mb`` of trading data: reused when its size fits, else (re)made."""
    name = f"{DB_PREFIX}{size_mb}"
    existing = database_size(admin, name)
    fits = existing is not None and abs(existing / MIB - size_mb) <= SIZE_TOLERANCE * size_mb
    if existing is not None and fits and not regenerate and _is_ours(admin, name):
        say(f"reusing {name} ({existing / MIB:.0f} MiB)")
        return BenchDatabase(name, size_mb, existing, False, None, row_counts(server.with_dbname(name)))
    if existing is not None:
        if not _is_ours(admin, name):
            raise SystemExit(f"{name} exists but was not created by this benchmark; drop or rename it yourself")
        say(f"dropping {name} ({existing / MIB:.0f} MiB, wanted {size_mb} MiB)")
        drop_bench_database(admin, name)
    say(f"generating {name}: about {size_mb} MiB of trading data (sampledata.generate)")
    create_bench_database(admin, name, f"{DB_MARKER} ({size_mb} MiB)")
    started = time.monotonic()
    sampledata.generate(server.with_dbname(name), size_mb=size_mb)
    with connect(server.with_dbname(name)) as conn:
        # A settled database, as production is after autovacuum: hint bits set, visibility map
        # current, so no run pays for the first reader's clean-up.
        conn.execute("VACUUM (FREEZE, ANALYZE)")
    took = time.monotonic() - started
    size = database_size(admin, name) or 0
    say(f"generated {name}: {size / MIB:.0f} MiB in {took:.0f}s")
    if abs(size / MIB - size_mb) > SIZE_TOLERANCE * size_mb:
        say(f"warning: {name} is {size / MIB:.0f} MiB, not ~{size_mb}: adjust sampledata.BYTES_PER_SIGNAL")
    return BenchDatabase(name, size_mb, size, True, round(took, 1), row_counts(server.with_dbname(name)))


# --- machine ----------------------------------------------------------------------------------

def _first_match(path: str, prefix: str) -> str | None:
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def machine_facts(admin: psycopg.Connection) -> dict[str, Any]:
    import zstandard

    settings = dict(admin.execute(
        "SELECT name, setting || coalesce(' ' || unit, '') FROM pg_settings WHERE name IN "
        "('shared_buffers', 'fsync', 'wal_level', 'synchronous_commit', 'max_wal_size', 'maintenance_work_mem', "
        "'work_mem', 'max_parallel_maintenance_workers', 'jit')").fetchall())
    pg_dump = find_tool("pg_dump")
    mem_kib = _first_match("/proc/meminfo", "MemTotal")
    return {
        "cpu_model": _first_match("/proc/cpuinfo", "model name") or platform.processor(),
        "nproc": os.cpu_count(),
        "memory_gib": round(int(mem_kib.split()[0]) / (1 << 20), 1) if mem_kib else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "zstandard": zstandard.__version__,
        "postgresql_server": str(admin.execute("SHOW server_version").fetchone()[0]),
        "pg_dump": subprocess.run([str(pg_dump.path), "--version"], capture_output=True, text=True,
                                  check=False).stdout.strip(),
        "gzip": subprocess.run(["gzip", "--version"], capture_output=True, text=True,
                               check=False).stdout.splitlines()[0],
        "local_server_settings": settings,
    }


# --- runs -------------------------------------------------------------------------------------

@dataclass
class Run:
    size_mb: int
    round: int
    runner: str
    measurement: Measurement
    file_bytes: int | None = None
    ok: bool = True
    note: str = ""
    #: Other work on the machine took more than ``--max-foreign-cores`` during the run: it was
    #: repeated, and this one is kept in the record but left out of the medians.
    disturbed: bool = False

    @property
    def counts(self) -> bool:
        return self.ok and not self.disturbed

    def to_dict(self) -> dict[str, Any]:
        return {"size_mb": self.size_mb, "round": self.round, "runner": self.runner, "ok": self.ok,
                "disturbed": self.disturbed, "note": self.note, "file_bytes": self.file_bytes,
                **self.measurement.summary()}


@dataclass
class Bench:
    args: argparse.Namespace
    server: ConnInfo
    workdir: Path
    runs: list[Run] = field(default_factory=list)
    latest_backup: dict[int, str] = field(default_factory=dict)

    def say(self, text: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {text}", flush=True)

    # Environments: the seed's scripts get the URL the way they expect it; ours get DATABASE_URL.
    def seed_env(self, db: BenchDatabase, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(self.server.libpq_env())
        env.pop("PGDATABASE", None)
        env["DB_CONN"] = self.url_for(db.name)
        env.update(extra or {})
        return env

    def our_env(self, db: BenchDatabase) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PG", "BACKUP_", "VERIFY_DATABASE_URL", "DATABASE_URL"))}
        env.update(DATABASE_URL=self.url_for(db.name), BACKUP_DIR=str(self.backup_dir(db)),
                   TMPDIR=str(self.scratch_dir))
        if self.args.compression_level is not None:
            env["BACKUP_COMPRESSION_LEVEL"] = str(self.args.compression_level)
        return env

    def url_for(self, dbname: str) -> str:
        user = f"{self.server.user}@" if self.server.user else ""
        port = f":{self.server.port}" if self.server.port else ""
        return f"postgresql://{user}{self.server.host or ''}{port}/{dbname}"

    def backup_dir(self, db: BenchDatabase) -> Path:
        return self.workdir / f"backups-{db.requested_mb}"

    @property
    def scratch_dir(self) -> Path:
        return self.workdir / "tmp"

    def seed_file(self, db: BenchDatabase) -> Path:
        return self.workdir / f"aitrapp_backup_{db.requested_mb}.sql.gz"

    def restore_db_name(self) -> str:
        return f"{DB_PREFIX}seedrestore_{os.getpid()}"

    def settle(self) -> float:
        if self.args.settle_timeout <= 0:
            return 0.0
        return wait_for_quiet(max_cores=self.args.settle_cores, timeout=self.args.settle_timeout)

    def run_one(self, db: BenchDatabase, rnd: int, runner: str) -> Run:
        """One measured run; repeated (up to ``--retries`` times) while other work disturbs it."""
        for attempt in range(self.args.retries + 1):
            waited = self.settle()
            run = getattr(self, f"_run_{runner}")(db, rnd)
            m = run.measurement
            m.settle_wait_seconds = waited
            foreign_cores = m.foreign_cpu_seconds / m.wall_seconds if m.wall_seconds else 0.0
            run.disturbed = run.ok and foreign_cores > self.args.max_foreign_cores and attempt < self.args.retries
            self.runs.append(run)
            size = f" file {run.file_bytes / MIB:7.1f} MiB" if run.file_bytes else ""
            flag = "" if run.ok else f"  FAILED: {run.note}"
            flag += f"  (disturbed: {foreign_cores:.2f} foreign cores; repeating)" if run.disturbed else ""
            self.say(f"{db.requested_mb:>5} MB round {rnd} {runner:13} {m.wall_seconds:7.2f}s  cpu tree "
                     f"{m.tree_cpu_seconds:5.2f}s server {m.server_cpu_seconds:5.2f}s foreign "
                     f"{m.foreign_cpu_seconds:5.2f}s  rss {m.tree_peak_rss_bytes / MIB:6.1f} MiB{size}{flag}")
            if not run.disturbed:
                break
        return run

    def _databases(self, db: BenchDatabase) -> list[str]:
        return [db.name, self.restore_db_name()]

    def _bash(self, label: str, script: str, env: dict[str, str], db: BenchDatabase) -> Measurement:
        return measure(label, ["bash", "-c", f"set -euo pipefail\n{script}"], env=env, databases=self._databases(db))

    def _run_seed_dump(self, db: BenchDatabase, rnd: int) -> Run:
        target = self.seed_file(db)
        env = self.seed_env(db, {"BACKUP_FILE": str(target)})
        m = self._bash("seed_dump", 'pg_dump "$DB_CONN" | gzip > "$BACKUP_FILE"', env, db)
        return Run(db.requested_mb, rnd, "seed_dump", m, file_bytes=target.stat().st_size if target.exists() else None,
                   ok=m.exit_code == 0, note=m.stderr_tail.strip()[-300:] if m.exit_code else "")

    def _run_floor(self, db: BenchDatabase, rnd: int) -> Run:
        m = self._bash("floor", 'pg_dump "$DB_CONN" > /dev/null', self.seed_env(db), db)
        return Run(db.requested_mb, rnd, "floor", m, ok=m.exit_code == 0, note=m.stderr_tail.strip()[-300:])

    def _run_floor_custom(self, db: BenchDatabase, rnd: int) -> Run:
        m = self._bash("floor_custom", 'pg_dump --format=custom --compress=0 "$DB_CONN" > /dev/null',
                       self.seed_env(db), db)
        return Run(db.requested_mb, rnd, "floor_custom", m, ok=m.exit_code == 0, note=m.stderr_tail.strip()[-300:])

    def _run_ours_dump(self, db: BenchDatabase, rnd: int) -> Run:
        previous = self.latest_backup.get(db.requested_mb)
        m = measure("ours_dump", [str(CLI), "dump", "--json"], env=self.our_env(db), databases=self._databases(db))
        run = Run(db.requested_mb, rnd, "ours_dump", m, ok=m.exit_code == 0)
        try:
            manifest = json.loads(m.stdout)
        except ValueError:
            manifest = {}
        if m.exit_code != 0 or "id" not in manifest:
            run.ok, run.note = False, (manifest.get("error") or m.stderr_tail.strip()[-300:] or "no manifest")
            return run
        run.file_bytes = int(manifest["size_bytes"])
        run.note = f"{manifest['compression']}, {len(manifest['tables'])} tables"
        self.latest_backup[db.requested_mb] = manifest["id"]
        if previous:  # keep one backup per size: disk space, and verify always takes the newest
            for leftover in self.backup_dir(db).glob(f"{previous}.*"):
                leftover.unlink()
        return run

    def _run_seed_restore(self, db: BenchDatabase, rnd: int) -> Run:
        target = self.restore_db_name()
        with connect(self.server) as admin:
            drop_bench_database(admin, target)
        env = self.seed_env(db, {"BACKUP_FILE": str(self.seed_file(db)), "TEST_DB": target})
        # Marked as ours first (the seed's createdb makes it; the comment lets us drop it safely).
        m = self._bash("seed_restore", 'createdb "$TEST_DB"\ngunzip -c "$BACKUP_FILE" | psql "$TEST_DB" > /dev/null',
                       env, db)
        ok = m.exit_code == 0 and "ERROR:" not in m.stderr_tail
        note = "" if ok else m.stderr_tail.strip()[-300:]
        with connect(self.server) as admin:
            if _exists(admin, target):
                admin.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(
                    sql.Identifier(target), sql.Literal(f"{DB_MARKER} (seed restore)")))
                if ok:
                    restored = row_counts(self.server.with_dbname(target))
                    if sum(restored.values()) == 0:
                        ok, note = False, "the restored database is empty"
                drop_bench_database(admin, target)
        return Run(db.requested_mb, rnd, "seed_restore", m, ok=ok, note=note)

    def _run_ours_verify(self, db: BenchDatabase, rnd: int) -> Run:
        backup_id = self.latest_backup[db.requested_mb]
        m = measure("ours_verify", [str(CLI), "verify", backup_id, "--json"], env=self.our_env(db),
                    databases=self._databases(db), scratch_marker=str(self.scratch_dir))
        try:
            result = json.loads(m.stdout)
        except ValueError:
            result = {}
        ok = m.exit_code == 0 and result.get("ok") is True
        note = (f"verify itself {result.get('duration_seconds')}s; checked {','.join(result.get('checked', []))}; "
                f"{result.get('indexes_checked')} indexes" if ok else
                "; ".join(result.get("problems") or []) or result.get("error") or m.stderr_tail.strip()[-300:])
        return Run(db.requested_mb, rnd, "ours_verify", m, ok=ok, note=note)


# --- analysis ---------------------------------------------------------------------------------

def rotated(items: Sequence[str], by: int) -> list[str]:
    by %= len(items)
    return [*items[by:], *items[:by]]


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
          f"seed {_fmt(seed_size and seed_size / MIB, '.1f', ' MiB')}, "
          f"ours {_fmt(ours_size and ours_size / MIB, '.1f', ' MiB')}")
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


# --- output -----------------------------------------------------------------------------------

def _fmt(value: float | None, spec: str = ".2f", unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"# backup-tasks daily-cycle benchmark, {report['started_at']}", "",
             f"Machine: {m['cpu_model']}, {m['nproc']} cores, {m['memory_gib']} GiB RAM, Linux {m['kernel']}; "
             f"PostgreSQL {m['postgresql_server']} ({m['pg_dump']}); Python {m['python']}, zstandard {m['zstandard']}. "
             f"Local server: " + ", ".join(f"{k}={v}" for k, v in sorted(m["local_server_settings"].items())) + ".",
             "", f"Rounds: {report['rounds']} (median reported), order rotated every round; "
             f"settle: wait up to {report['settle_timeout']}s for < {report['settle_cores']} busy cores before "
             f"each run; a run during which other work used > {report['max_foreign_cores']} cores was repeated "
             f"(up to {report['retries']} times) and left out of the medians.", "", "## Databases", "",
             "| database | requested | pg_database_size | rows |",
             "|---|---:|---:|---:|"]
    for db in report["databases"]:
        lines.append(f"| {db['name']} | {db['requested_mb']} MB | {db['size_bytes'] / MIB:.0f} MiB | "
                     f"{sum(db['rows'].values()):,} |")
    lines += ["", "## Targets", "", "| target | measured | goal | result | detail |", "|---|---:|---|---|---|"]
    for c in report["targets"]:
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[c["pass"]]
        lines.append(f"| {c['target']} | {_fmt(c['measured'], '.3f')} | {c['goal']} | {verdict} | {c['detail']} |")
    lines += ["", "## Medians", "",
              "| size | runner | wall s (min-max) | CPU tree s | CPU server s | foreign CPU s | peak RSS tree MiB "
              "| file MiB |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for size, runners in report["summary"].items():
        for runner, s in runners.items():
            lines.append(
                f"| {size} | {runner} | {_fmt(s['wall_median'])} ({_fmt(s['wall_min'])}-{_fmt(s['wall_max'])}) | "
                f"{_fmt(s['tree_cpu_median'])} | {_fmt(s['server_cpu_median'])} | {_fmt(s['foreign_cpu_median'])} | "
                f"{_fmt(s['tree_peak_rss_max'] / MIB, '.1f')} | "
                f"{_fmt(s['file_bytes'] and s['file_bytes'] / MIB, '.1f')} |")
    lines += ["", "## Every run", "",
              "| size | round | runner | ok | wall s | CPU tree s | CPU server s | foreign s | peak RSS MiB "
              "| per-process peak MiB | file MiB | note |",
              "|---:|---:|---|---|---:|---:|---:|---:|---:|---|---:|---|"]
    for r in report["runs"]:
        per_process = ", ".join(f"{k} {v / MIB:.0f}" for k, v in sorted(r["process_peak_rss_bytes"].items()))
        state = ("yes" if r["ok"] else "NO") + (" (disturbed, repeated)" if r["disturbed"] else "")
        lines.append(f"| {r['size_mb']} | {r['round']} | {r['runner']} | {state} | "
                     f"{r['wall_seconds']:.2f} | {r['tree_cpu_seconds']:.2f} | {r['server_cpu_seconds']:.2f} | "
                     f"{r['foreign_cpu_seconds']:.2f} | {r['tree_peak_rss_bytes'] / MIB:.1f} | {per_process} | "
                     f"{_fmt(r['file_bytes'] and r['file_bytes'] / MIB, '.1f')} | {r['note']} |")
    if report.get("experiments"):
        lines += ["", "## Tuning experiments", "", report["experiments"]["markdown"]]
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
                  f"{_fmt(s['foreign_cpu_median']):>8} {s['tree_peak_rss_max'] / MIB:>8.1f} "
                  f"{_fmt(s['file_bytes'] and s['file_bytes'] / MIB, '.1f'):>9}")
    print()
    for c in report["targets"]:
        verdict = {True: "PASS", False: "FAIL", None: " n/a"}[c["pass"]]
        print(f"  {verdict}  {c['target']:45} {_fmt(c['measured'], '.3f'):>8}  (goal {c['goal']})  {c['detail']}")
    print()


# --- main -------------------------------------------------------------------------------------

@contextmanager
def work_directory(keep: bool, parent: str | None) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="bt-bench-", dir=parent))
    # verify's throwaway cluster runs as the postgres user under TMPDIR=<workdir>/tmp: let it through.
    path.chmod(0o755)
    (path / "tmp").mkdir(mode=0o755)
    (path / "tmp").chmod(0o1777)
    try:
        yield path
    finally:
        if keep:
            print(f"[bench] kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="250,1100",
                        help="database sizes in MB, comma-separated; the targets are checked at the largest "
                             "(default 250,1100)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per size (default 3; median reported)")
    parser.add_argument("--server-url", default=os.environ.get("BENCH_SERVER_URL",
                                                               "postgresql://postgres@127.0.0.1:5432/postgres"),
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
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed (not only on errors)")
    parser.add_argument("--results-dir", type=Path, default=BENCH_DIR / "results")
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
    with connect(server) as admin, work_directory(args.keep_files, args.workdir_parent) as workdir:
        bench = Bench(args, server, workdir)
        facts = machine_facts(admin)
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
                subprocess.run(["bash", "-c", 'pg_dump "$DB_CONN" > /dev/null'], env=bench.seed_env(db), check=True)
                for rnd in range(args.rounds):
                    for runner in rotated(DUMP_RUNNERS, rnd):
                        bench.run_one(db, rnd, runner)
                    if size == target_size and not args.no_restore:
                        for runner in rotated(RESTORE_RUNNERS, rnd):
                            bench.run_one(db, rnd, runner)
            experiments = None
            if args.experiments:
                from experiments import run_experiments

                experiments = run_experiments(bench, databases[target_size])
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
            "summary": summary, "targets": evaluate(summary, databases),
            "runs": [r.to_dict() for r in bench.runs], "experiments": experiments,
        }
    print_table(report)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for suffix, text in ((".json", json.dumps(report, indent=2, default=str)), (".md", markdown(report))):
        (args.results_dir / f"{stamp}{suffix}").write_text(text)
        (args.results_dir / f"latest{suffix}").write_text(text)
    print(f"results: {args.results_dir / stamp}.json and .md")
    missed = [c for c in report["targets"] if c["pass"] is False]
    return 1 if any(not r.ok for r in bench.runs) or (args.strict and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
