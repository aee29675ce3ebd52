"""Throwaway PostgreSQL clusters built from the local server binaries.

Used to verify backups without touching production, for the demo and for tests. A cluster
lives in a fresh temporary directory, listens only on 127.0.0.1 at a free port (no Unix socket:
one under TMPDIR could pass the 107-byte limit on its path), runs with durability switched off for
speed, and is stopped and deleted when the ``with`` block ends, on errors and Ctrl-C included.
PostgreSQL refuses to run as root, so when we are root the server runs as the ``postgres`` OS user
via ``runuser``.

A run killed outright (SIGKILL, OOM) cleans up nothing, and its postmaster, in a session of its own,
survives it. So the directory is an ``owned_tempdir`` (its name and an ``owner.pid`` file say which
process made it), and every start first sweeps its parent directory: clusters whose owner is dead
are stopped (immediate shutdown) and deleted (``leftovers.sweep``; why nothing better is possible
is said there).

``TemplateCache`` (opt-in, ``template_cache=``; verify uses it) keeps the output of one initdb and
copies it for the next cluster instead of running initdb again. On the 2-core ext4 test machine the
copy (~960 files, 39 MB, every byte hashed) takes 0.25-0.5 s against initdb's ~0.45 s: creating the
files dominates both, so the gain there is small; with less contended disks or reflinks it grows.
See its docstring for how it stays safe with concurrent users and damaged entries.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

from backup_tasks.conninfo import ConnInfo
from backup_tasks.errors import ClusterError
from backup_tasks.postgres.leftovers import owned_tempdir, process_alive, sweep
from backup_tasks.postgres.template import TemplateCache, TemplateError
from backup_tasks.postgres.tools import BinDirs, data_dir_major, find_tool, tool_for_data_dir

log = logging.getLogger(__name__)


SERVER_USER = "postgres"


DIR_PREFIX = "backup-tasks-cluster-"


#: Settings for a disposable server: nothing must survive a crash, everything should be fast.
FAST_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "wal_level": "minimal",
    "max_wal_senders": "0",
    "archive_mode": "off",
    "max_wal_size": "8GB",
    "checkpoint_timeout": "1h",
    "maintenance_work_mem": "512MB",
    "shared_buffers": "256MB",
    "autovacuum": "off",
    "listen_addresses": "127.0.0.1",
    "max_connections": "30",
    "logging_collector": "off",
    "unix_socket_directories": "''",  # none (the shell pg_ctl runs makes '' empty): TCP on 127.0.0.1 only
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def as_server_user() -> list[str]:
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    if runuser is None:
        raise ClusterError("running as root needs `runuser` to start PostgreSQL as the postgres user")
    return [runuser, "-u", SERVER_USER, "--"]


def server_uid_gid() -> tuple[int, int] | None:
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(SERVER_USER)
    except KeyError:
        raise ClusterError(f"running as root, but there is no {SERVER_USER!r} OS user to run PostgreSQL as; "
                           f"create it or run as an ordinary user") from None
    return entry.pw_uid, entry.pw_gid


class ThrowawayCluster:
    """``with ThrowawayCluster() as cluster: cluster.conninfo("postgres")``."""

    def __init__(self, *, min_major: int = 0, exact_major: int | None = None, bin_dir: BinDirs = None,
                 settings: dict[str, str] | None = None, parent_dir: Path | None = None,
                 initdb_args: tuple[str, ...] = (), prepare: Callable[[Path], None] | None = None,
                 template_cache: Path | None = None) -> None:
        """The binaries: the newest no older than ``min_major``, or exactly ``exact_major`` (``find_tool``),
        from ``bin_dir`` (one directory or several) and the usual places.

        ``prepare``, when given, fills the (not yet existing) data directory instead of initdb, e.g. by
        unpacking a base backup; the tree is then handed to the server user, and the server is the major
        its PG_VERSION names (another major's pg_ctl refuses it, or worse). ``template_cache``, when
        given (and no ``prepare``), copies a cached initdb output instead of running initdb (``TemplateCache``);
        a missing or bad entry means initdb as usual, never a failed start."""
        self.exact_major = exact_major
        self.search = bin_dir
        self.initdb = find_tool("initdb", min_major=min_major, exact_major=exact_major, bin_dir=bin_dir)
        self.bin_dir = self.initdb.path.parent
        self.pg_ctl = self.bin_dir / "pg_ctl"
        self.major = self.initdb.major
        self.settings = {**FAST_SETTINGS, **(settings or {})}
        self.parent_dir = parent_dir
        self.initdb_args = initdb_args
        self.prepare = prepare
        # --pwfile & co. name files whose content the cache key cannot see: such clusters run initdb.
        cacheable = not any(arg.startswith("--pwfile") for arg in initdb_args)
        self.template_cache = TemplateCache(template_cache) if template_cache is not None and cacheable else None
        self.from_template: str | None = None  # the cache key the data directory was copied from
        self.port = 0
        self.root: Path | None = None
        self.started = False

    @property
    def data_dir(self) -> Path:
        assert self.root is not None
        return self.root / "data"

    def conninfo(self, dbname: str = "postgres") -> ConnInfo:
        return ConnInfo(host="127.0.0.1", port=self.port, dbname=dbname, user=SERVER_USER)

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SERVER_USER}@127.0.0.1:{self.port}/{dbname}"

    def _run(self, argv: list[str], what: str, timeout: float = 300) -> None:
        try:
            result = subprocess.run(as_server_user() + argv, capture_output=True, text=True, timeout=timeout,
                                    cwd=self.root, check=False)
        except subprocess.TimeoutExpired:
            raise ClusterError(f"{what} timed out after {timeout:.0f}s") from None
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()[-5:]
            raise ClusterError(f"{what} failed: {' | '.join(detail)}")

    def start(self) -> ThrowawayCluster:
        parent = self.parent_dir or Path(tempfile.gettempdir())
        sweep(parent, DIR_PREFIX)  # the clusters of runs that were killed: stopped and deleted
        self.root = owned_tempdir(DIR_PREFIX, parent)
        try:
            self._create(parent)
            try:
                return self._start_server()
            except ClusterError as exc:
                if self.from_template is None or self.template_cache is None:
                    raise
                # A template that copies cleanly but will not start is bad all the same: drop it, initdb.
                log.warning("throwaway cluster from the cached initdb template failed (%s): running initdb", exc)
                self.template_cache.discard(self.from_template)
                self.from_template = None
                self.stop()
                shutil.rmtree(self.data_dir)
                (self.root / "server.log").unlink(missing_ok=True)
                self._initdb()
                return self._start_server()
        except BaseException:
            # A failed start (initdb error, pg_ctl timeout, Ctrl-C) leaves no server and no directory.
            self.cleanup()
            raise

    def _start_server(self) -> ThrowawayCluster:
        for _attempt in range(5):
            self.port = free_port()
            try:
                self._run(self._start_argv(), "starting the throwaway PostgreSQL")
                self.started = True
                log.info("throwaway cluster up on 127.0.0.1:%d (%s)", self.port, self.root)
                return self
            except ClusterError as exc:
                log_text = self.server_log()
                if "could not bind" in log_text or "already in use" in log_text:
                    continue  # lost the race for the port: try another
                raise ClusterError(f"{exc}; server log: {log_text[-500:]}") from None
        raise ClusterError("could not find a free port for the throwaway cluster")

    def _create(self, parent: Path) -> None:
        ids = server_uid_gid()
        if ids is not None:
            os.chown(self.root, *ids)
            # One process start for both questions: can the server user write here, and run our binaries?
            probe = subprocess.run([*as_server_user(), "sh", "-c", 'test -w "$1" || exit 3; test -x "$2" || exit 4',
                                    "sh", str(self.root), str(self.bin_dir / "postgres")], check=False)
            if probe.returncode == 4:
                raise ClusterError(self._unreachable_binaries())
            if probe.returncode != 0:
                raise ClusterError(f"the {SERVER_USER} user cannot reach {parent}; set TMPDIR to a directory "
                                   f"it can traverse (for example /tmp)")
        if self.prepare is not None:
            self.prepare(self.data_dir)
            self._match_data_dir()
            self._hand_over(ids)
        elif not self._from_template(ids):
            self._initdb()

    def _initdb_options(self) -> list[str]:
        return ["-U", SERVER_USER, "-A", "trust", "-E", "UTF8", "--no-sync", "--no-instructions", *self.initdb_args]

    def _initdb(self) -> None:
        self._run([str(self.initdb.path), "-D", str(self.data_dir), *self._initdb_options()], "initdb")
        if self.template_cache is not None and self.template_cache.usable_root():
            # Before the first start: the entry is initdb's output, never a server's leftovers.
            self.template_cache.store(self.template_cache.key(self.initdb.path, self._initdb_options()),
                                      self.data_dir)

    def _from_template(self, ids: tuple[int, int] | None) -> bool:
        """Fill the data directory from the template cache; False (nothing left behind) when it cannot."""
        cache = self.template_cache
        if cache is None or not cache.usable_root():
            return False
        key = cache.key(self.initdb.path, self._initdb_options())
        try:
            cache.fill(key, self.data_dir)
        except TemplateError as exc:
            if str(exc) != "no entry":
                log.warning("cached initdb template %s is unusable (%s): running initdb", key, exc)
                cache.discard(key)
            shutil.rmtree(self.data_dir, ignore_errors=True)
            return False
        self._hand_over(ids)
        self.from_template = key
        log.debug("data directory copied from the initdb template %s", key)
        return True

    def _match_data_dir(self) -> None:
        """Run a prepared data directory with the binaries of the major that made it."""
        major = data_dir_major(self.data_dir)
        if major == self.major:
            return
        if self.exact_major is not None:
            raise ClusterError(f"the data directory was made by PostgreSQL {major}, but PostgreSQL "
                               f"{self.exact_major} was asked for")
        pg_ctl = tool_for_data_dir("pg_ctl", self.data_dir, bin_dir=self.search)
        log.info("data directory of PostgreSQL %d: using %s", major, pg_ctl.path.parent)
        self.bin_dir, self.pg_ctl, self.major = pg_ctl.path.parent, pg_ctl.path, major
        if os.geteuid() == 0 and subprocess.run([*as_server_user(), "test", "-x", str(self.bin_dir / "postgres")],
                                                check=False).returncode != 0:
            raise ClusterError(self._unreachable_binaries())

    def _unreachable_binaries(self) -> str:
        return (f"the {SERVER_USER} user cannot run {self.bin_dir / 'postgres'} (it must read and traverse every "
                f"directory above it: an installation under /root or a 0700 checkout is out of its reach); copy "
                f"that installation somewhere it can read, e.g. /opt or /var/cache, and point PG_BIN_DIR there")

    def _hand_over(self, ids: tuple[int, int] | None) -> None:
        """Give a data directory we filled ourselves to the server user, with initdb's 0700."""
        if ids is not None:
            for path in [self.data_dir, *self.data_dir.rglob("*")]:
                os.lchown(path, *ids)
        os.chmod(self.data_dir, 0o700)

    def _start_argv(self) -> list[str]:
        options = " ".join(f"-c {k}={v}" for k, v in self.settings.items())
        return [str(self.pg_ctl), "-D", str(self.data_dir), "-l", str(self.root / "server.log"),
                "-w", "-t", "120", "-o", f"-p {self.port} {options}", "start"]

    def restart(self) -> None:
        """Stop (fast shutdown) and start again on the same port: picks up edited configuration files."""
        with self.stopped():
            pass

    @contextmanager
    def stopped(self) -> Iterator[Path]:
        """The server shut down cleanly while the block runs (its data directory at rest, e.g. to be copied), then
        started again on the same port, whatever the block raised."""
        self._run([str(self.pg_ctl), "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "120", "stop"],
                  "stopping the throwaway PostgreSQL")
        self.started = False
        try:
            yield self.data_dir
        finally:
            self._run(self._start_argv(), "restarting the throwaway PostgreSQL")
            self.started = True

    def server_log(self) -> str:
        try:
            return (self.root / "server.log").read_text(errors="replace") if self.root else ""
        except OSError:
            return ""

    def stop(self) -> None:
        # Judge by postmaster.pid, not by our flag: a start that timed out may still have a server.
        if self.root is not None and (self.started or (self.data_dir / "postmaster.pid").exists()):
            if self._quick_stop():
                self.started = False
                return
            try:
                self._run([str(self.pg_ctl), "-D", str(self.data_dir), "-m", "immediate", "-w", "stop"],
                          "stopping the throwaway PostgreSQL", timeout=60)
            except ClusterError as exc:
                log.warning("%s; killing it", exc)
                self._kill_postmaster()
            self.started = False

    def _quick_stop(self, timeout: float = 30.0) -> bool:
        """What ``pg_ctl stop -m immediate`` does (SIGQUIT), without its 100 ms polling; False: use pg_ctl.

        The postmaster exits only after all its children, so once it is gone the directory is free.
        """
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().splitlines()[0])
            if pid <= 0:  # a single-user backend writes -pid; and never signal a process group
                return False
            os.kill(pid, signal.SIGQUIT)
        except (OSError, ValueError, IndexError):
            return False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not process_alive(pid):
                return True
            time.sleep(0.005)
        return False

    def _kill_postmaster(self) -> None:
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().splitlines()[0])
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass

    def cleanup(self) -> None:
        # Ctrl-C during cleanup must not leave a server behind: finish the job, then re-raise.
        interrupted: BaseException | None = None
        for step in (self.stop, self._remove):
            try:
                step()
            except KeyboardInterrupt as exc:
                interrupted = exc
                step()
        if interrupted is not None:
            raise interrupted

    def _remove(self) -> None:
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def __enter__(self) -> ThrowawayCluster:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.cleanup()
