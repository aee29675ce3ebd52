#!/usr/bin/env python3
"""Disaster recovery replay: ``restore-pitr`` from the bucket alone vs from the local archive (issue 11).

A throwaway cluster initialised with ``--wal-segsize=1`` (1 MiB segments: 300+ segments of real WAL
without writing ~5 GB at 16 MiB each) archives through ``backup-tasks wal-push`` into a local
archive while a write load runs (many small committing transactions, so the commit scan and the
target are realistic); a snapshot is taken first. The local archive is then uploaded to a bucket
under ``<prefix>/wal/`` with the same keys (byte for byte what ``wal-push --copy-to`` writes; done in
one pass because a wal-push per segment to the bucket would make the setup take minutes), the snapshot
already being there through BACKUP_COPY_TO.

Each round restores to a late target time (90% into the load), A then B, into fresh data directories
with ``--start`` (the CLI in its own process), and times the whole command:

* ``local``: ``BACKUP_DIR=<local backups>`` (restore_command: ``wal-fetch --archive-dir``);
* ``bucket``: ``BACKUP_DIR=s3://bench-dr/prod`` and no WAL_ARCHIVE_DIR: catalog, snapshot and WAL from
  the bucket (restore_command: ``wal-fetch --archive-url`` with read-ahead).

The S3 server is moto's standalone server on loopback (an in-memory Python server; its CPU is
reported). Headline: the median of the per-round bucket/local ratios (goal: at most 1.5), and
segments replayed per second (counted from the restored server's "restored log file" lines).

    flock -x /tmp/bt-machine.lock .venv/bin/python bench/bench_dr_replay.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from support.machine import host_facts
from support.measure import rotated
from support.paths import ROOT, work_directory
from support.processes import cli_env, stop_server
from support.results import paired_ratios, stamp, write_results
from support.s3 import MotoProcess, S3Endpoint, moto_process

BUCKET = "bench-dr"
PREFIX = "prod"


def generate(workdir: Path, batches: int, rows: int) -> dict[str, Any]:
    """Snapshot, then ``batches`` committing inserts; the archive in ``workdir/backups/wal``; the target time."""
    from backup_tasks.physical.snapshot import take_snapshot
    from backup_tasks.postgres.cluster import ThrowawayCluster
    from backup_tasks.postgres.connect import connect
    from backup_tasks.postgres.servercmd import archive_command, server_command
    from backup_tasks.settings import Settings
    from backup_tasks.wal.setup import prepare_archive

    backup_dir = workdir / "backups"
    settings = Settings(backup_dir=str(backup_dir), broker_url="memory://", lock_url=None)
    archive, _ = prepare_archive(settings)
    command = archive_command(server_command(workdir / "tool"), archive.root)
    cluster = ThrowawayCluster(initdb_args=("--wal-segsize=1",), settings={
        "wal_level": "replica", "max_wal_senders": "4", "archive_mode": "on",
        "archive_command": shlex.quote(command), "archive_timeout": "0", "min_wal_size": "32MB"})
    started = time.perf_counter()
    with cluster as source:
        conninfo = source.conninfo()
        snap_settings = Settings(database_url=source.url(), backup_dir=str(backup_dir), broker_url="memory://",
                                 lock_url=None, copy_to=f"s3://{BUCKET}/{PREFIX}")
        with connect(conninfo) as conn:
            conn.execute("CREATE TABLE load (id bigint, payload text)")
        take_snapshot(snap_settings)
        target = None
        with connect(conninfo) as conn:
            for batch in range(batches):
                conn.execute("INSERT INTO load SELECT g, repeat(md5(g::text), 3) "
                             "FROM generate_series(%s::bigint, %s::bigint) g", (batch * rows, (batch + 1) * rows - 1))
                conn.commit()
                if batch == int(batches * 0.9):
                    target = str(conn.execute("SELECT now()::text").fetchone()[0])
                    conn.commit()
            last = str(conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0])
            conn.commit()
        deadline = time.monotonic() + 600
        while True:
            with connect(conninfo) as conn:
                done = conn.execute("SELECT last_archived_wal FROM pg_stat_archiver").fetchone()[0]
            if done and done[8:] >= last[8:]:
                break
            if time.monotonic() > deadline:
                raise SystemExit("archiving did not catch up within 10 minutes")
            time.sleep(0.5)
    segments = sorted(p.name for p in archive.root.glob("*/*.zst"))
    print(f"generated {len(segments)} archived WAL files in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    return {"target": target, "segments": len(segments), "archive": str(archive.root)}


def upload_archive(archive_root: Path, endpoint: S3Endpoint) -> int:
    """The local archive into ``s3://BUCKET/PREFIX/wal/<same key>`` (what wal-push --copy-to would have written)."""
    s3 = endpoint.client()
    files = [p for p in archive_root.rglob("*.zst") if not p.name.startswith(".")]

    def put(path: Path) -> None:
        s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/wal/{path.relative_to(archive_root)}", Body=path.read_bytes())

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, files))
    return len(files)


def replay_seconds(log_text: str) -> float | None:
    """From the first to the last "restored log file" line of the server log (its default prefix: %m)."""
    stamps = [line.split(" UTC", 1)[0] for line in log_text.splitlines() if "restored log file" in line]
    try:
        first, last = (datetime.strptime(s, "%Y-%m-%d %H:%M:%S.%f") for s in (stamps[0], stamps[-1]))
    except (IndexError, ValueError):
        return None
    return round((last - first).total_seconds(), 2)


def restore_once(label: str, workdir: Path, backup_dir: str, target: str, moto: MotoProcess,
                 round_number: int) -> dict[str, Any]:
    data_dir = workdir / f"restored-{label}-{round_number}"
    run_env = cli_env(**moto.endpoint.env(), BACKUP_DIR=backup_dir, CELERY_BROKER_URL="memory://")
    s3_before = moto.cpu_seconds()
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "backup_tasks.cli", "restore-pitr", "--json", "--data-dir",
                             str(data_dir), "--target-time", target, "--start"], env=run_env, capture_output=True,
                            text=True, cwd=ROOT, check=False, timeout=1800)
    seconds = time.perf_counter() - started
    s3_cpu = moto.cpu_seconds() - s3_before
    try:
        report = json.loads(result.stdout)
    except ValueError:
        raise SystemExit(f"{label}: restore-pitr failed:\n{result.stderr[-3000:]}") from None
    if not report.get("ok"):
        raise SystemExit(f"{label}: restore-pitr failed: {json.dumps(report)[-3000:]}")
    log_text = Path(report["log_file"]).read_text(errors="replace")
    replayed = log_text.count("restored log file")
    refetched = log_text.count("prefetched copy of")  # spooled objects discarded (damaged/stale/misplaced)
    replay = replay_seconds(log_text)
    stop_server(data_dir)
    shutil.rmtree(data_dir, ignore_errors=True)
    return {"seconds": round(seconds, 3), "restore_seconds": report["duration_seconds"], "segments": replayed,
            "segments_per_s": round(replayed / seconds, 1), "s3_server_cpu_seconds": round(s3_cpu, 2),
            "spool_discards": refetched, "replay_seconds": replay,
            "replay_segments_per_s": round(replayed / replay, 1) if replay else None,
            "stop": (report.get("outcome") or {}).get("stop_reason")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=120, help="committing inserts of the write load")
    parser.add_argument("--rows", type=int, default=20000, help="rows per insert")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    results: dict[str, Any] = {"machine": host_facts(), "rounds": args.rounds,
                               "started_at": datetime.now(UTC).isoformat(timespec="seconds")}
    # The postgres OS user runs wal-push / wal-fetch in the work directory.
    with work_directory("bt-bench-dr-", mode=0o711) as workdir, moto_process(workdir) as moto:
        moto.endpoint.create_bucket(BUCKET)
        os.environ.update(moto.endpoint.env())  # the snapshot (in this process) is copied to the bucket
        generated = generate(workdir, args.batches, args.rows)
        uploaded = upload_archive(Path(generated["archive"]), moto.endpoint)
        results.update(generated=generated, uploaded_objects=uploaded)
        runs: dict[str, list[dict[str, Any]]] = {"local": [], "bucket": []}
        variants = (("local", str(workdir / "backups")), ("bucket", f"s3://{BUCKET}/{PREFIX}"))
        for round_number in range(args.rounds):
            for label, backup_dir in rotated(variants, round_number):
                run = restore_once(label, workdir, backup_dir, generated["target"], moto, round_number)
                runs[label].append(run)
                print(f"round {round_number} {label:6}: {run['seconds']:6.1f}s, {run['segments']} segments, "
                      f"{run['segments_per_s']} segments/s (replay alone {run['replay_seconds']}s: "
                      f"{run['replay_segments_per_s']} segments/s)", file=sys.stderr)
        ratio, pairs = paired_ratios([r["seconds"] for r in runs["local"]], [r["seconds"] for r in runs["bucket"]])
        results["runs"] = runs
        results["summary"] = {
            label: {"median_seconds": statistics.median(r["seconds"] for r in rs),
                    "median_segments_per_s": statistics.median(r["segments_per_s"] for r in rs),
                    "median_replay_seconds": statistics.median(r["replay_seconds"] or 0 for r in rs),
                    "segments": rs[0]["segments"]} for label, rs in runs.items()}
        results["ratio_bucket_over_local"] = round(ratio, 3)
        results["pair_ratios"] = [round(r, 3) for r in pairs]
        results["goal"] = 1.5
        results["ok"] = results["ratio_bucket_over_local"] <= 1.5
    write_results(f"dr-replay-{stamp()}", {".json": json.dumps(results, indent=2)})
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for label, summary in results["summary"].items():
        print(f"{label:6}: median {summary['median_seconds']:.1f}s for {summary['segments']} segments "
              f"({summary['median_segments_per_s']} segments/s; replay alone {summary['median_replay_seconds']}s)")
    print(f"bucket / local: {results['ratio_bucket_over_local']} (pairs {results['pair_ratios']}; goal <= 1.5: "
          f"{'OK' if results['ok'] else 'MISSED'})")


if __name__ == "__main__":
    main()
