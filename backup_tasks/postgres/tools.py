"""PostgreSQL binaries matched to what they touch, their environment, their stderr.

The password only ever travels in the ``PGPASSWORD`` environment of a child process: never on a
command line, never in a message.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from backup_tasks.conninfo import ConnInfo
from backup_tasks.errors import ClusterError, ToolMissing

PG_LIB_ROOT = Path("/usr/lib/postgresql")

#: What Debian's postgresql-client-N holds (its file list for 15); every other binary comes with the
#: server package postgresql-N, which depends on the client one, so naming it is always enough.
CLIENT_TOOLS = frozenset({
    "clusterdb", "createdb", "createuser", "dropdb", "dropuser", "pg_amcheck", "pg_basebackup", "pg_config",
    "pg_dump", "pg_dumpall", "pg_isready", "pg_receivewal", "pg_recvlogical", "pg_restore", "pg_verifybackup",
    "psql", "reindexdb", "vacuumdb",
})

#: One or several directories (``Settings.pg_bin_dir`` is a tuple; a single Path is still accepted).
BinDirs = Path | Iterable[Path] | None


@dataclass(frozen=True)
class Tool:
    path: Path
    major: int
    version: str = ""  # what ``--version`` said, e.g. "18.6"; "" when it said nothing readable


#: ``--version`` per binary, keyed by its path and what stat says of it: a lookup repeated for every
#: restore or snapshot costs a stat, and a binary replaced in place (a minor upgrade) is asked again.
_VERSIONS: dict[tuple[str, int, int, int], str] = {}


def _version_of(binary: Path) -> str:
    info = binary.stat()
    key = (str(binary), info.st_ino, info.st_mtime_ns, info.st_size)
    cached = _VERSIONS.get(key)
    if cached is not None:
        return cached
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=False,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""  # not runnable here (wrong architecture, a broken script): a candidate of no version
    match = re.search(r"\(PostgreSQL\)\s+(\d+[.\w]*)", out) or re.search(r"(\d+(?:\.\d+)?)", out)
    version = match[1] if match else ""
    _VERSIONS[key] = version
    return version


def major_of(version: str) -> int:
    """The major of a version string: "15.20" and "15.20 (Debian 15.20-0+deb12u1)" are 15, "18beta1" 18; 0 if none."""
    match = re.match(r"\s*(\d+)", version)
    return int(match[1]) if match else 0


def package_for(name: str, major: int) -> str:
    """The Debian package that installs ``name`` of PostgreSQL ``major``."""
    return f"postgresql-client-{major}" if name in CLIENT_TOOLS else f"postgresql-{major}"


def _bin_dirs(bin_dir: BinDirs) -> list[Path]:
    if bin_dir is None:
        return []
    if isinstance(bin_dir, (str, os.PathLike)):
        return [Path(bin_dir)]
    return [Path(d) for d in bin_dir]


def search_dirs(bin_dir: BinDirs = None) -> list[Path]:
    """Where tools are looked for, in order: ``PG_BIN_DIR``'s directories, every Debian
    ``/usr/lib/postgresql/N/bin`` (newest first: Debian keeps several majors side by side), then PATH."""
    dirs = _bin_dirs(bin_dir)
    if PG_LIB_ROOT.is_dir():
        versions = sorted((p for p in PG_LIB_ROOT.iterdir() if p.name.isdigit()), key=lambda p: -int(p.name))
        dirs.extend(v / "bin" for v in versions)
    dirs.extend(Path(d) for d in os.environ.get("PATH", "").split(os.pathsep) if d)
    unique: dict[str, Path] = {}
    for d in dirs:
        unique.setdefault(os.path.normpath(d), d)
    return list(unique.values())


def installed(name: str, bin_dir: BinDirs = None) -> list[Tool]:
    """Every runnable ``name`` in ``search_dirs`` order, one per real file, with its version."""
    tools: list[Tool] = []
    real_seen: set[str] = set()
    for directory in search_dirs(bin_dir):
        candidate = directory / name
        if not (candidate.is_file() and os.access(candidate, os.X_OK)):
            continue
        real = os.path.realpath(candidate)
        if real in real_seen:
            continue
        real_seen.add(real)
        version = _version_of(candidate)
        tools.append(Tool(candidate, major_of(version), version))
    return tools


def find_tool(name: str, *, min_major: int = 0, exact_major: int | None = None, bin_dir: BinDirs = None,
              why: str = "") -> Tool:
    """The binary ``name`` matched to what it touches.

    ``exact_major``: the first one of exactly that major, in search order (``PG_BIN_DIR`` first, so the
    operator's choice wins): for what reads or runs a data directory, a snapshot or the WAL (``pg_ctl``,
    ``postgres``, ``initdb``, ``pg_controldata``, ``pg_basebackup``, ``pg_verifybackup``, ``pg_waldump``,
    ``pg_combinebackup``), which a PostgreSQL of another major misreads or refuses.
    Otherwise the newest no older than ``min_major`` (ties: search order): ``pg_dump`` refuses a server
    newer than itself and reads older ones, and ``pg_restore``/``psql`` likewise.
    ``why`` ends the error's first sentence (e.g. "for the snapshot X of PostgreSQL 15.20").
    Raises ToolMissing naming the Debian package to install and the directories searched.
    """
    found = installed(name, bin_dir)
    if exact_major is not None:
        match = next((t for t in found if t.major == exact_major), None)
    else:
        match = max((t for t in found if t.major >= min_major), key=lambda t: t.major, default=None)
    if match is not None:
        return match
    raise ToolMissing(_missing(name, min_major, exact_major, found, bin_dir, why))


def _missing(name: str, min_major: int, exact_major: int | None, found: list[Tool], bin_dir: BinDirs,
             why: str) -> str:
    searched = ", ".join(str(d) for d in search_dirs(bin_dir))
    where = (f"looked in PG_BIN_DIR, {PG_LIB_ROOT}/*/bin and PATH: {searched}" if searched
             else f"looked in PG_BIN_DIR, {PG_LIB_ROOT}/*/bin and PATH, all empty")
    others = "; found only " + ", ".join(f"{t.path} ({t.version or 'no version'})" for t in found) if found else ""
    for_what = f" {why.strip()}" if why.strip() else ""
    if exact_major is not None:
        package = package_for(name, exact_major)
        return (f"{name} of PostgreSQL {exact_major} is needed{for_what}, and no other major will do{others}. "
                f"Install {package} (apt-get install {package}) or add its bin directory to PG_BIN_DIR "
                f"({where})")
    if min_major > 0:
        package = package_for(name, min_major)
        return (f"{name} {min_major} or newer is needed{for_what or ' for this server'}{others}. "
                f"Install {package} (apt-get install {package}) or add its bin directory to PG_BIN_DIR ({where})")
    return (f"{name} not found{for_what}{others} ({where}); install the PostgreSQL client tools "
            f"(e.g. apt-get install postgresql-client) or set PG_BIN_DIR")


def data_dir_major(data_dir: Path) -> int:
    """The major of the PostgreSQL that made ``data_dir``, from its PG_VERSION file."""
    try:
        text = (data_dir / "PG_VERSION").read_text().strip()
    except FileNotFoundError:
        raise ClusterError(f"{data_dir} is not a PostgreSQL data directory (it has no PG_VERSION file)") from None
    except OSError as exc:
        raise ClusterError(f"cannot read {data_dir / 'PG_VERSION'}: {exc.strerror}") from None
    major = major_of(text)
    if major == 0:
        raise ClusterError(f"{data_dir / 'PG_VERSION'} says {text[:40]!r}, not a PostgreSQL major version")
    return major


def tool_for_data_dir(name: str, data_dir: Path, *, bin_dir: BinDirs = None) -> Tool:
    """``name`` of exactly the major that made ``data_dir`` (pg_ctl, postgres, pg_controldata...)."""
    major = data_dir_major(data_dir)
    return find_tool(name, exact_major=major, bin_dir=bin_dir,
                     why=f"for the data directory {data_dir} (made by PostgreSQL {major})")


class StderrTail:
    """Drain a child's stderr on a thread, keeping only its last ``keep`` lines (memory stays flat).

    ``consume`` may take a line instead (return True), e.g. to count pg_dump's progress lines.
    """

    def __init__(self, stream: IO[bytes], *, name: str, keep: int = 50,
                 consume: Callable[[str], bool] | None = None) -> None:
        self.lines: list[str] = []
        self._stream, self._keep, self._consume = stream, keep, consume
        self._thread = threading.Thread(target=self._drain, name=f"{name}-stderr", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        for raw in self._stream:
            line = raw.decode(errors="replace").rstrip()
            if line and not (self._consume and self._consume(line)):
                self.lines.append(line)
                del self.lines[:-self._keep]

    def join(self) -> str:
        """Wait for the stream to end; the kept tail as one text."""
        self._thread.join()
        return "\n".join(self.lines)


def tool_env(conninfo: ConnInfo) -> dict[str, str]:
    """A child environment for libpq tools: ours minus any PG* variable, plus this target's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(conninfo.libpq_env())
    env.setdefault("PGCONNECT_TIMEOUT", "10")
    return env
