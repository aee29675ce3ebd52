"""The tuning experiments' orchestration (``run.py --experiments``): which variants, in what order, the tables.

Every variant runs as a measured child process, ``python bench/experiments.py child <name> ARGS...``
(what each child does is described there), on a quiet machine and repeated while other work disturbs
it, as the main runs are; the child prints what it found as one JSON line. Rounds are interleaved:
the order of the variants rotates from round to round.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from support import MIB
from support.databases import BenchDatabase
from support.measure import Measurement, measure, rotated
from support.paths import BENCH_DIR
from support.results import markdown_table
from support.runners import FLOOR_CUSTOM, Bench

EXPERIMENTS_SCRIPT = BENCH_DIR / "experiments.py"
CODEC_VARIANTS = ((1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2), (4, 0), (4, 1), (6, 1))
GENERIC_CODEC_VARIANTS = ((1, 0), (2, 0), (3, 0), (4, 0), (6, 0))
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


def _measured(bench: Bench, db: BenchDatabase, label: str, argv: Sequence[str], env: dict[str, str], *,
              scratch: bool = False) -> Measurement:
    """``measure`` on a quiet machine, repeated (``--retries``) while other work disturbs it."""
    for attempt in range(bench.args.retries + 1):
        bench.settle()
        m = measure(label, argv, env=env, databases=[db.name],
                    scratch_marker=str(bench.scratch_dir) if scratch else None)
        if m.exit_code != 0 or not bench.disturbed(m) or attempt == bench.args.retries:
            break
        bench.say(f"experiment {label}: disturbed ({m.foreign_cpu_seconds:.1f}s foreign CPU), repeating")
    if m.exit_code != 0:
        raise RuntimeError(f"experiment {label} failed: {m.stderr_tail[-500:]}")
    return m


def _child(bench: Bench, db: BenchDatabase, label: str, *args: str, scratch: bool = False) -> tuple[Measurement, dict]:
    m = _measured(bench, db, label, [sys.executable, str(EXPERIMENTS_SCRIPT), "child", *args], bench.our_env(db),
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
    cells = ([row["variant"], f"{row['wall_median']:.2f}", " ".join(f"{w:.2f}" for w in row["walls"]),
              f"{row['tree_cpu_median']:.2f}", f"{row['server_cpu_median']:.2f}", f"{row['peak_rss_mib']:.1f}",
              *(str(row.get(c, "")) for c in extra_columns)] for row in rows)
    return "\n".join([f"### {title}", "", *markdown_table(head, cells)])


def _interleaved(variants: Sequence[Any], rounds: int) -> list[Any]:
    """Every variant once per round, the order rotated by one each round."""
    return [variant for rnd in range(rounds) for variant in rotated(variants, rnd)]


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
        variants = CODEC_VARIANTS if corpus == "trading archive" else GENERIC_CODEC_VARIANTS
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
    for label, level, threads in _interleaved(variants, rounds):
        if level is None:
            m = _measured(bench, db, label, ["bash", "-c", FLOOR_CUSTOM], bench.seed_env(db))
        else:
            m, detail = _child(bench, db, f"pipeline {label}", "pipeline", url, str(level), str(threads), str(out))
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
    for label, mode in _interleaved(list(modes.items()), rounds):
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
    for label, mode, overrides in _interleaved(RESTORE_VARIANTS, rounds):
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
        "\n".join(["### 5. verify phases (current code)", "",
                   *markdown_table(("phase", "seconds"), ((k, f"{v:.2f}") for k, v in phases.items()), "lr")]),
    ])
    return {"codec": codec, "pipeline": pipeline, "counts": counts, "restore": restore, "verify_phases": phases,
            "markdown": text}
