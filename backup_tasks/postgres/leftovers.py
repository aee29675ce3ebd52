"""Scratch directories that name the process owning them, and the sweep that clears those of dead runs.

A run killed with SIGKILL (the OOM killer, a worker's hard time limit, ``kill -9`` of its process
group) runs no cleanup. Its throwaway cluster keeps running, since pg_ctl starts the postmaster in a
session of its own, out of reach of a kill of the run's process group; its directories stay in
TMPDIR or /dev/shm, a restored database or an unpacked snapshot in them. Nothing tied to the dead
process can clean up after it: ``PR_SET_PDEATHSIG`` would have to be set in the postmaster itself,
which pg_ctl forks (the setting is not inherited across fork), which ``runuser`` starts under another
user (a change of credentials clears it), and it fires when the *thread* that forked exits (verify
starts its cluster on a short-lived thread). So the next run that makes such a directory sweeps:

* ``owned_tempdir`` makes ``<prefix><random>.<pid>`` and writes ``owner.pid`` inside it: the pid,
  its start time (``/proc/<pid>/stat``), the boot id and the pid namespace. A pid alone may have been
  reused; with its start time it names one process, and a reboot ends every owner. (A run killed
  between the ``mkdir`` and the record is judged by the pid in the name alone.)
* ``sweep(parent, prefix)`` judges every ``<prefix>*`` directory there by its owner: alive, or in
  another pid namespace (a container sharing TMPDIR, whose pids mean nothing here), and it is left
  alone. Otherwise every process whose command line names a path inside it (a postmaster's and
  pg_ctl's ``-D``, initdb's, wal-fetch's, pg_basebackup's) is stopped, the postmaster with SIGQUIT
  (PostgreSQL's immediate shutdown, which takes its backends with it), then the directory is removed.
* A directory that names no owner at all (made by an older version) goes only when nothing runs in
  it and it has not changed for an hour.

Standard library only.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


#: The owner record inside each directory (the snapshot staging's name for it before there was a sweep).
OWNER_FILE = "owner.pid"
#: A directory whose owner is unknown is removed once nothing runs in it and it is this old.
UNKNOWN_OWNER_SECONDS = 3600
#: How long a dead run's postmaster gets for its immediate shutdown before it is killed.
STOP_SECONDS = 10.0


def process_alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie waiting for a parent that is not us counts as gone)."""
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except ProcessLookupError:
        return False
    except (OSError, IndexError):
        return True  # no /proc (not Linux), or unreadable: os.kill said it exists


def start_time(pid: int) -> str | None:
    """When ``pid`` started, in clock ticks since boot (``/proc/<pid>/stat`` field 22); None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


@functools.cache
def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


@functools.cache
def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")  # e.g. pid:[4026531836]
    except OSError:
        return None


@dataclass(frozen=True)
class Owner:
    """One process, as recorded in ``owner.pid``: ``pid [start boot pid-namespace]``."""

    pid: int
    start: str | None = None
    boot: str | None = None
    pid_namespace: str | None = None

    @classmethod
    def this_process(cls) -> Owner:
        pid = os.getpid()  # not cached: a forked worker is a process of its own
        return cls(pid, start_time(pid), _boot_id(), _pid_namespace())

    @classmethod
    def parse(cls, text: str) -> Owner | None:
        fields = text.split()
        if not fields or not fields[0].isdigit():
            return None
        rest = [value if value != "-" else None for value in fields[1:4]]
        return cls(int(fields[0]), *rest)

    @classmethod
    def from_name(cls, name: str) -> Owner | None:
        """The pid in a name ``owned_tempdir`` made (``<prefix><random>.<pid>``)."""
        _, dot, pid = name.rpartition(".")
        return cls(int(pid)) if dot and pid.isdigit() else None

    def record(self) -> str:
        return " ".join([str(self.pid), *(value or "-" for value in (self.start, self.boot, self.pid_namespace))])

    def alive(self) -> bool:
        """Whether this process may still run; True whenever that cannot be told from here."""
        here = Owner.this_process()
        if self.pid_namespace and here.pid_namespace and self.pid_namespace != here.pid_namespace:
            return True  # another container's pid: not ours to judge
        if self.boot and here.boot and self.boot != here.boot:
            return False  # the machine has restarted since
        if not process_alive(self.pid):
            return False
        now = start_time(self.pid)
        return self.start is None or now is None or now == self.start  # else: the pid was reused


def owned_tempdir(prefix: str, parent: str | Path | None = None) -> Path:
    """``tempfile.mkdtemp`` whose name ends in ``.<pid>`` and which records its owner: ``sweep`` can tell it."""
    path = Path(tempfile.mkdtemp(prefix=prefix, suffix=f".{os.getpid()}", dir=parent))
    try:
        (path / OWNER_FILE).write_text(Owner.this_process().record() + "\n")
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return path


def sweep(parent: Path, prefix: str) -> list[Path]:
    """Remove the directories ``parent/<prefix>*`` of dead runs, stopping whatever still runs in them."""
    try:
        entries = [entry for entry in os.scandir(parent)
                   if entry.name.startswith(prefix) and entry.is_dir(follow_symlinks=False)]
    except OSError:
        return []
    removed = []
    for entry in entries:
        path = Path(entry.path)
        if not _abandoned(path):
            continue
        stop_processes_in(path)
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path):
            log.info("removed %s, left by a run that was killed", path)
            removed.append(path)
    return removed


def _abandoned(path: Path) -> bool:
    try:
        owner = Owner.parse((path / OWNER_FILE).read_text())
    except FileNotFoundError:
        owner = Owner.from_name(path.name)  # killed between mkdir and the record, or made by an older version
    except OSError:
        return False  # another user's: not ours to read, nor to remove
    if owner is not None:
        return not owner.alive()
    try:
        age = time.time() - path.lstat().st_mtime
    except OSError:
        return False
    return age > UNKNOWN_OWNER_SECONDS and not processes_in(path)


def processes_in(path: Path) -> list[int]:
    """Processes whose command line names ``path`` or a path inside it (a postmaster's ``-D``, pg_ctl's, initdb's)."""
    names = {os.fsencode(str(path)), os.fsencode(os.path.realpath(path))}
    inside = tuple(name + b"/" for name in names)
    found = []
    try:
        pids = [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return []
    for pid in pids:
        if pid == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if any(arg in names or arg.startswith(inside) for arg in argv):
            found.append(pid)
    return found


def stop_processes_in(path: Path) -> None:
    """Stop what a dead run left running in ``path``: postmasters by immediate shutdown, anything else killed."""
    signalled = []
    for pid in processes_in(path):
        try:
            os.kill(pid, signal.SIGQUIT if _is_postgres(pid) else signal.SIGKILL)
        except OSError:  # gone meanwhile, or not ours to signal
            continue
        signalled.append(pid)
    _wait_gone(signalled)
    stragglers = []
    for pid in processes_in(path):  # a postmaster that did not stop in time, or one started meanwhile
        log.warning("killing process %d, which still runs in %s", pid, path)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
            stragglers.append(pid)
    _wait_gone(stragglers)


def _wait_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + STOP_SECONDS
    while any(process_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.01)


def _is_postgres(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().strip() == b"postgres"
    except OSError:
        return False
