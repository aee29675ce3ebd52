"""``backup-tasks metrics`` with 84 dumps, 12 snapshots and 100,000 archived segments: under 1 s? What does it read?

The catalog and the WAL archive are the synthetic ones of ``bench_catalog_scale.py`` (from
``support/synthetic_catalog.py``: tiny data objects, manifests, segments with valid trailers), less the
two oldest snapshots (so 12 are kept, as ``BACKUP_KEEP_WEEKLY``), plus the archive's state file as
wal-push leaves it. The same catalog with an empty archive is the comparison. No server
(``DATABASE_URL`` unset): its cost is one connection and one row of ``pg_stat_archiver``, the same at
any archive size.

Timed (interleaved rounds, medians):

- ``collect + exposition``: one scrape's work in this process (imports done);
- ``command``: ``backup-tasks metrics`` as a process, what a textfile collector's cron pays;
- ``HTTP scrape``: GET ``/metrics`` from a running ``backup-tasks metrics --listen``, what Prometheus waits for.

What one scrape reads is recorded with an audit hook (``open``, ``os.listdir``, ``os.scandir``):
files opened and directories listed, by kind.

    flock -x /tmp/bt-machine.lock .venv/bin/python bench/bench_metrics.py [--segments 100000] [--rounds 5]

Results: ``bench/results/metrics-<stamp>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from support.paths import CLI, work_directory
from support.processes import cli_env, free_port
from support.results import markdown_table, stamp, write_results
from support.synthetic_catalog import DUMPS, build_local, catalog_objects, segment_objects

from backup_tasks.catalog.manifest import MANIFEST_SUFFIX, Manifest
from backup_tasks.observe.facts import collect
from backup_tasks.observe.metrics import exposition
from backup_tasks.settings import Settings
from backup_tasks.wal import state
from backup_tasks.wal.archive import WalArchive

KEPT_SNAPSHOTS = 12


def twelve_snapshots(objects: dict[str, bytes]) -> dict[str, bytes]:
    """The scale catalog less its oldest snapshots (every object of theirs), so ``KEPT_SNAPSHOTS`` remain."""
    snapshots = sorted(Manifest.from_dict(json.loads(data)).id for key, data in objects.items()
                       if key.endswith(MANIFEST_SUFFIX) and b'"kind": "snapshot"' in data)
    dropped = snapshots[:len(snapshots) - KEPT_SNAPSHOTS]
    return {key: data for key, data in objects.items() if not any(key.startswith(f"{i}.") for i in dropped)}


def record_newest(root: Path) -> None:
    """The state file as wal-push leaves it after its last segment."""
    archive = WalArchive.in_directory(root / "wal")
    names = archive.segment_names()
    if names:
        state.record(archive.root, names[-1], archive.trailer(names[-1]).completed_at, copy_where=None,
                     copy_stored=False)


def reads_of_one_scrape(settings: Settings) -> dict[str, Any]:
    """Files opened and directories listed by one ``collect``, counted by an audit hook."""
    events: list[tuple[str, str]] = []
    active = [True]

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if active[0] and event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], (str, Path)):
            events.append((event, str(args[0])))

    sys.addaudithook(hook)
    collect(settings)
    active[0] = False
    base = settings.backup_dir
    kinds: Counter[str] = Counter()
    for event, path in events:
        rel = os.path.relpath(path, base) if path.startswith(base) else path
        if event != "open":
            kinds["directories listed: " + ("WAL segment directories" if rel.startswith("wal/") else rel)] += 1
        elif rel.endswith(MANIFEST_SUFFIX):
            kinds["files opened: manifests"] += 1
        elif rel.startswith("wal/") and rel.endswith(".zst"):
            kinds["files opened: WAL segment trailers"] += 1
        else:
            kinds["files opened: outside BACKUP_DIR (timezone data...)" if rel.startswith("/") else
                  f"files opened: {rel}"] += 1
    return dict(sorted(kinds.items()))


def stop(server: subprocess.Popen[bytes]) -> None:
    server.terminate()
    server.wait(timeout=10)


def timed(fn: Any) -> float:
    started = time.perf_counter()
    fn()
    return round(time.perf_counter() - started, 4)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--segments", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    result: dict[str, Any] = {"segments": args.segments, "dumps": DUMPS, "snapshots": KEPT_SNAPSHOTS,
                              "rounds": args.rounds, "started": datetime.now(UTC).isoformat(timespec="seconds")}
    with work_directory("bt-bench-metrics-") as work, contextlib.ExitStack() as servers:
        catalog = twelve_snapshots(catalog_objects(args.segments))
        started = time.monotonic()
        for name, segments in (("empty", {}), ("full", segment_objects(args.segments))):
            build_local(work / name, catalog, segments, args.segments)
            record_newest(work / name)
        result["build_s"] = round(time.monotonic() - started, 1)
        setups = {name: Settings(backup_dir=str(work / name), broker_url="memory://") for name in ("empty", "full")}
        ports = {}
        for name, settings in setups.items():
            port = free_port()
            server = subprocess.Popen([str(CLI), "metrics", "--listen", f"127.0.0.1:{port}"],
                                      env=cli_env(BACKUP_DIR=settings.backup_dir),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            servers.callback(stop, server)
            ports[name] = port
        for port in ports.values():  # wait until both serve
            deadline = time.monotonic() + 30
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)

        operations = {
            "collect + exposition": lambda s, _p: exposition(collect(s)),
            "command": lambda s, _p: subprocess.run([str(CLI), "metrics"], env=cli_env(BACKUP_DIR=s.backup_dir),
                                                    stdout=subprocess.DEVNULL, check=True),
            "HTTP scrape": lambda _s, p: urllib.request.urlopen(f"http://127.0.0.1:{p}/metrics", timeout=30).read(),
        }
        for name, settings in setups.items():  # warm-up: imports, page cache
            for fn in operations.values():
                fn(settings, ports[name])
        samples: dict[str, list[float]] = {}
        for r in range(args.rounds):
            for name in (list(setups) if r % 2 == 0 else list(reversed(setups))):
                for op, fn in operations.items():
                    samples.setdefault(f"{name} / {op}", []).append(
                        timed(lambda fn=fn, name=name: fn(setups[name], ports[name])))
        result["timings"] = {k: {"median_s": round(statistics.median(v), 4), "all_s": v} for k, v in samples.items()}
        result["ratios_full_over_empty"] = {
            op: round(result["timings"][f"full / {op}"]["median_s"] / result["timings"][f"empty / {op}"]["median_s"], 3)
            for op in operations}
        result["reads_of_one_scrape"] = {name: reads_of_one_scrape(s) for name, s in setups.items()}
        sample = exposition(collect(setups["full"]))
        result["exposition_lines"] = len(sample.splitlines())
        result["up"] = "backup_tasks_up 1.0" in sample

    lines = [f"# backup-tasks metrics: {args.segments} segments, {DUMPS} dumps, {KEPT_SNAPSHOTS} snapshots, "
             f"{args.rounds} rounds", ""]
    lines += markdown_table(("setup / operation", "median s"),
                            ((k, f"{v['median_s']:.4f}") for k, v in result["timings"].items()), "lr")
    lines += ["", *markdown_table(("ratio full/empty", ""), result["ratios_full_over_empty"].items(), "lr")]
    for name, reads in result["reads_of_one_scrape"].items():
        lines += ["", f"what one scrape reads ({name} archive):", ""] + [f"- {k}: {v}" for k, v in reads.items()]
    write_results(f"metrics-{stamp()}", {".json": json.dumps(result, indent=2) + "\n", ".md": "\n".join(lines) + "\n"})
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
