#!/usr/bin/env python3
"""Off-site storage and encryption: what do they cost? Ratios measured in one run, on this machine.

1. ``dump`` to an S3 bucket on loopback vs ``dump`` to local disk: the real ``run_dump``, only
   ``BACKUP_DIR`` differs (target: within 1.3x). The bucket is moto's standalone S3 server,
   started here on 127.0.0.1 (an in-memory Python server: a real S3/MinIO is faster, not slower).
2. Encryption: the dump pipeline (pg_dump | zstd | sha256 | storage writer) with and without
   the age stage in front of the writer (target: at most 15% slower). Until dump.py has the
   encryption stage wired in, this is a faithful copy of its loop (``pipeline`` below).
3. The layers alone on a synthetic compressed stream (``--stream-mb``): throughput of the local
   writer, the S3 writer and the age writer, and peak memory of each.

Every variant runs in its own process, A then B, round after round (round 0 only warms up). The
headline ratio is the median of the per-round B/A ratios, so load from other work on the machine hits
both sides of each pair; CPU seconds (the process and its pg_dump, plus the S3 server's for the
bucket) and peak RSS (the child's own ``VmHWM``) are reported too. The database is the bench's
``bt_bench_<MB>`` (``support/databases.py``: generated once, shared with ``run.py``, kept for re-runs
unless ``--drop``), or given with ``--database-url``.

    .venv/bin/python bench/bench_offsite.py --size-mb 1100 --rounds 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any

# Only what the children need at the top: their peak RSS is a figure of the report, so the
# orchestration's modules are imported in main().
from support import MIB
from support.measure import rss_bytes

if TYPE_CHECKING:
    from support.s3 import S3Endpoint

BUCKET = "bench-offsite"


# --- the measured work (runs in a child process) ---------------------------------------------------

def pipeline(database_url: str, backup_dir: str, recipients: list[str]) -> dict[str, Any]:
    """dump.py's loop (pg_dump custom format -> zstd with a worker thread -> sha256 -> writer), optionally encrypted."""
    from backup_tasks.conninfo import ConnInfo
    from backup_tasks.postgres.tools import find_tool, tool_env
    from backup_tasks.storage.integrity import HashingWriter
    from backup_tasks.storage.locations import open_storage
    from backup_tasks.streams.codec import compressor
    from backup_tasks.streams.crypto import EncryptingWriter

    conninfo = ConnInfo.from_url(database_url)
    storage = open_storage(backup_dir)
    pg_dump = find_tool("pg_dump")
    started = time.perf_counter()
    proc = subprocess.Popen([str(pg_dump.path), "--format=custom", "--compress=0", "--no-password"],
                            stdout=subprocess.PIPE, env=tool_env(conninfo))
    stored = HashingWriter(storage.writer("bench.dump.zst"))
    writer: Any = EncryptingWriter(stored, recipients) if recipients else stored
    comp = compressor("zstd", None, threads=1)
    assert proc.stdout is not None
    raw = 0
    while chunk := proc.stdout.read(MIB):
        raw += len(chunk)
        out = comp.compress(chunk)
        if out:
            writer.write(out)
    writer.write(comp.flush())
    if proc.wait() != 0:
        writer.abort()
        raise SystemExit("pg_dump failed")
    writer.commit()
    return {"seconds": time.perf_counter() - started, "raw_bytes": raw, "stored_bytes": stored.bytes_written}


def real_dump(database_url: str, backup_dir: str) -> dict[str, Any]:
    from backup_tasks.logical.dump import run_dump
    from backup_tasks.settings import Settings

    settings = Settings(database_url=database_url, backup_dir=backup_dir, broker_url="memory://", lock_url=None)
    started = time.perf_counter()
    manifest, _ = run_dump(settings)
    return {"seconds": time.perf_counter() - started, "stored_bytes": manifest.size_bytes, "id": manifest.id}


def synthetic(target: str, stream_mb: int, recipients: list[str]) -> dict[str, Any]:
    """A compressed stream of ``stream_mb`` MiB (already compressed: the layers see what a dump hands them)."""
    from backup_tasks.storage.integrity import HashingWriter
    from backup_tasks.storage.locations import open_storage
    from backup_tasks.streams.crypto import EncryptingWriter

    block = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(MIB // 32))
    storage = open_storage(target)
    started = time.perf_counter()
    stored = HashingWriter(storage.writer("synthetic.bin"))
    writer: Any = EncryptingWriter(stored, recipients) if recipients else stored
    for _ in range(stream_mb):
        writer.write(block)
    writer.commit()
    return {"seconds": time.perf_counter() - started, "stored_bytes": stored.bytes_written}


def child_main(args: argparse.Namespace) -> None:
    recipients = [r for r in (args.recipient or "").split(",") if r]
    if args.child == "dump":
        result = real_dump(args.database_url, args.target)
    elif args.child == "pipeline":
        result = pipeline(args.database_url, args.target, recipients)
    else:
        result = synthetic(args.target, args.stream_mb, recipients)
    # Read here, not from wait4 in the parent: a spawned child's ru_maxrss starts at the parent's RSS
    # (the address space it ran in until exec); VmHWM counts only this process's own memory.
    _current, peak = rss_bytes(os.getpid())
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # pg_dump
    result["peak_rss_mib"] = round(max(peak, children) / MIB, 1)
    print(json.dumps(result))


# --- orchestration ------------------------------------------------------------------------------------

def run_child_measured(kind: str, target: str, env: dict[str, str], args: argparse.Namespace,
                       recipient: str = "") -> dict[str, Any]:
    """One variant in a fresh process (it reports its own peak RSS); its CPU and its children's come from wait4."""
    argv = [sys.executable, __file__, "--child", kind, "--target", target, "--stream-mb", str(args.stream_mb)]
    if args.database_url:
        argv += ["--database-url", args.database_url]
    if recipient:
        argv += ["--recipient", recipient]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.posix_spawn(sys.executable, argv, env,
                             file_actions=[(os.POSIX_SPAWN_DUP2, out.fileno(), 1),
                                           (os.POSIX_SPAWN_DUP2, err.fileno(), 2)])
        _, status, usage = os.wait4(pid, 0)
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{kind} -> {target} failed:\n{err.read().decode(errors='replace')[-3000:]}")
        result: dict[str, Any] = json.loads(out.read().decode().strip().splitlines()[-1])
    # CPU of the process and the children it waited for (pg_dump): steadier than wall time on a busy machine.
    result["cpu_seconds"] = round(usage.ru_utime + usage.ru_stime, 3)
    return result


def clear_target(target: str, endpoint: S3Endpoint) -> None:
    if target.startswith("s3://"):
        endpoint.empty_bucket(BUCKET)
    else:
        shutil.rmtree(target, ignore_errors=True)


def compare(name: str, a_name: str, a: list[dict[str, Any]], b_name: str, b: list[dict[str, Any]],
            target: float) -> dict[str, Any]:
    """Headline: the median of the per-round ratios (A and B ran back to back, so they saw the same load)."""
    from support.results import paired_ratios

    a_med = statistics.median(r["seconds"] for r in a)
    b_med = statistics.median(r["seconds"] for r in b)
    ratio, pairs = paired_ratios([r["seconds"] for r in a], [r["seconds"] for r in b])
    cpu_a = statistics.median(r["cpu_seconds"] + r.get("server_cpu_seconds", 0) for r in a)
    cpu_b = statistics.median(r["cpu_seconds"] + r.get("server_cpu_seconds", 0) for r in b)
    return {"comparison": name, a_name: round(a_med, 2), b_name: round(b_med, 2), "ratio": round(ratio, 3),
            "ratio_of_medians": round(b_med / a_med, 3), "pair_ratios": [round(p, 3) for p in pairs],
            "cpu_seconds": {a_name: round(cpu_a, 2), b_name: round(cpu_b, 2)}, "target": target, "ok": ratio <= target,
            f"{a_name}_peak_rss_mib": max(r["peak_rss_mib"] for r in a),
            f"{b_name}_peak_rss_mib": max(r["peak_rss_mib"] for r in b),
            "stored_mib": round(statistics.median(r["stored_bytes"] for r in b) / MIB, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, default=1100, help="benchmark database size (default 1100)")
    parser.add_argument("--database-url", help="dump this database instead of generating one (read only)")
    parser.add_argument("--admin-url", default=os.environ.get("BACKUP_TASKS_BENCH_PG_URL"),
                        help="the server's maintenance database (default: env BACKUP_TASKS_BENCH_PG_URL, else "
                             "the local server's postgres)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stream-mb", type=int, default=512, help="synthetic stream size (0 skips that part)")
    parser.add_argument("--skip-dump", action="store_true", help="only the synthetic layer measurements")
    parser.add_argument("--drop", action="store_true", help="drop the bench database (bt_bench_<MB>) at the end")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON document")
    parser.add_argument("--child", choices=["dump", "pipeline", "synthetic"], help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--recipient", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return

    import pyrage
    from support.databases import SERVER_URL, database_url, drop_bench_database, ensure_database
    from support.machine import host_facts
    from support.paths import work_directory
    from support.processes import cli_env
    from support.s3 import moto_process

    from backup_tasks.conninfo import ConnInfo
    from backup_tasks.postgres.connect import connect

    recipient = str(pyrage.x25519.Identity.generate().to_public())
    server = ConnInfo.from_url(args.admin_url or SERVER_URL, setting="--admin-url")
    bench_database: str | None = None  # ours (made or reused): --drop removes it
    results: dict[str, Any] = {"machine": host_facts(), "rounds": args.rounds, "comparisons": []}
    with work_directory("bt-bench-offsite-", parent=os.environ.get("BENCH_DIR") or None) as workdir, \
            moto_process(workdir) as moto:
        endpoint = moto.endpoint
        endpoint.create_bucket(BUCKET)
        env = cli_env(**endpoint.env())
        local = str(workdir / "backups")
        bucket = f"s3://{BUCKET}/nightly"
        if args.stream_mb:
            runs: dict[str, list[dict[str, Any]]] = {"local": [], "s3": [], "local+age": []}
            for _ in range(args.rounds):
                for label, target, rcpt in (("local", local, ""), ("s3", bucket, ""), ("local+age", local, recipient)):
                    runs[label].append(run_child_measured("synthetic", target, env, args, rcpt))
                    clear_target(target, endpoint)
            for label, rs in runs.items():
                secs = statistics.median(r["seconds"] for r in rs)
                results.setdefault("layers", []).append(
                    {"layer": label, "mib": args.stream_mb, "seconds": round(secs, 2),
                     "mib_per_s": round(args.stream_mb / secs, 1), "peak_rss_mib": max(r["peak_rss_mib"] for r in rs)})
        if not args.skip_dump:
            if not args.database_url:
                with connect(server) as admin:
                    bench_database = ensure_database(admin, server, int(args.size_mb),
                                                     say=lambda text: print(text, file=sys.stderr)).name
                args.database_url = database_url(server, bench_database)
            dumps: dict[str, list[dict[str, Any]]] = {"local": [], "s3": []}
            pipes: dict[str, list[dict[str, Any]]] = {"plain": [], "age": []}
            for round_number in range(args.rounds + 1):  # round 0 warms caches and the S3 server: not counted
                for label, target in (("local", local), ("s3", bucket)):
                    server_before = moto.cpu_seconds()
                    result = run_child_measured("dump", target, env, args)
                    result["server_cpu_seconds"] = round(moto.cpu_seconds() - server_before, 3)
                    if round_number:
                        dumps[label].append(result)
                    clear_target(target, endpoint)
                for label, rcpt in (("plain", ""), ("age", recipient)):
                    result = run_child_measured("pipeline", local, env, args, rcpt)
                    if round_number:
                        pipes[label].append(result)
                    clear_target(local, endpoint)
            results["database_url"] = args.database_url
            results["comparisons"].append(compare("dump to bucket (loopback) vs local disk", "local", dumps["local"],
                                                  "s3", dumps["s3"], 1.3))
            results["comparisons"].append(compare("dump pipeline with age encryption vs without", "plain",
                                                  pipes["plain"], "age", pipes["age"], 1.15))
    if args.drop and bench_database:
        with connect(server) as admin:
            drop_bench_database(admin, bench_database)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for layer in results.get("layers", []):
        print(f"layer {layer['layer']:10} {layer['mib']} MiB in {layer['seconds']:6.2f}s = {layer['mib_per_s']:7.1f} "
              f"MiB/s, peak RSS {layer['peak_rss_mib']} MiB")
    for c in results["comparisons"]:
        names = list(c["cpu_seconds"])
        print(f"{c['comparison']}: " + ", ".join(f"{n} {c[n]}s (peak {c[n + '_peak_rss_mib']} MiB)" for n in names)
              + f" -> ratio {c['ratio']} (median of pairs {c['pair_ratios']}; target <= {c['target']}: "
              + f"{'OK' if c['ok'] else 'MISSED'}); CPU seconds {c['cpu_seconds']}; {c['stored_mib']} MiB stored")


if __name__ == "__main__":
    main()
