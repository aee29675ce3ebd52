"""Tuning experiments behind the defaults (``bench/run.py --experiments``), on the largest bench database.

1. codec: the raw custom-format archive compressed by python-zstandard at several levels and
   thread counts (the dump's loop: 1 MiB chunks, sha256 of the output), against ``gzip -6``;
   the same on a generic text corpus, because generated rows compress unusually well.
2. dump pipeline: ``pg_dump -Fc -Z0 | compress | sha256 | file`` end to end per level/threads,
   interleaved with the floor: on 2 cores the compressor competes with the server for CPU.
3. counts: does counting rows in the dump's snapshot (as ``run_dump`` does) slow ``pg_dump``?
   Also with index-only scans disabled: the worst case, a table whose visibility map is stale.
4. restore: the verify restore (throwaway cluster, started and removed inside the measurement)
   streamed on stdin in one transaction vs decompressed to a file and ``pg_restore -j2``, and
   server settings (work_mem, jit, maintenance_work_mem, parallel maintenance workers).
5. verify phases: where verify's time goes (checksum, cluster, restore, counts, amcheck).
6. amcheck: ``bt_index_check`` with and without ``heapallindexed``.

Each variant runs in its own process, ``python bench/experiments.py child NAME ARGS...``, so it is
measured like the main runs (wall, CPU of the tree and of the servers, peak RSS); this file holds
those children, each printing what it found as one JSON line. Which variants run, in what order,
and the tables of the report: ``support/tuning.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from support import MIB


def _compress(chunks: Iterable[bytes], level: str, threads: str, out: BinaryIO) -> int:
    """The dump's loop: each chunk through zstd, the output hashed (sha256) and written; the bytes written."""
    import hashlib

    import zstandard

    params = zstandard.ZstdCompressionParameters.from_level(int(level), threads=int(threads), write_checksum=True)
    comp = zstandard.ZstdCompressor(compression_params=params).compressobj()
    digest = hashlib.sha256()
    size = 0

    def store(data: bytes) -> None:
        nonlocal size
        if data:
            digest.update(data)
            out.write(data)
            size += len(data)

    for chunk in chunks:
        store(comp.compress(chunk))
    store(comp.flush())
    return size


def child_compress(source: str, level: str, threads: str, target: str) -> None:
    with open(source, "rb") as fh, open(target, "wb") as out:
        size = _compress(iter(lambda: fh.read(MIB), b""), level, threads, out)
    print(json.dumps({"size": size}))


def child_pipeline(url: str, level: str, threads: str, target: str) -> None:
    """``run_dump``'s streaming loop without the catalog: pg_dump | zstd | sha256 | file, fsynced."""
    import os

    proc = subprocess.Popen(["pg_dump", "--format=custom", "--compress=0", url], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    stdout = proc.stdout
    with open(target, "wb", buffering=0) as out:
        size = _compress(iter(lambda: stdout.read(MIB), b""), level, threads, out)
        os.fsync(out.fileno())
    if proc.wait() != 0:
        raise SystemExit("pg_dump failed")
    print(json.dumps({"size": size}))


def child_counts(url: str, mode: str) -> None:
    """pg_dump with an exported snapshot, with or without row counts running in that snapshot."""
    import threading

    from backup_tasks.conninfo import ConnInfo
    from backup_tasks.postgres.queries import count_rows, exported_snapshot

    with exported_snapshot(ConnInfo.from_url(url)) as (conn, snapshot):
        if mode == "seqscan":
            for knob in ("enable_indexonlyscan", "enable_indexscan", "enable_bitmapscan"):
                conn.execute(f"SET LOCAL {knob} = off")
        counted: dict[str, float] = {}

        def count() -> None:
            started = time.monotonic()
            count_rows(conn)
            counted["seconds"] = time.monotonic() - started

        counter = threading.Thread(target=count)
        if mode != "none":
            counter.start()
        subprocess.run(["pg_dump", "--format=custom", "--compress=0", f"--snapshot={snapshot}", url],
                       stdout=subprocess.DEVNULL, check=True)
        if mode != "none":
            counter.join()
    print(json.dumps(counted))


def child_restore(backup: str, mode: str, settings_json: str, parent_dir: str) -> None:
    """A verify-style restore: throwaway cluster up, restore, down; ``mode`` stdin or jN."""
    import os

    import zstandard

    from backup_tasks.postgres.cluster import ThrowawayCluster
    from backup_tasks.postgres.connect import connect
    from backup_tasks.postgres.queries import create_database
    from backup_tasks.postgres.tools import find_tool

    pg_restore = str(find_tool("pg_restore").path)
    phases: dict[str, float] = {}
    started = time.monotonic()
    with ThrowawayCluster(settings=json.loads(settings_json), parent_dir=Path(parent_dir)) as cluster:
        with connect(cluster.conninfo()) as admin:
            create_database(admin, "verify")
        phases["cluster"] = time.monotonic() - started
        env = {**os.environ, **cluster.conninfo("verify").libpq_env()}
        argv = [pg_restore, "--exit-on-error", "--no-owner", "--no-privileges", "-d", "verify"]
        mark = time.monotonic()
        if mode == "stdin":
            proc = subprocess.Popen([*argv, "--single-transaction"], stdin=subprocess.PIPE, env=env)
            assert proc.stdin is not None
            with open(backup, "rb") as fh:
                reader = zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True)
                while chunk := reader.read(MIB):
                    proc.stdin.write(chunk)
            proc.stdin.close()
            if proc.wait() != 0:
                raise SystemExit("pg_restore failed")
        else:
            assert cluster.root is not None
            archive = cluster.root / "archive.dump"
            with open(backup, "rb") as fh, open(archive, "wb") as out:
                zstandard.ZstdDecompressor().copy_stream(fh, out, read_size=MIB, write_size=MIB)
            phases["decompress"] = time.monotonic() - mark
            subprocess.run([*argv, f"-j{mode[1:]}", str(archive)], env=env, check=True)
        phases["restore"] = time.monotonic() - mark
        mark = time.monotonic()
    phases["teardown"] = time.monotonic() - mark
    print(json.dumps({k: round(v, 3) for k, v in phases.items()}))


def child_verify_phases(backup_dir: str, backup_id: str) -> None:
    """verify_backup's steps one by one, timed (the same functions, in the same order)."""
    from dataclasses import replace

    from backup_tasks.catalog import manifest as catalog
    from backup_tasks.logical.pgrestore import pg_restore_into
    from backup_tasks.logical.restore import check_checksum
    from backup_tasks.logical.verify import scratch_database, server_major_of
    from backup_tasks.postgres.connect import connect
    from backup_tasks.postgres.queries import amcheck_indexes, count_rows
    from backup_tasks.settings import Settings
    from backup_tasks.storage.locations import open_storage

    settings = replace(Settings(), backup_dir=backup_dir)
    storage = open_storage(backup_dir)
    manifest = catalog.load(storage, backup_id)
    major = server_major_of(manifest)
    phases: dict[str, float] = {}
    mark = time.monotonic()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.monotonic()
        phases[name] = round(now - mark, 3)
        mark = now

    check_checksum(storage, manifest)
    lap("checksum")
    with scratch_database(settings, major) as target:
        lap("cluster")
        pg_restore_into(storage, manifest, target, min_major=major, settings=settings,
                        extra_args=("--no-owner", "--no-privileges"))
        lap("restore")
        with connect(target) as conn:
            count_rows(conn)
            lap("row counts")
            amcheck_indexes(conn)
            lap("amcheck")
            # For comparison, not part of verify: with and without heapallindexed, on 1 and 2 connections
            # (indexes dealt to the connections by the size of what each check reads: table + index).
            costs = conn.execute(
                "SELECT c.oid::regclass::text, pg_relation_size(i.indrelid) + pg_relation_size(i.indexrelid) "
                "FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam "
                "WHERE a.amname = 'btree' AND c.relnamespace NOT IN "
                "('pg_catalog'::regnamespace, 'pg_toast'::regnamespace)").fetchall()
            for heapallindexed in (False, True):
                for connections in (1, 2):
                    mark = time.monotonic()
                    _amcheck_lanes(target, costs, connections, heapallindexed)
                    lap(f"amcheck heapallindexed={str(heapallindexed).lower()}, {connections} connection(s)")
    lap("teardown")
    print(json.dumps(phases))


def _amcheck_lanes(target: Any, costs: Sequence[tuple[str, int]], connections: int, heapallindexed: bool) -> None:
    import threading

    from backup_tasks.postgres.connect import connect

    lanes: list[list[str]] = [[] for _ in range(connections)]
    loads = [0] * connections
    for name, cost in sorted(costs, key=lambda row: -row[1]):
        lightest = loads.index(min(loads))
        lanes[lightest].append(name)
        loads[lightest] += cost

    def check(names: list[str]) -> None:
        with connect(target) as conn:
            for name in names:
                conn.execute("SELECT bt_index_check(%s::regclass, %s)", (name, heapallindexed))

    workers = [threading.Thread(target=check, args=(lane,)) for lane in lanes]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


CHILDREN: dict[str, Callable[..., None]] = {
    "compress": child_compress, "pipeline": child_pipeline, "counts": child_counts,
    "restore": child_restore, "verify-phases": child_verify_phases,
}


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "child":
        CHILDREN[sys.argv[2]](*sys.argv[3:])
    else:
        raise SystemExit("run the experiments through bench/run.py --experiments")
