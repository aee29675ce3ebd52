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
medians. After each S3 run every segment is checked to be in the copy. Goal (issue 18): ``s3`` >= 10
segments/s, or at least 0.9x ``local`` in the same run (the machine's own speed bounds both).

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
import time
from pathlib import Path
from typing import Any

from support import MIB
from support.machine import host_facts
from support.measure import rotated
from support.paths import CLI, work_directory
from support.processes import cli_env
from support.results import paired_ratios, stamp, write_results
from support.s3 import MotoProcess, moto_process

SEGMENT_BYTES = 16 * MIB
GOAL = 10.0
GOAL_RATIO = 0.9
BUCKET = "bench-wal"


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


def one_run(variant: str, names: list[str], template: Path, workdir: Path, moto: MotoProcess,
            label: str) -> dict[str, Any]:
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
    server_before = moto.cpu_seconds()
    run_env = cli_env(**moto.endpoint.env())
    began = time.perf_counter()
    slowest = 0.0
    for name in names:
        if variant == "s3-one-by-one":
            (status / f"{name}.ready").touch()
        started = time.perf_counter()
        result = subprocess.run([str(CLI), "wal-push", "--archive-dir", str(archive), *copy_args,
                                 str(pg_wal / name)], env=run_env, capture_output=True, text=True, check=False)
        slowest = max(slowest, time.perf_counter() - started)
        if result.returncode != 0:
            raise SystemExit(f"{variant}: wal-push {name} failed ({result.returncode}): {result.stderr}")
        os.rename(status / f"{name}.ready", status / f"{name}.done")
    seconds = time.perf_counter() - began
    server_cpu = moto.cpu_seconds() - server_before if variant != "local" else 0.0
    if variant != "local":
        listed = moto.endpoint.client().list_objects_v2(Bucket=BUCKET, Prefix=f"{label}/wal/").get("KeyCount", 0)
        if listed != len(names):
            raise SystemExit(f"{variant}: {listed} of {len(names)} segments are in the copy")
    shutil.rmtree(run_dir)
    return {"variant": variant, "segments": len(names), "seconds": round(seconds, 3),
            "segments_per_s": round(len(names) / seconds, 2), "slowest_call_s": round(slowest, 3),
            "s3_server_cpu_s": round(server_cpu, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--segments", type=int, default=60)
    parser.add_argument("--baseline-segments", type=int, default=15,
                        help="segments for the s3-one-by-one baseline (0 skips it)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    runs: dict[str, list[dict[str, Any]]] = {"local": [], "s3": [], "s3-one-by-one": []}
    with work_directory("bt-bench-walpush-", parent=os.environ.get("BENCH_DIR") or None) as workdir, \
            moto_process(workdir) as moto:
        moto.endpoint.create_bucket(BUCKET)
        names = make_segments(workdir / "template", args.segments)
        variants = ["local", "s3"] + (["s3-one-by-one"] if args.baseline_segments else [])
        for round_number in range(args.rounds + 1):  # round 0 warms the page cache and the S3 server
            for variant in rotated(variants, round_number):
                subset = names[:args.baseline_segments] if variant == "s3-one-by-one" else names
                result = one_run(variant, subset, workdir / "template", workdir, moto, f"r{round_number}-{variant}")
                if round_number:
                    runs[variant].append(result)
                print(f"round {round_number} {variant:14} {result['segments_per_s']:6.2f} segments/s "
                      f"({result['segments']} in {result['seconds']:.2f}s, slowest call {result['slowest_call_s']}s)"
                      + ("" if round_number else "  [warm-up]"), file=sys.stderr)
    summary: dict[str, Any] = {"machine": host_facts(),
                               "segments": args.segments, "rounds": args.rounds, "goal_s3_segments_per_s": GOAL,
                               "goal_s3_vs_local_ratio": GOAL_RATIO,
                               "runs": runs, "medians": {}}
    for variant, results in runs.items():
        if results:
            summary["medians"][variant] = statistics.median(r["segments_per_s"] for r in results)
    medians = summary["medians"]
    local, s3 = ([r["segments_per_s"] for r in runs[variant]] for variant in ("local", "s3"))
    ratio, _pairs = paired_ratios(local, s3)
    summary["s3_vs_local_ratio"] = round(ratio, 3)
    summary["goal_met"] = medians["s3"] >= GOAL or ratio >= GOAL_RATIO
    write_results(f"wal_push_{stamp()}", {".json": json.dumps(summary, indent=2)})
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    for variant, value in medians.items():
        print(f"{variant:14} {value:6.2f} segments/s (median of {len(runs[variant])})")
    print(f"s3 / local throughput ratio {summary['s3_vs_local_ratio']} (median of pairs); "
          f"goal s3 >= {GOAL}/s or >= {GOAL_RATIO}x local: {'OK' if summary['goal_met'] else 'MISSED'}")


if __name__ == "__main__":
    main()
