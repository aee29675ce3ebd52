"""Where things are: the checkout, the results, the command-line tool; temporary work directories."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = ROOT / "bench"
RESULTS_DIR = BENCH_DIR / "results"
#: The console script of the virtualenv running the bench (``make setup`` installs it).
CLI = Path(sys.executable).parent / "backup-tasks"


@contextmanager
def work_directory(prefix: str, *, parent: str | Path | None = None, mode: int = 0o755,
                   keep: bool = False) -> Iterator[Path]:
    """A fresh directory for one run, removed at the end unless ``keep``.

    ``mode``: throwaway clusters, and the archive/restore commands PostgreSQL starts, run as the
    postgres user, which must reach what they use inside it.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path.chmod(mode)
    try:
        yield path
    finally:
        if keep:
            print(f"[bench] kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)
