"""The daily cycle's measured runs: the seed's own commands and ours, on one bench database.

``DUMP_RUNNERS`` run at every size, ``RESTORE_RUNNERS`` at the largest (``run.py`` says what each
compares); the seed's commands are the shell lines below, ours the CLI with ``--json``. ``Bench``
holds what the runs share (the options, the server, the work directory, every run so far, the
newest backup per size) and runs each command on a quiet machine, repeated while other work
disturbs it (``--settle-*``, ``--max-foreign-cores``, ``--retries`` of ``run.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backup_tasks.conninfo import ConnInfo
from backup_tasks.postgres.connect import connect
from support import MIB
from support.databases import (
    DB_PREFIX,
    BenchDatabase,
    database_url,
    drop_bench_database,
    exists,
    mark_as_ours,
    row_counts,
)
from support.measure import Measurement, measure, wait_for_quiet
from support.paths import CLI
from support.processes import cli_env

DUMP_RUNNERS = ("seed_dump", "floor", "floor_custom", "ours_dump")
RESTORE_RUNNERS = ("seed_restore", "ours_verify")
SEED_DUMP = 'pg_dump "$DB_CONN" | gzip > "$BACKUP_FILE"'
FLOOR = 'pg_dump "$DB_CONN" > /dev/null'
FLOOR_CUSTOM = 'pg_dump --format=custom --compress=0 "$DB_CONN" > /dev/null'
SEED_RESTORE = 'createdb "$TEST_DB"\ngunzip -c "$BACKUP_FILE" | psql "$TEST_DB" > /dev/null'


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


def _failure(m: Measurement) -> str:
    return m.stderr_tail.strip()[-300:]


@dataclass
class Bench:
    args: argparse.Namespace
    server: ConnInfo
    workdir: Path
    runs: list[Run] = field(default_factory=list)
    latest_backup: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # verify's throwaway cluster runs as the postgres user under TMPDIR=<workdir>/tmp: let it through.
        self.scratch_dir.mkdir(mode=0o755, exist_ok=True)
        self.scratch_dir.chmod(0o1777)

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
        env = cli_env(DATABASE_URL=self.url_for(db.name), BACKUP_DIR=str(self.backup_dir(db)),
                      TMPDIR=str(self.scratch_dir))
        if self.args.compression_level is not None:
            env["BACKUP_COMPRESSION_LEVEL"] = str(self.args.compression_level)
        return env

    def url_for(self, dbname: str) -> str:
        return database_url(self.server, dbname)

    def backup_dir(self, db: BenchDatabase) -> Path:
        return self.workdir / f"backups-{db.requested_mb}"

    @property
    def scratch_dir(self) -> Path:
        """TMPDIR of our commands: verify's throwaway cluster lives here (the sampler finds it by this path)."""
        return self.workdir / "tmp"

    def seed_file(self, db: BenchDatabase) -> Path:
        return self.workdir / f"aitrapp_backup_{db.requested_mb}.sql.gz"

    def restore_db_name(self) -> str:
        return f"{DB_PREFIX}seedrestore_{os.getpid()}"

    def settle(self) -> float:
        return wait_for_quiet(max_cores=self.args.settle_cores, timeout=self.args.settle_timeout)

    def disturbed(self, m: Measurement) -> bool:
        """Other work used more than ``--max-foreign-cores`` on average during ``m``."""
        return m.foreign_cpu_seconds > self.args.max_foreign_cores * m.wall_seconds

    def run_one(self, db: BenchDatabase, rnd: int, runner: str) -> Run:
        """One measured run; repeated (up to ``--retries`` times) while other work disturbs it."""
        for attempt in range(self.args.retries + 1):
            waited = self.settle()
            run = getattr(self, f"_run_{runner}")(db, rnd)
            m = run.measurement
            m.settle_wait_seconds = waited
            foreign_cores = m.foreign_cpu_seconds / m.wall_seconds if m.wall_seconds else 0.0
            run.disturbed = run.ok and self.disturbed(m) and attempt < self.args.retries
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
        m = self._bash("seed_dump", SEED_DUMP, self.seed_env(db, {"BACKUP_FILE": str(target)}), db)
        return Run(db.requested_mb, rnd, "seed_dump", m, file_bytes=target.stat().st_size if target.exists() else None,
                   ok=m.exit_code == 0, note=_failure(m) if m.exit_code else "")

    def _run_floor(self, db: BenchDatabase, rnd: int) -> Run:
        m = self._bash("floor", FLOOR, self.seed_env(db), db)
        return Run(db.requested_mb, rnd, "floor", m, ok=m.exit_code == 0, note=_failure(m))

    def _run_floor_custom(self, db: BenchDatabase, rnd: int) -> Run:
        m = self._bash("floor_custom", FLOOR_CUSTOM, self.seed_env(db), db)
        return Run(db.requested_mb, rnd, "floor_custom", m, ok=m.exit_code == 0, note=_failure(m))

    def _run_ours_dump(self, db: BenchDatabase, rnd: int) -> Run:
        previous = self.latest_backup.get(db.requested_mb)
        m = measure("ours_dump", [str(CLI), "dump", "--json"], env=self.our_env(db), databases=self._databases(db))
        run = Run(db.requested_mb, rnd, "ours_dump", m, ok=m.exit_code == 0)
        try:
            manifest = json.loads(m.stdout)
        except ValueError:
            manifest = {}
        if m.exit_code != 0 or "id" not in manifest:
            run.ok, run.note = False, (manifest.get("error") or _failure(m) or "no manifest")
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
        # Marked as ours afterwards (the seed's createdb makes it; the comment lets us drop it safely).
        m = self._bash("seed_restore", SEED_RESTORE, env, db)
        ok = m.exit_code == 0 and "ERROR:" not in m.stderr_tail
        note = "" if ok else _failure(m)
        with connect(self.server) as admin:
            if exists(admin, target):
                mark_as_ours(admin, target, "seed restore")
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
                "; ".join(result.get("problems") or []) or result.get("error") or _failure(m))
        return Run(db.requested_mb, rnd, "ours_verify", m, ok=ok, note=note)
