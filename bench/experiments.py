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

Each variant runs in its own process (``python experiments.py child ...``) so it is measured
like the main runs (wall, CPU of the tree and of the servers, peak RSS).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path[:0] = [str(ROOT), str(BENCH_DIR)]

from measure import Measurement, measure  # noqa: E402

if TYPE_CHECKING:
    from run import Bench, BenchDatabase

MIB = 1 << 20
FLOOR_CUSTOM = 'pg_dump --format=custom --compress=0 "$DB_CONN" > /dev/null'
PYTHON = sys.executable
CODEC_VARIANTS = ((1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2), (4, 0), (4, 1), (6, 1))
PIPELINE_VARIANTS = ((1, 0), (1, 1), (2, 0), (3, 0), (3, 1), (4, 1))
GENERIC_CORPUS = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
#: (label, mode, server settings on top of cluster.FAST_SETTINGS)
RESTORE_VARIANTS: tuple[tuple[str, str, dict[str, str]], ...] = (
    ("stdin, one transaction (as verify does)", "stdin", {}),
    ("stdin, one transaction, work_mem=256MB jit=off", "stdin", {"work_mem": "256MB", "jit": "off"}),
    ("stdin, one transaction, maintenance_work_mem=64MB", "stdin", {"maintenance_work_mem": "64MB"}),
    ("stdin, one transaction, maintenance_work_mem=1GB", "stdin", {"maintenance_work_mem": "1GB"}),
    ("stdin, one transaction, no parallel index build", "stdin", {"max_parallel_maintenance_workers": "0"}),
    ("decompress to file, pg_restore -j2", "j2", {}),
    ("decompress to file, pg_restore -j2, work_mem=256MB jit=off", "j2", {"work_mem": "256MB", "jit": "off"}),
)


# --- children: each runs in its own measured process ------------------------------------------

def child_compress(source: str, level: str, threads: str, target: str) -> None:
    import hashlib

    import zstandard

    params = zstandard.ZstdCompressionParameters.from_level(int(level), threads=int(threads), write_checksum=True)
    comp = zstandard.ZstdCompressor(compression_params=params).compressobj()
    digest = hashlib.sha256()
    size = 0
    with open(source, "rb") as fh, open(target, "wb") as out:
        while chunk := fh.read(MIB):
            data = comp.compress(chunk)
            digest.update(data)
            out.write(data)
            size += len(data)
        data = comp.flush()
        digest.update(data)
        out.write(data)
        size += len(data)
    print(json.dumps({"size": size}))


def child_pipeline(url: str, level: str, threads: str, target: str) -> None:
    """``run_dump``'s streaming loop without the catalog: pg_dump | zstd | sha256 | file, fsynced."""
    import hashlib
    import os

    import zstandard

    params = zstandard.ZstdCompressionParameters.from_level(int(level), threads=int(threads), write_checksum=True)
    comp = zstandard.ZstdCompressor(compression_params=params).compressobj()
    digest = hashlib.sha256()
    size = 0
    proc = subprocess.Popen(["pg_dump", "--format=custom", "--compress=0", url], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    with open(target, "wb", buffering=0) as out:
        while chunk := proc.stdout.read(MIB):
            data = comp.compress(chunk)
            if data:
                digest.update(data)
                out.write(data)
                size += len(data)
        data = comp.flush()
        digest.update(data)
        out.write(data)
        size += len(data)
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
    from backup_tasks.logical.restore import check_checksum, pg_restore_into
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


# --- orchestration ----------------------------------------------------------------------------

def _measured(bench: Bench, db: BenchDatabase, label: str, argv: Sequence[str], env: dict[str, str], *,
              scratch: bool = False) -> Measurement:
    """``measure`` on a quiet machine, repeated (``--retries``) while other work disturbs it."""
    for attempt in range(bench.args.retries + 1):
        bench.settle()
        m = measure(label, argv, env=env, databases=[db.name],
                    scratch_marker=str(bench.scratch_dir) if scratch else None)
        disturbed = m.foreign_cpu_seconds > bench.args.max_foreign_cores * m.wall_seconds
        if m.exit_code != 0 or not disturbed or attempt == bench.args.retries:
            break
        bench.say(f"experiment {label}: disturbed ({m.foreign_cpu_seconds:.1f}s foreign CPU), repeating")
    if m.exit_code != 0:
        raise RuntimeError(f"experiment {label} failed: {m.stderr_tail[-500:]}")
    return m


def _child(bench: Bench, db: BenchDatabase, label: str, *args: str, scratch: bool = False) -> tuple[Measurement, dict]:
    m = _measured(bench, db, label, [PYTHON, str(Path(__file__).resolve()), "child", *args], bench.our_env(db),
                  scratch=scratch)
    lines = [ln for ln in m.stdout.splitlines() if ln.startswith("{")]
    detail = json.loads(lines[-1]) if lines else {}
    bench.say(f"experiment {label:55} {m.wall_seconds:6.2f}s cpu tree {m.tree_cpu_seconds:5.2f}s server "
              f"{m.server_cpu_seconds:5.2f}s rss {m.tree_peak_rss_bytes / MIB:6.1f} MiB {detail}")
    return m, detail


def _row(label: str, ms: Sequence[Measurement], **extra: Any) -> dict[str, Any]:
    return {"variant": label, "wall_median": round(statistics.median(m.wall_seconds for m in ms), 3),
            "walls": [round(m.wall_seconds, 2) for m in ms],
            "tree_cpu_median": round(statistics.median(m.tree_cpu_seconds for m in ms), 3),
            "server_cpu_median": round(statistics.median(m.server_cpu_seconds for m in ms), 3),
            "peak_rss_mib": round(max(m.tree_peak_rss_bytes for m in ms) / MIB, 1), **extra}


def _table(title: str, rows: Sequence[dict[str, Any]], extra_columns: Sequence[str] = ()) -> str:
    head = ["variant", "wall s (median)", "walls", "CPU tree s", "CPU server s", "peak RSS MiB", *extra_columns]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for row in rows:
        cells = [row["variant"], f"{row['wall_median']:.2f}", " ".join(f"{w:.2f}" for w in row["walls"]),
                 f"{row['tree_cpu_median']:.2f}", f"{row['server_cpu_median']:.2f}", f"{row['peak_rss_mib']:.1f}",
                 *(str(row.get(c, "")) for c in extra_columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def codec_experiment(bench: Bench, db: BenchDatabase, rounds: int) -> list[dict[str, Any]]:
    raw = bench.workdir / "raw.dump"
    subprocess.run(["bash", "-c", 'pg_dump --format=custom --compress=0 "$DB_CONN" > "$RAW"'],
                   env=bench.seed_env(db, {"RAW": str(raw)}), check=True)
    out = bench.workdir / "codec.out"
    corpora = [("trading archive", raw)]
    generic = bench.workdir / "generic.tar"
    if GENERIC_CORPUS.is_dir():
        subprocess.run(["tar", "cf", str(generic), "-C", str(GENERIC_CORPUS.parent), GENERIC_CORPUS.name],
                       check=False, stderr=subprocess.DEVNULL)
        corpora.append((f"generic text ({GENERIC_CORPUS.name} sources, tar)", generic))
    rows: list[dict[str, Any]] = []
    for corpus, path in corpora:
        raw_size = path.stat().st_size
        gz = [measure("gzip -6", ["bash", "-c", f'gzip -6 -c "{path}" > "{out}"']) for _ in range(rounds)]
        gz_size = out.stat().st_size
        rows.append(_row(f"{corpus}: gzip -6", gz, size_mib=round(gz_size / MIB, 1), vs_gzip="1.000",
                         raw_mib=round(raw_size / MIB, 1)))
        variants = CODEC_VARIANTS if corpus == "trading archive" else ((1, 0), (2, 0), (3, 0), (4, 0), (6, 0))
        for level, threads in variants:
            ms, size = [], 0
            for _ in range(rounds):
                m, detail = _child(bench, db, f"codec {corpus[:16]} zstd -{level} threads={threads}", "compress",
                                   str(path), str(level), str(threads), str(out))
                ms.append(m)
                size = int(detail["size"])
            rows.append(_row(f"{corpus}: zstd -{level}, threads={threads}", ms, size_mib=round(size / MIB, 1),
                             vs_gzip=f"{size / gz_size:.3f}", raw_mib=round(raw_size / MIB, 1)))
    for path in (raw, out, generic):
        path.unlink(missing_ok=True)
    return rows


def pipeline_experiment(bench: Bench, db: BenchDatabase, rounds: int) -> list[dict[str, Any]]:
    url = bench.url_for(db.name)
    out = bench.workdir / "pipeline.out"
    floor_label = "floor (pg_dump -Fc -Z0 > /dev/null)"
    variants: list[tuple[str, int | None, int]] = [(floor_label, None, 0)]
    variants += [(f"zstd -{level}, threads={threads}", level, threads) for level, threads in PIPELINE_VARIANTS]
    results: dict[str, list[Measurement]] = {}
    sizes: dict[str, int] = {}
    for rnd in range(rounds):
        shift = rnd % len(variants)
        for label, level, threads in variants[shift:] + variants[:shift]:
            if level is None:
                m = _measured(bench, db, label, ["bash", "-c", FLOOR_CUSTOM], bench.seed_env(db))
            else:
                m, detail = _child(bench, db, f"pipeline {label}", "pipeline", url, str(level), str(threads),
                                   str(out))
                sizes[label] = int(detail["size"])
            results.setdefault(label, []).append(m)
    out.unlink(missing_ok=True)
    floor = statistics.median(m.wall_seconds for m in results[floor_label])
    return [_row(label, ms, vs_floor=f"{statistics.median(m.wall_seconds for m in ms) / floor:.2f}",
                 size_mib=round(sizes[label] / MIB, 1) if label in sizes else "")
            for label, ms in results.items()]


def counts_experiment(bench: Bench, db: BenchDatabase, rounds: int) -> list[dict[str, Any]]:
    url = bench.url_for(db.name)
    modes = {"pg_dump --snapshot alone": "none", "+ row counts in the snapshot (as run_dump)": "counts",
             "+ row counts, index-only scans disabled (worst case)": "seqscan"}
    results: dict[str, list[Measurement]] = {}
    counted: dict[str, list[float]] = {}
    for rnd in range(rounds):
        order = list(modes.items())
        for label, mode in order[rnd % 3:] + order[:rnd % 3]:
            m, detail = _child(bench, db, f"counts: {label}", "counts", url, mode)
            results.setdefault(label, []).append(m)
            if "seconds" in detail:
                counted.setdefault(label, []).append(detail["seconds"])
    return [_row(label, ms, counting_s=f"{statistics.median(counted[label]):.2f}" if label in counted else "")
            for label, ms in results.items()]


def restore_experiment(bench: Bench, db: BenchDatabase, rounds: int) -> list[dict[str, Any]]:
    from backup_tasks.postgres.cluster import FAST_SETTINGS

    backup_id = bench.latest_backup[db.requested_mb]
    backup = next(bench.backup_dir(db).glob(f"{backup_id}.dump.*"))
    results: dict[str, list[Measurement]] = {}
    phases: dict[str, dict[str, float]] = {}
    for rnd in range(rounds):
        order = list(RESTORE_VARIANTS)
        shift = rnd % len(order)
        for label, mode, overrides in order[shift:] + order[:shift]:
            m, detail = _child(bench, db, f"restore {label}", "restore", str(backup), mode,
                               json.dumps({**FAST_SETTINGS, **overrides}), str(bench.scratch_dir), scratch=True)
            results.setdefault(label, []).append(m)
            phases[label] = detail
    return [_row(label, ms, phases=" ".join(f"{k} {v:.2f}" for k, v in phases[label].items()))
            for label, ms in results.items()]


def verify_phase_experiment(bench: Bench, db: BenchDatabase) -> dict[str, float]:
    backup_id = bench.latest_backup[db.requested_mb]
    _m, detail = _child(bench, db, "verify phases", "verify-phases", str(bench.backup_dir(db)), backup_id,
                        scratch=True)
    return detail


def run_experiments(bench: Bench, db: BenchDatabase, rounds: int = 2) -> dict[str, Any]:
    bench.say(f"tuning experiments on {db.name} ({rounds} rounds each)")
    if db.requested_mb not in bench.latest_backup:
        bench.run_one(db, 0, "ours_dump")
    codec = codec_experiment(bench, db, rounds)
    pipeline = pipeline_experiment(bench, db, rounds)
    counts = counts_experiment(bench, db, rounds)
    restore = restore_experiment(bench, db, rounds)
    phases = verify_phase_experiment(bench, db)
    text = "\n\n".join([
        _table("1. Codec alone (1 MiB chunks, sha256 of the output)", codec, ("raw_mib", "size_mib", "vs_gzip")),
        _table("2. Dump pipeline end to end (pg_dump -Fc -Z0 | zstd | sha256 | file, fsync)", pipeline,
               ("vs_floor", "size_mib")),
        _table("3. Row counts during the dump", counts, ("counting_s",)),
        _table("4. Verify restore into a throwaway cluster (cluster start/stop included)", restore, ("phases",)),
        "### 5. verify phases (current code)\n\n| phase | seconds |\n|---|---:|\n"
        + "\n".join(f"| {k} | {v:.2f} |" for k, v in phases.items()),
    ])
    return {"codec": codec, "pipeline": pipeline, "counts": counts, "restore": restore, "verify_phases": phases,
            "markdown": text}


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "child":
        CHILDREN[sys.argv[2]](*sys.argv[3:])
    else:
        raise SystemExit("run the experiments through bench/run.py --experiments")
