"""Catalog reads and prune with twelve weeks of WAL: do they cost the number of backups, not of segments?

A synthetic catalog (84 daily dumps and 14 weekly snapshots as manifests with tiny data objects) sits
beside a WAL archive of ``--segments`` (default 100,000) archived segments: tiny objects with valid
names and checksum trailers (``wal.archive`` format), which is all ``list``/``health``/``prune`` read
of them. Two catalogs are built the same way, one with the segments and one with an empty archive,
locally and with a ``BACKUP_COPY_TO`` in a moto S3 server run in this process (``ThreadedMotoServer``),
whose buckets are filled straight through moto's backend (100,000 PUTs over HTTP take minutes; the
reads under test go over HTTP as usual). moto lists a prefix by scanning every key of the bucket, so
its listing time grows with the bucket where S3's does not: the request counts are the figure to
judge the S3 copy by.

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
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backup_tasks.catalog.manifest import Manifest, isoformat  # noqa: E402
from backup_tasks.settings import Settings  # noqa: E402
from backup_tasks.storage.local import LocalStorage  # noqa: E402
from backup_tasks.wal.archive import _trailer_bytes, object_key  # noqa: E402
from backup_tasks.wal.index import INDEX_FILE  # noqa: E402
from backup_tasks.wal.names import segment_name, segment_number  # noqa: E402
from tests.support.s3 import S3Server, free_port  # noqa: E402

SEGMENT_SIZE = 16 << 20
NOW = datetime.now(UTC).replace(microsecond=0)
T0 = NOW - timedelta(days=100)
DUMPS = 84
SNAPSHOTS = 14  # 12 kept (BACKUP_KEEP_WEEKLY), the 2 oldest expire with the WAL before the third

#: botocore API calls by operation name, while counting is on.
CALLS: Counter[str] = Counter()


def count_s3_calls() -> None:
    import botocore.client

    original = botocore.client.BaseClient._make_api_call

    def counting(self: Any, operation_name: str, api_params: dict[str, Any]) -> Any:
        CALLS[operation_name] += 1
        return original(self, operation_name, api_params)

    botocore.client.BaseClient._make_api_call = counting  # type: ignore[method-assign]


def snapshot_starts(segments: int) -> list[int]:
    """Segment numbers where the snapshots start, oldest first: two before 20%, twelve spread after."""
    first_kept = segments // 5
    return [0, first_kept // 2] + [first_kept + j * (segments - first_kept) // 12 for j in range(12)]


def segment_time(segno: int, segments: int) -> float:
    return (T0 + timedelta(days=98) * segno / max(segments, 1)).timestamp()


def catalog_objects(segments: int) -> dict[str, bytes]:
    """Every catalog object: key -> bytes (manifests and tiny data objects)."""
    objects: dict[str, bytes] = {}
    for day in range(DUMPS):
        started = NOW - timedelta(days=DUMPS - 1 - day, hours=1)
        backup_id = f"trading-dump-{started:%Y%m%dT%H%M%SZ}"
        m = Manifest(id=backup_id, kind="dump", database="trading", server="db:5432", server_version="16.4",
                     started_at=isoformat(started), finished_at=isoformat(started + timedelta(minutes=4)),
                     path=f"{backup_id}.dump.zst", size_bytes=5, sha256="0" * 64, compression="zstd",
                     trading_day=started.date().isoformat(), tables={"trades": 10, "orders": 20})
        objects[m.path] = b"dump\n"
        objects[m.key] = m.to_json().encode()
    for k, start in enumerate(snapshot_starts(segments)):
        started = NOW - timedelta(days=7 * (SNAPSHOTS - 1 - k), hours=2)
        backup_id = f"trading-snapshot-{started:%Y%m%dT%H%M%SZ}"
        files = {f"{backup_id}.{part}": {"size": 4, "sha256": "0" * 64, "role": part}
                 for part in ("base.tar.zst", "pg_wal.tar.zst", "backup_manifest", "config.json")}
        m = Manifest(id=backup_id, kind="snapshot", database="trading", server="db:5432", server_version="16.4",
                     started_at=isoformat(started), finished_at=isoformat(started + timedelta(minutes=9)),
                     path=f"{backup_id}.base.tar.zst", size_bytes=16, sha256="0" * 64, compression="zstd",
                     files=files, timeline=1, wal_segment_size=SEGMENT_SIZE,
                     start_segment=segment_name(1, start, SEGMENT_SIZE),
                     stop_segment=segment_name(1, start + 1, SEGMENT_SIZE),
                     restorable_from=datetime.fromtimestamp(segment_time(start + 1, segments), UTC).isoformat())
        for key in files:
            objects[key] = b"snap"
        objects[m.key] = m.to_json().encode()
    return objects


def segment_objects(segments: int) -> dict[str, bytes]:
    """``object_key`` -> a tiny archived object: a few bytes, then a valid trailer (size, sha256, completion)."""
    return {object_key(segment_name(1, n, SEGMENT_SIZE)):
            b"w" + _trailer_bytes(b"\0" * 32, SEGMENT_SIZE, segment_time(n, segments)) for n in range(segments)}


def build_local(root: Path, catalog: dict[str, bytes], wal: dict[str, bytes], segments: int) -> None:
    storage = LocalStorage(root)
    for key, data in catalog.items():
        storage.put_bytes(key, data)
    archive = root / "wal"
    archive.mkdir(parents=True, exist_ok=True)
    newest: dict[str, str] = {}
    for key in wal:
        directory, _, name = key.partition("/")
        newest[directory] = max(newest.get(directory, ""), name)
    for directory in newest:
        (archive / directory).mkdir(exist_ok=True)
    for key, data in wal.items():
        (archive / key).write_bytes(data)  # no fsync: a benchmark fixture
    for directory, name in newest.items():  # dated as on the server: last written when its last segment came
        when = segment_time(segment_number(name[:24], SEGMENT_SIZE), segments)
        os.utime(archive / directory, (when, when))


def start_moto_here() -> tuple[Any, S3Server, Any]:
    """moto's S3 server on a thread of this process (no authentication), its address, and its S3 backend."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, S3Server(f"http://127.0.0.1:{port}", "AKIABENCHBENCHBENCH0", "bench-secret"), \
        s3_backends[DEFAULT_ACCOUNT_ID]["aws"]


def build_s3(backend: Any, bucket: str, prefix: str, objects: dict[str, bytes]) -> float:
    """Store ``objects`` under ``prefix`` straight into moto's backend (what a PUT does, without HTTP)."""
    started = time.monotonic()
    for key, data in objects.items():
        backend.put_object(bucket, f"{prefix}{key}", data)
    return time.monotonic() - started


def bare_listing_seconds(server: S3Server, bucket: str, rounds: int = 5) -> float:
    """One ListObjectsV2 of the catalog's level (``copy/``, delimiter ``/``) by itself: moto's cost per request.

    moto answers it by scanning every key of the bucket, so this floor grows with the WAL copy (S3's
    does not): what ``list``/``health``/``prune`` pay per request on top of their own work.
    """
    client = server.admin_client()
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
    import subprocess

    exe = str(Path(sys.executable).parent / "backup-tasks")
    commands = {"list": ["list", "--json"], "health": ["health", "--json"], "prune --dry-run": ["prune", "--dry-run",
                                                                                                  "--json"]}
    samples: dict[tuple[str, str], list[float]] = {}
    for r in range(rounds + 1):  # the first round warms the page cache and is dropped
        order = list(setups) if r % 2 == 0 else list(reversed(setups))
        for name in order:
            s = setups[name]
            env = {**os.environ, "BACKUP_DIR": s.backup_dir, "BACKUP_LOCK_URL": "", "BACKUP_KEEP_DAILY_DAYS": "7",
                   "BACKUP_KEEP_WEEKLY": "12", "BACKUP_COPY_TO": s.copy_to or ""}
            for op, argv in commands.items():
                started = time.perf_counter()
                subprocess.run([exe, *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
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
    work = Path(tempfile.mkdtemp(prefix="bt-bench-catalog-"))
    result: dict[str, Any] = {"segments": args.segments, "dumps": DUMPS, "snapshots": SNAPSHOTS,
                              "rounds": args.rounds, "started": isoformat(datetime.now(UTC))}
    moto = None
    try:
        catalog = catalog_objects(args.segments)
        wal = segment_objects(args.segments)
        started = time.monotonic()
        for name, segs in (("empty", {}), ("full", wal)):
            build_local(work / name, catalog, segs, args.segments)
        result["build_local_s"] = round(time.monotonic() - started, 1)
        base = Settings(backup_dir="", broker_url="memory://", keep_daily_days=7, keep_weekly=12)
        setups = {f"local {name}": replace(base, backup_dir=str(work / name)) for name in ("empty", "full")}
        if not args.no_s3:
            moto, server, backend = start_moto_here()
            for key, value in server.env().items():
                os.environ[key] = value
            for name, segs in (("empty", {}), ("full", wal)):
                bucket = server.new_bucket()
                objects = catalog | {f"wal/{key}": data for key, data in segs.items()}
                result[f"build_s3_{name}_s"] = round(build_s3(backend, bucket, "copy/", objects), 1)
                setups[f"s3 copy {name}"] = replace(base, backup_dir=str(work / name), copy_to=f"s3://{bucket}/copy")
                result[f"s3_{name}_bucket"] = bucket
                result[f"s3_{name}_bare_listing_s"] = bare_listing_seconds(server, bucket)
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
            if label != "local":  # counted in the backend: moto lists 80,000 keys over HTTP in about a minute
                real[label]["wal_objects_left_in_copy"] = sum(
                    1 for key in backend.get_bucket(result["s3_full_bucket"]).keys if key.startswith("copy/wal/"))
        result["real_prune"] = real
    finally:
        if moto is not None:
            moto.stop()
        shutil.rmtree(work, ignore_errors=True)

    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    (out / f"catalog-scale-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# catalog scale: {args.segments} segments, {DUMPS} dumps, {SNAPSHOTS} snapshots, "
             f"{args.rounds} rounds", "", "| setup / operation | median s | S3 calls |", "|---|---:|---|"]
    lines += [f"| {k} | {v['median_s']:.4f} | {v['s3_calls']} |" for k, v in result["reads"].items()]
    lines += ["", "| ratio full/empty | |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in ratios.items()]
    if "s3_full_bare_listing_s" in result:
        lines += ["", f"one bare ListObjectsV2 of the catalog level in moto: {result['s3_empty_bare_listing_s']} s "
                      f"(empty archive), {result['s3_full_bare_listing_s']} s ({args.segments} WAL objects beside it)"]
    if "cli" in result:
        lines += ["", "| CLI (process) setup / operation | median s |", "|---|---:|"]
        lines += [f"| {k} | {v['median_s']:.4f} |" for k, v in result["cli"].items()]
        lines += ["", "| CLI ratio full/empty | |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in result["cli_ratios_full_over_empty"].items()]
    lines += ["", "| real prune | s | backups | WAL | S3 calls |", "|---|---:|---:|---:|---|"]
    lines += [f"| {k} | {v['seconds']} | {v['backups_deleted']} | {v['wal_deleted']} | {v['s3_calls']} |"
              for k, v in result["real_prune"].items()]
    (out / f"catalog-scale-{stamp}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
