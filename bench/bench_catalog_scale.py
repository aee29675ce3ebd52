"""Catalog reads and prune with twelve weeks of WAL: do they cost the number of backups, not of segments?

A synthetic catalog (84 daily dumps and 14 weekly snapshots as manifests with tiny data objects) sits
beside a WAL archive of ``--segments`` (default 100,000) archived segments: tiny objects with valid
names and checksum trailers (``wal.archive`` format), which is all ``list``/``health``/``prune`` read
of them (``support/synthetic_catalog.py``, shared with ``bench_metrics.py``). Two catalogs are built
the same way, one with the segments and one with an empty archive, locally and with a
``BACKUP_COPY_TO`` in a moto S3 server run in this process (``ThreadedMotoServer``), whose buckets are
filled straight through moto's backend (100,000 PUTs over HTTP take minutes; the reads under test go
over HTTP as usual). moto lists a prefix by scanning every key of the bucket, so its listing time grows
with the bucket where S3's does not: the request counts are the figure to judge the S3 copy by.

The local archive is read through its index (``wal.index``, cached in ``<archive>/.wal-index.json``):
the warm-up run writes it, the timed runs find it. ``list (no index)`` times ``list`` with the cache
file removed before each run (a first read, or a reader who cannot write the archive root).

Timed, in this process, through the CLI's own command functions (``cmd_list``, ``cmd_health``,
``cmd_prune --dry-run --json``, stdout discarded): interleaved rounds, medians, ratio full/empty. S3
requests are counted per operation (every botocore API call, paginated pages included). Then one real
``prune`` per setup deletes 2 snapshots, 77 dumps and the WAL before the oldest kept snapshot (20% of
the segments: 20,000 of 100,000), locally and from the S3 copy (DeleteObjects, 1,000 keys a request).

    flock -x /tmp/bt-machine.lock .venv/bin/python bench/bench_catalog_scale.py [--segments 100000] [--rounds 5]

Results: ``bench/results/catalog-scale-<stamp>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from support.paths import CLI, work_directory
from support.processes import cli_env
from support.results import markdown_table, stamp, write_results
from support.s3 import S3Endpoint, moto_thread
from support.synthetic_catalog import DUMPS, SNAPSHOTS, build_local, catalog_objects, segment_objects

from backup_tasks.clock import isoformat
from backup_tasks.settings import Settings
from backup_tasks.wal.index import INDEX_FILE

#: botocore API calls by operation name, while counting is on.
CALLS: Counter[str] = Counter()


def count_s3_calls() -> None:
    import botocore.client

    original = botocore.client.BaseClient._make_api_call

    def counting(self: Any, operation_name: str, api_params: dict[str, Any]) -> Any:
        CALLS[operation_name] += 1
        return original(self, operation_name, api_params)

    botocore.client.BaseClient._make_api_call = counting  # type: ignore[method-assign]


def build_s3(backend: Any, bucket: str, prefix: str, objects: dict[str, bytes]) -> float:
    """Store ``objects`` under ``prefix`` straight into moto's backend (what a PUT does, without HTTP)."""
    started = time.monotonic()
    for key, data in objects.items():
        backend.put_object(bucket, f"{prefix}{key}", data)
    return time.monotonic() - started


def bare_listing_seconds(endpoint: S3Endpoint, bucket: str, rounds: int = 5) -> float:
    """One ListObjectsV2 of the catalog's level (``copy/``, delimiter ``/``) by itself: moto's cost per request.

    moto answers it by scanning every key of the bucket, so this floor grows with the WAL copy (S3's
    does not): what ``list``/``health``/``prune`` pay per request on top of their own work.
    """
    client = endpoint.client()
    samples = []
    for _ in range(rounds + 1):
        started = time.perf_counter()
        client.list_objects_v2(Bucket=bucket, Prefix="copy/", Delimiter="/")
        samples.append(time.perf_counter() - started)
    return round(statistics.median(samples[1:]), 4)


def run_quiet(fn: Callable[[], Any]) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        fn()


def operations(settings: Settings) -> dict[str, Callable[[], Any]]:
    from backup_tasks.cli.daily import cmd_health, cmd_list, cmd_prune

    return {
        "list": lambda: cmd_list(argparse.Namespace(json=True), settings),
        "health": lambda: cmd_health(argparse.Namespace(json=True), settings),
        "prune --dry-run": lambda: cmd_prune(argparse.Namespace(json=True, dry_run=True), settings),
    }


def without_index(settings: Settings, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run with the archive's index file removed first (every directory listed again), then put back.

    Put back as it was, so that the other operations keep finding what they cached (prune's sizes).
    """
    path = settings.wal_archive / INDEX_FILE

    def run() -> Any:
        saved = path.read_bytes() if path.exists() else None
        path.unlink(missing_ok=True)
        try:
            return fn()
        finally:
            if saved is not None:
                path.write_bytes(saved)

    return run


def time_reads(setups: dict[str, Settings], rounds: int) -> dict[str, dict[str, Any]]:
    """Interleaved rounds over every (setup, operation): median seconds and S3 calls of one run."""
    samples: dict[tuple[str, str], list[float]] = {}
    calls: dict[tuple[str, str], dict[str, int]] = {}
    ops = {name: operations(s) for name, s in setups.items()}
    for name in ("local empty", "local full"):
        ops[name]["list (no index)"] = without_index(setups[name], ops[name]["list"])
    for name in setups:  # warm-up: imports, first client
        for fn in ops[name].values():
            run_quiet(fn)
    for r in range(rounds):
        order = list(setups) if r % 2 == 0 else list(reversed(setups))
        for name in order:
            for op, fn in ops[name].items():
                CALLS.clear()
                started = time.perf_counter()
                run_quiet(fn)
                samples.setdefault((name, op), []).append(time.perf_counter() - started)
                calls[(name, op)] = dict(CALLS)
    return {f"{name} / {op}": {"median_s": statistics.median(v), "all_s": [round(x, 4) for x in v],
                               "s3_calls": calls[(name, op)]}
            for (name, op), v in samples.items()}


def time_cli(setups: dict[str, Settings], rounds: int) -> dict[str, dict[str, Any]]:
    """The same operations as commands (``backup-tasks list --json``...): what a user waits for, imports included."""
    commands = {"list": ["list", "--json"], "health": ["health", "--json"], "prune --dry-run": ["prune", "--dry-run",
                                                                                                  "--json"]}
    samples: dict[tuple[str, str], list[float]] = {}
    for r in range(rounds + 1):  # the first round warms the page cache and is dropped
        order = list(setups) if r % 2 == 0 else list(reversed(setups))
        for name in order:
            s = setups[name]
            env = cli_env(BACKUP_DIR=s.backup_dir, BACKUP_LOCK_URL="", BACKUP_KEEP_DAILY_DAYS="7",
                          BACKUP_KEEP_WEEKLY="12", BACKUP_COPY_TO=s.copy_to or "")
            for op, argv in commands.items():
                started = time.perf_counter()
                subprocess.run([str(CLI), *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               check=False)
                if r:
                    samples.setdefault((name, op), []).append(time.perf_counter() - started)
    return {f"{name} / {op}": {"median_s": statistics.median(v), "all_s": [round(x, 4) for x in v]}
            for (name, op), v in samples.items()}


def ratios_of(reads: dict[str, dict[str, Any]]) -> dict[str, float]:
    ratios = {}
    for where in ("local", "s3 copy"):
        for op in ("list", "health", "prune --dry-run", "list (no index)"):
            full, empty = reads.get(f"{where} full / {op}"), reads.get(f"{where} empty / {op}")
            if full and empty:
                ratios[f"{where} / {op}"] = round(full["median_s"] / empty["median_s"], 3)
    return ratios


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--segments", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-s3", action="store_true", help="local only")
    parser.add_argument("--cli", action="store_true", help="also time the commands as processes")
    args = parser.parse_args()

    count_s3_calls()
    result: dict[str, Any] = {"segments": args.segments, "dumps": DUMPS, "snapshots": SNAPSHOTS,
                              "rounds": args.rounds, "started": isoformat(datetime.now(UTC))}
    with work_directory("bt-bench-catalog-") as work, contextlib.ExitStack() as servers:
        catalog = catalog_objects(args.segments)
        wal = segment_objects(args.segments)
        started = time.monotonic()
        for name, segs in (("empty", {}), ("full", wal)):
            build_local(work / name, catalog, segs, args.segments)
        result["build_local_s"] = round(time.monotonic() - started, 1)
        base = Settings(backup_dir="", broker_url="memory://", keep_daily_days=7, keep_weekly=12)
        setups = {f"local {name}": replace(base, backup_dir=str(work / name)) for name in ("empty", "full")}
        backend = None
        if not args.no_s3:
            endpoint, backend = servers.enter_context(moto_thread())
            os.environ.update(endpoint.env())
            for name, segs in (("empty", {}), ("full", wal)):
                bucket = endpoint.create_bucket()
                objects = catalog | {f"wal/{key}": data for key, data in segs.items()}
                result[f"build_s3_{name}_s"] = round(build_s3(backend, bucket, "copy/", objects), 1)
                setups[f"s3 copy {name}"] = replace(base, backup_dir=str(work / name), copy_to=f"s3://{bucket}/copy")
                result[f"s3_{name}_bucket"] = bucket
                result[f"s3_{name}_bare_listing_s"] = bare_listing_seconds(endpoint, bucket)
            print(f"built: {result}", file=sys.stderr)
        result["reads"] = time_reads(setups, args.rounds)
        ratios = ratios_of(result["reads"])
        if args.cli:
            result["cli"] = time_cli(setups, args.rounds)
            result["cli_ratios_full_over_empty"] = ratios_of(result["cli"])
        result["ratios_full_over_empty"] = ratios

        # Real prunes: a copy of the full tree without BACKUP_COPY_TO, then the full tree with its S3 copy.
        from backup_tasks.catalog.prune import prune

        shutil.copytree(work / "full", work / "prune-local")
        real: dict[str, Any] = {}
        targets = [("local", replace(base, backup_dir=str(work / "prune-local")))]
        if "s3 copy full" in setups:
            targets.append(("local + s3 copy", setups["s3 copy full"]))
        for label, settings in targets:
            CALLS.clear()
            started = time.perf_counter()
            report = prune(settings)
            seconds = time.perf_counter() - started
            real[label] = {"seconds": round(seconds, 3), "backups_deleted": len(report.deleted),
                           "wal_deleted": len(report.wal_deleted), "s3_calls": dict(CALLS)}
            if backend is not None and label != "local":
                # Counted in the backend: moto lists 80,000 keys over HTTP in about a minute.
                real[label]["wal_objects_left_in_copy"] = sum(
                    1 for key in backend.get_bucket(result["s3_full_bucket"]).keys if key.startswith("copy/wal/"))
        result["real_prune"] = real

    lines = [f"# catalog scale: {args.segments} segments, {DUMPS} dumps, {SNAPSHOTS} snapshots, "
             f"{args.rounds} rounds", ""]
    lines += markdown_table(("setup / operation", "median s", "S3 calls"),
                            ((k, f"{v['median_s']:.4f}", v["s3_calls"]) for k, v in result["reads"].items()), "lr")
    lines += ["", *markdown_table(("ratio full/empty", ""), ratios.items(), "lr")]
    if "s3_full_bare_listing_s" in result:
        lines += ["", f"one bare ListObjectsV2 of the catalog level in moto: {result['s3_empty_bare_listing_s']} s "
                      f"(empty archive), {result['s3_full_bare_listing_s']} s ({args.segments} WAL objects beside it)"]
    if "cli" in result:
        lines += ["", *markdown_table(("CLI (process) setup / operation", "median s"),
                                      ((k, f"{v['median_s']:.4f}") for k, v in result["cli"].items()), "lr")]
        lines += ["", *markdown_table(("CLI ratio full/empty", ""), result["cli_ratios_full_over_empty"].items(), "lr")]
    lines += ["", *markdown_table(("real prune", "s", "backups", "WAL", "S3 calls"),
                                  ((k, v["seconds"], v["backups_deleted"], v["wal_deleted"], v["s3_calls"])
                                   for k, v in result["real_prune"].items()), "lrrr")]
    write_results(f"catalog-scale-{stamp()}", {".json": json.dumps(result, indent=2) + "\n",
                                               ".md": "\n".join(lines) + "\n"})
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
