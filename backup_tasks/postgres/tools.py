"""PostgreSQL client binaries: finding one no older than the server, its environment, its stderr.

The password only ever travels in the ``PGPASSWORD`` environment of a child process: never on a
command line, never in a message.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from backup_tasks.conninfo import ConnInfo
from backup_tasks.errors import ToolMissing

PG_LIB_ROOT = Path("/usr/lib/postgresql")


@dataclass(frozen=True)
class Tool:
    path: Path
    major: int


def _major_of(binary: Path) -> int:
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"(\d+)(?:\.\d+)?", out)
    return int(match[1]) if match else 0


def find_tool(name: str, *, min_major: int = 0, bin_dir: Path | None = None) -> Tool:
    """Locate a PostgreSQL client binary no older than the server (pg_dump refuses newer servers).

    Order: ``PG_BIN_DIR`` when set; the newest ``/usr/lib/postgresql/N/bin`` (Debian keeps several
    majors side by side there); then ``PATH``.
    """
    candidates: list[Path] = []
    if bin_dir is not None:
        candidates.append(bin_dir / name)
    if PG_LIB_ROOT.is_dir():
        versions = sorted((p for p in PG_LIB_ROOT.iterdir() if p.name.isdigit()), key=lambda p: -int(p.name))
        candidates.extend(v / "bin" / name for v in versions)
    on_path = shutil.which(name)
    if on_path:
        candidates.append(Path(on_path))
    seen: list[str] = []
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            major = _major_of(candidate)
            if major >= min_major:
                return Tool(candidate, major)
            seen.append(f"{candidate} ({major})")
    if seen:
        raise ToolMissing(f"{name} {min_major} or newer is needed for this server; found only "
                          f"{', '.join(seen)}. Install postgresql-client-{min_major} or set PG_BIN_DIR")
    raise ToolMissing(f"{name} not found (looked in PG_BIN_DIR, {PG_LIB_ROOT}/*/bin and PATH); "
                      f"install the PostgreSQL client tools (e.g. apt-get install postgresql-client) or set PG_BIN_DIR")


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
