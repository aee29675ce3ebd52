"""Measuring one command: wall time, CPU of its process tree and of the servers it drives, peak memory.

Everything comes from ``/proc`` (Linux only), sampled by a background thread:

* the command's process tree (the command and every descendant) is found by parent pid; the sum of
  its members' resident set sizes is sampled every ``interval`` seconds (50 ms by default) and the
  peak of that sum is the figure the issue asks for. Each member's own ``VmHWM`` (the kernel's
  exact per-process peak) is kept too, so a spike between two samples cannot hide entirely;
* the tree's CPU time is exact: ``wait4`` returns the child's usage including every descendant
  it reaped;
* PostgreSQL server processes working for the run are found by their process title: backends of
  the local server connected to one of ``databases`` (the title names the database), parallel
  workers of those backends, and every process of a throwaway cluster whose data directory lies
  under ``scratch_marker`` (verify's cluster: the bench points ``TMPDIR`` there). Their CPU is
  sampled, so it can miss the last ``interval`` of a process that exits;
* system-wide busy time (``/proc/stat``) minus all of the above is "foreign" CPU: other users of
  the machine (and the sampler itself). It tells a clean run from a disturbed one.

Also here: ``wait_for_quiet`` (start a run on a quiet machine), ``rotated`` (the order of a round) and
``process_cpu_seconds`` (the CPU a running process, e.g. an S3 server, has used so far).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
PARALLEL_WORKER = re.compile(r"parallel worker for PID (\d+)")


@dataclass(frozen=True)
class ProcStat:
    pid: int
    ppid: int
    comm: str
    start_ticks: int
    cpu_ticks: int  # utime + stime of the process itself
    children_ticks: int  # cutime + cstime: reaped children


def read_stat(pid: int) -> ProcStat | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode(errors="replace")
    except OSError:
        return None
    comm = raw[raw.index("(") + 1 : raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2 :].split()
    # fields[0] is state (field 3 of stat(5)); utime is field 14, so fields[11].
    return ProcStat(pid=pid, ppid=int(fields[1]), comm=comm, start_ticks=int(fields[19]),
                    cpu_ticks=int(fields[11]) + int(fields[12]), children_ticks=int(fields[13]) + int(fields[14]))


def all_stats() -> dict[int, ProcStat]:
    stats: dict[int, ProcStat] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            found = read_stat(int(name))
            if found is not None:
                stats[found.pid] = found
    return stats


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a running process so far (a server's work, read before and after a run)."""
    stat = read_stat(pid)
    if stat is None:
        raise ProcessLookupError(f"no process {pid}")
    return stat.cpu_ticks / CLOCK_TICKS


def read_cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def rss_bytes(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS ``VmHWM``) of one process, 0 when it is gone."""
    current = peak = 0
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmRSS:"):
                    current = int(line.split()[1]) * 1024
                elif line.startswith(b"VmHWM:"):
                    peak = int(line.split()[1]) * 1024
    except OSError:
        pass
    return current, peak


def system_busy_seconds() -> float:
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / CLOCK_TICKS


def boot_ticks_now() -> int:
    with open("/proc/uptime") as fh:
        return int(float(fh.read().split()[0]) * CLOCK_TICKS)


@dataclass
class Measurement:
    """What one run of one command cost."""

    label: str
    argv: list[str]
    wall_seconds: float
    exit_code: int
    tree_cpu_seconds: float
    tree_peak_rss_bytes: int
    process_peak_rss_bytes: dict[str, int]
    server_cpu_seconds: float
    system_busy_seconds: float
    foreign_cpu_seconds: float
    samples: int
    settle_wait_seconds: float = 0.0
    stdout: str = field(default="", repr=False)
    stderr_tail: str = field(default="", repr=False)

    def summary(self) -> dict[str, object]:
        return {
            "label": self.label, "wall_seconds": round(self.wall_seconds, 3), "exit_code": self.exit_code,
            "tree_cpu_seconds": round(self.tree_cpu_seconds, 3), "tree_peak_rss_bytes": self.tree_peak_rss_bytes,
            "process_peak_rss_bytes": self.process_peak_rss_bytes,
            "server_cpu_seconds": round(self.server_cpu_seconds, 3),
            "system_busy_seconds": round(self.system_busy_seconds, 3),
            "foreign_cpu_seconds": round(self.foreign_cpu_seconds, 3), "samples": self.samples,
            "settle_wait_seconds": round(self.settle_wait_seconds, 2),
        }


class _Sampler(threading.Thread):
    """Polls ``/proc`` while the command runs (see the module docstring for what it follows)."""

    def __init__(self, root_pid: int, *, databases: Iterable[str], scratch_marker: str | None,
                 interval: float, started_ticks: int) -> None:
        super().__init__(name="proc-sampler", daemon=True)
        self.root_pid = root_pid
        self.database_words = [f" {name} " for name in databases]
        self.scratch_marker = scratch_marker
        self.interval = interval
        self.started_ticks = started_ticks
        self.stop_event = threading.Event()
        self.tree: set[int] = {root_pid}
        self.names: dict[int, str] = {}
        self.tree_peak = 0
        self.process_peaks: dict[int, int] = {}
        self.samples = 0
        self.server_ticks: dict[int, int] = {}  # pid -> CPU ticks spent during the run (last seen)
        self.scratch_total_ticks = 0
        self._classified: dict[int, str] = {}  # pid -> "ours" | "scratch-postmaster" | "other"
        self._baseline: dict[int, int] = {}

    def run(self) -> None:
        tick = 0
        while not self.stop_event.is_set():
            if tick % 2 == 0:
                self._rescan()
            self._sample_rss()
            tick += 1
            self.stop_event.wait(self.interval)
        self._rescan()

    def _sample_rss(self) -> None:
        total = 0
        for pid in list(self.tree):
            current, peak = rss_bytes(pid)
            total += current
            if peak > self.process_peaks.get(pid, 0):
                self.process_peaks[pid] = peak
        self.samples += 1
        self.tree_peak = max(self.tree_peak, total)

    def _classify(self, stat: ProcStat, stats: Mapping[int, ProcStat]) -> str:
        known = self._classified.get(stat.pid)
        if known is not None:
            return known
        if not stat.comm.startswith("postgres"):
            self._classified[stat.pid] = "other"
            return "other"
        cmdline = read_cmdline(stat.pid)
        parent = stats.get(stat.ppid)
        parent_is_server = parent is not None and parent.comm.startswith("postgres")
        if self.scratch_marker and self.scratch_marker in cmdline and not parent_is_server:
            kind = "scratch-postmaster"
        elif not cmdline.startswith("postgres:"):
            return "other"  # a server child not yet retitled (or a postmaster): decide on a later scan
        elif any(word in f" {cmdline} " for word in self.database_words):
            kind = "ours"
        else:
            match = PARALLEL_WORKER.search(cmdline)
            kind = "ours" if match and self._classified.get(int(match[1])) == "ours" else "other"
        self._classified[stat.pid] = kind
        return kind

    def _rescan(self) -> None:
        stats = all_stats()
        children: dict[int, list[int]] = {}
        for stat in stats.values():
            children.setdefault(stat.ppid, []).append(stat.pid)
        tree: set[int] = set()
        todo = [self.root_pid]
        while todo:
            pid = todo.pop()
            if pid in stats and pid not in tree:
                tree.add(pid)
                self.names.setdefault(pid, stats[pid].comm)
                todo.extend(children.get(pid, []))
        if tree:
            self.tree = tree
        scratch_total = 0
        for stat in stats.values():
            kind = self._classify(stat, stats)
            if kind == "ours":
                if stat.pid not in self._baseline:
                    # Born during the run: everything it used counts; older: only what it used since.
                    self._baseline[stat.pid] = 0 if stat.start_ticks >= self.started_ticks else stat.cpu_ticks
                self.server_ticks[stat.pid] = stat.cpu_ticks - self._baseline[stat.pid]
            elif kind == "scratch-postmaster":
                # The postmaster's reaped children are in its cutime; live ones are added one by one.
                scratch_total += stat.cpu_ticks + stat.children_ticks
                scratch_total += sum(stats[c].cpu_ticks for c in children.get(stat.pid, []) if c in stats)
        # A cluster that already stopped contributes its last sighting.
        self.scratch_total_ticks = max(self.scratch_total_ticks, scratch_total)

    def server_cpu_seconds(self) -> float:
        return (sum(self.server_ticks.values()) + self.scratch_total_ticks) / CLOCK_TICKS

    def peaks_by_name(self) -> dict[str, int]:
        peaks: dict[str, int] = {}
        for pid, peak in self.process_peaks.items():
            name = self.names.get(pid, str(pid))
            peaks[name] = max(peaks.get(name, 0), peak)
        return peaks


def measure(label: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: Path | None = None,
            databases: Iterable[str] = (), scratch_marker: str | None = None, interval: float = 0.05,
            timeout: float = 3600) -> Measurement:
    """Run ``argv`` to completion and measure it; stdout is captured (through a file, not a pipe)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        busy_before = system_busy_seconds()
        own_before = os.times()
        started_ticks = boot_ticks_now()
        started = time.monotonic()
        proc = subprocess.Popen(list(argv), stdout=out, stderr=err, env=dict(env) if env is not None else None,
                                cwd=cwd)
        sampler = _Sampler(proc.pid, databases=databases, scratch_marker=scratch_marker, interval=interval,
                           started_ticks=started_ticks)
        sampler.start()
        deadline = started + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
            time.sleep(0.005)
        wall = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait for it again
        time.sleep(0.1)  # let server backends notice the disconnect and exit before the last scan
        sampler.stop_event.set()
        sampler.join()
        busy = system_busy_seconds() - busy_before
        own_after = os.times()
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr_tail = err.read().decode(errors="replace")[-4000:]
    tree_cpu = usage.ru_utime + usage.ru_stime
    own_cpu = (own_after.user + own_after.system) - (own_before.user + own_before.system)
    server_cpu = sampler.server_cpu_seconds()
    return Measurement(
        label=label, argv=list(argv), wall_seconds=wall, exit_code=proc.returncode, tree_cpu_seconds=tree_cpu,
        tree_peak_rss_bytes=sampler.tree_peak, process_peak_rss_bytes=sampler.peaks_by_name(),
        server_cpu_seconds=server_cpu, system_busy_seconds=busy,
        foreign_cpu_seconds=max(0.0, busy - tree_cpu - server_cpu - own_cpu), samples=sampler.samples,
        stdout=stdout, stderr_tail=stderr_tail,
    )


def wait_for_quiet(*, max_cores: float, window: float = 1.0, timeout: float = 30.0) -> float:
    """Wait (up to ``timeout``) until the machine's busy CPU over ``window`` seconds is below ``max_cores``.

    Other people's work on the same cores distorts timings; starting each run on a quiet machine
    makes the medians comparable. Returns the seconds waited; a ``timeout`` of 0 or less does not wait.
    """
    if timeout <= 0:
        return 0.0
    started = time.monotonic()
    while True:
        before = system_busy_seconds()
        time.sleep(window)
        if (system_busy_seconds() - before) / window < max_cores or time.monotonic() - started > timeout:
            return time.monotonic() - started


def rotated(items: Sequence[T], by: int) -> list[T]:
    """``items`` starting at ``by`` (modulo their number): round ``by``'s order, so that no variant always
    runs first (on a cold cache) or right after the same neighbour."""
    by %= len(items)
    return [*items[by:], *items[:by]]
