#!/usr/bin/env python3
"""wal-push throughput: segments per second as PostgreSQL drives it, local archive only vs with an S3 copy.

N distinct 16 MiB WAL-like segment files (``--segments``, default 60) sit in a fake ``pg_wal`` with an
``archive_status/<name>.ready`` file each, as a server that has fallen behind has them. Each is pushed
through the real console script, one process per segment, in order, the ``.ready`` renamed to ``.done``
after each exit 0 (what the archiver does). Variants, each in a fresh archive directory and copy prefix:

* ``local``: ``wal-push --archive-dir DIR %p`` (no copy);
* ``s3``: ``wal-push --archive-dir DIR --copy-to s3://bench-wal/<run> %p`` against moto's standalone S3
  server on 127.0.0.1, started here (push-ahead: the first call stores the following ``.ready`` files);
* ``s3-one-by-one`` (``--baseline-segments``, default 15; 0 skips it): the same without the other
  ``.ready`` files, so every call stores only its own segment (what wal-push did before push-ahead).

Rounds are interleaved (``--rounds``, default 3, after one warm-up round not counted); figures are
medians. After each S3 run every segment is checked to be in the copy. Goal: ``s3`` >= 10 segments/s.

    flock -x /tmp/bt-machine.lock .venv/bin/python bench/bench_wal_push.py --segments 60 --rounds 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).parent / "backup-tasks"
MIB = 1 << 20
SEGMENT_BYTES = 16 * MIB
GOAL = 10.0

sys.path.insert(0, str(ROOT))
from bench.bench_offsite import BUCKET, start_s3  # noqa: E402  (one moto server start for every bench)


def s3_client(env: dict[str, str]) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


def make_segments(directory: Path, count: int) -> list[str]:
    """``count`` distinct WAL-like segments: per 8 KiB page ~3 KiB of pseudo-random bytes, then zeros (~3x zstd)."""
    directory.mkdir(parents=True)
    names = []
    for number in range(count):
        name = f"00000001{(number + 0x20) // 256:08X}{(number + 0x20) % 256:08X}"
        seed = hashlib.sha256(name.encode()).digest()
        noise = b"".join(hashlib.sha256(seed + i.to_bytes(4, "little")).digest() for i in range(4096))  # 128 KiB
        page = bytearray(SEGMENT_BYTES)
        for offset in range(0, SEGMENT_BYTES, 8192):
            start = (offset // 8192 * 3072) % (len(noise) - 3072)
            page[offset:offset + 3072] = noise[start:start + 3072]
        (directory / name).write_bytes(bytes(page))
        names.append(name)
    return names


def one_run(variant: str, names: list[str], template: Path, workdir: Path, env: dict[str, str],
            s3_proc: subprocess.Popen[bytes] | None, label: str) -> dict[str, Any]:
    """Push ``names`` as PostgreSQL's archiver would; wall time, and the S3 server's CPU during it."""
    run_dir = workdir / label
    pg_wal = run_dir / "pg_wal"
    status = pg_wal / "archive_status"
    status.mkdir(parents=True)
    for name in names:
        os.link(template / name, pg_wal / name)  # the same bytes in every run, without copying a GiB
        if variant != "s3-one-by-one":
            (status / f"{name}.ready").touch()
    archive = run_dir / "archive"
    copy_args = ["--copy-to", f"s3://{BUCKET}/{label}"] if variant != "local" else []
    server_before = process_cpu_seconds(s3_proc.pid) if s3_proc else 0.0
    run_env = {**os.environ, **env}
    began = time.perf_counter()
    slowest = 0.0
    for name in names:
        if variant == "s3-one-by-one":
            (status / f"{name}.ready").touch()
        started = time.perf_counter()
        result = subprocess.run([str(SCRIPT), "wal-push", "--archive-dir", str(archive), *copy_args,
                                 str(pg_wal / name)], env=run_env, capture_output=True, text=True, check=False)
        slowest = max(slowest, time.perf_counter() - started)
        if result.returncode != 0:
            raise SystemExit(f"{variant}: wal-push {name} failed ({result.returncode}): {result.stderr}")
        os.rename(status / f"{name}.ready", status / f"{name}.done")
    seconds = time.perf_counter() - began
    server_cpu = process_cpu_seconds(s3_proc.pid) - server_before if s3_proc else 0.0
    if variant != "local":
        listed = s3_client(env).list_objects_v2(Bucket=BUCKET, Prefix=f"{label}/wal/").get("KeyCount", 0)
        if listed != len(names):
            raise SystemExit(f"{variant}: {listed} of {len(names)} segments are in the copy")
    shutil.rmtree(run_dir)
    return {"variant": variant, "segments": len(names), "seconds": round(seconds, 3),
            "segments_per_s": round(len(names) / seconds, 2), "slowest_call_s": round(slowest, 3),
            "s3_server_cpu_s": round(server_cpu, 2)}


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--segments", type=int, default=60)
    parser.add_argument("--baseline-segments", type=int, default=15,
                        help="segments for the s3-one-by-one baseline (0 skips it)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bt-bench-walpush-", dir=os.environ.get("BENCH_DIR") or None))
    s3_proc, env = start_s3(workdir)
    runs: dict[str, list[dict[str, Any]]] = {"local": [], "s3": [], "s3-one-by-one": []}
    try:
        names = make_segments(workdir / "template", args.segments)
        variants = ["local", "s3"] + (["s3-one-by-one"] if args.baseline_segments else [])
        for round_number in range(args.rounds + 1):  # round 0 warms the page cache and the S3 server
            order = variants[round_number % len(variants):] + variants[:round_number % len(variants)]
            for variant in order:
                subset = names[:args.baseline_segments] if variant == "s3-one-by-one" else names
                result = one_run(variant, subset, workdir / "template", workdir, env,
                                 s3_proc if variant != "local" else None, f"r{round_number}-{variant}")
                if round_number:
                    runs[variant].append(result)
                print(f"round {round_number} {variant:14} {result['segments_per_s']:6.2f} segments/s "
                      f"({result['segments']} in {result['seconds']:.2f}s, slowest call {result['slowest_call_s']}s)"
                      + ("" if round_number else "  [warm-up]"), file=sys.stderr)
    finally:
        s3_proc.terminate()
        s3_proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    summary: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
                               "segments": args.segments, "rounds": args.rounds, "goal_s3_segments_per_s": GOAL,
                               "runs": runs, "medians": {}}
    for variant, results in runs.items():
        if results:
            summary["medians"][variant] = statistics.median(r["segments_per_s"] for r in results)
    medians = summary["medians"]
    pairs = [s["segments_per_s"] / loc["segments_per_s"] for loc, s in zip(runs["local"], runs["s3"], strict=True)]
    summary["s3_vs_local_ratio"] = round(statistics.median(pairs), 3)
    summary["goal_met"] = medians["s3"] >= GOAL
    results_dir = ROOT / "bench" / "results"
    results_dir.mkdir(exist_ok=True)
    (results_dir / f"wal_push_{time.strftime('%Y%m%dT%H%M%S')}.json").write_text(json.dumps(summary, indent=2))
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    for variant, value in medians.items():
        print(f"{variant:14} {value:6.2f} segments/s (median of {len(runs[variant])})")
    print(f"s3 / local throughput ratio {summary['s3_vs_local_ratio']} (median of pairs); "
          f"goal s3 >= {GOAL}/s: {'OK' if summary['goal_met'] else 'MISSED'}")


if __name__ == "__main__":
    main()
