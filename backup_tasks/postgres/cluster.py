"""Throwaway PostgreSQL clusters built from the local server binaries.

Used to verify backups without touching production, for the demo and for tests. A cluster
lives in a fresh temporary directory, listens only on 127.0.0.1 at a free port (and a private
socket directory), runs with durability switched off for speed, and is stopped and deleted when
the ``with`` block ends, on errors and Ctrl-C included. PostgreSQL refuses to run as root, so
when we are root the server runs as the ``postgres`` OS user via ``runuser``.

``TemplateCache`` (opt-in, ``template_cache=``; verify uses it) keeps the output of one initdb and
copies it for the next cluster instead of running initdb again. On the 2-core ext4 test machine the
copy (~960 files, 39 MB, every byte hashed) takes 0.25-0.5 s against initdb's ~0.45 s: creating the
files dominates both, so the gain there is small; with less contended disks or reflinks it grows.
See its docstring for how it stays safe with concurrent users and damaged entries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from backup_tasks.conninfo import ConnInfo
from backup_tasks.errors import ClusterError
from backup_tasks.postgres.tools import find_tool

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


#: Where ``default_template_cache`` puts the initdb template cache; "off" disables it.
TEMPLATE_CACHE_ENV = "BACKUP_TASKS_INITDB_CACHE"
#: Environment that changes what initdb writes (locale, encoding defaults, timezone): part of the key.
INITDB_ENV = ("LANG", "LANGUAGE", "LC_ALL", "LC_COLLATE", "LC_CTYPE", "LC_MESSAGES", "LC_MONETARY",
              "LC_NUMERIC", "LC_TIME", "TZ", "PGTZ")
#: Bumped when the layout of an entry changes, so old entries are simply never looked up again.
TEMPLATE_FORMAT = 1
MANIFEST_NAME = "template.json"
HASH_CHUNK = 1 << 20


def default_template_cache() -> Path | None:
    """``$BACKUP_TASKS_INITDB_CACHE``, or a per-user directory under TMPDIR; None when set to "off"."""
    value = os.environ.get(TEMPLATE_CACHE_ENV, "").strip()
    if value.lower() in ("off", "0", "no", "false", "none"):
        return None
    return Path(value) if value else Path(tempfile.gettempdir()) / f"backup-tasks-initdb-cache-{os.geteuid()}"


class TemplateError(Exception):
    """A cache entry that cannot be used (missing, partial, damaged): the caller runs initdb instead."""


class TemplateCache:
    """Fresh initdb output, kept once per (binaries, initdb options, environment) and copied per cluster.

    Layout: ``root/<key>/data`` (the data directory as initdb left it, never started) and
    ``root/<key>/template.json`` (every directory and file with its mode, size and sha256).

    * An entry is built in a private ``root/.build-<random>`` and published with one ``rename``: a
      reader sees a complete entry or none (a crashed build leaves only a ``.build-`` directory,
      removed by a later build once it is an hour old). Two verifies that miss at once both build;
      the second ``rename`` fails and that build is thrown away.
    * A reader copies file by file, hashing what it reads; any difference from ``template.json``
      (a truncated, edited or missing file, an extra one) or any error makes the copy fail with
      ``TemplateError``. The cluster then runs initdb as before and replaces the entry: renamed
      aside first (atomic, so a concurrent reader's copy fails cleanly and falls back too), then
      deleted. An entry is never modified in place.
    * The root must be a real directory owned by us and closed to group and others, or it is not
      used: a template is the system catalog of every verify's server.

    The key covers the binaries (path, size, mtime: a package upgrade changes them), the initdb
    options and the environment initdb reads (locale, timezone), not files the options name.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def key(self, initdb: Path, argv: list[str]) -> str:
        postgres = initdb.parent / "postgres"
        facts = {"format": TEMPLATE_FORMAT, "initdb": str(initdb.resolve()), "argv": argv, "euid": os.geteuid(),
                 "binaries": [_file_fingerprint(initdb), _file_fingerprint(postgres)],
                 "env": {name: os.environ.get(name) for name in INITDB_ENV}}
        return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:24]

    def usable_root(self) -> bool:
        """Create the root (0700) when missing; refuse one that anybody else could have planted or edit."""
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = os.lstat(self.root)
        except OSError as exc:
            log.warning("initdb template cache %s unusable (%s): running initdb", self.root, exc)
            return False
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
            log.warning("initdb template cache %s is not a private directory of ours: not using it", self.root)
            return False
        return True

    def fill(self, key: str, dest: Path) -> None:
        """Copy entry ``key`` into ``dest`` (must not exist), checking every byte; ``TemplateError`` otherwise."""
        entry = self.root / key
        try:
            manifest = json.loads((entry / MANIFEST_NAME).read_text())
            dirs: dict[str, int] = manifest["dirs"]
            files: dict[str, list] = manifest["files"]
        except FileNotFoundError:
            # A directory without its manifest is a partial entry (a copy someone made by hand, a
            # disk that lost the file): it must go, or no build could ever publish under its name.
            raise TemplateError("partial entry: no manifest" if entry.exists() else "no entry") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise TemplateError(f"unreadable manifest: {exc}") from None
        source = entry / "data"
        try:
            seen = _walk(source)
            if seen != (set(dirs), set(files)):
                raise TemplateError("the entry's files differ from its manifest")
            for rel in sorted(dirs, key=len):  # parents first
                os.mkdir(dest / rel if rel else dest, dirs[rel])
            for rel, (mode, size, digest) in files.items():
                if _copy_hashed(source / rel, dest / rel, mode) != (size, digest):
                    raise TemplateError(f"{rel} differs from the manifest")
        except OSError as exc:  # e.g. the entry renamed aside by a concurrent reader mid-copy
            raise TemplateError(str(exc)) from None

    def store(self, key: str, data_dir: Path) -> None:
        """Publish a copy of ``data_dir`` (fresh initdb output, never started) as entry ``key``."""
        self._remove_stale_builds()
        build = self.root / f".build-{uuid.uuid4().hex}"
        published = False
        try:
            os.mkdir(build, 0o700)
            dirs, files = _walk(data_dir)
            manifest: dict[str, dict] = {"dirs": {}, "files": {}}
            for rel in sorted(dirs, key=len):
                mode = stat.S_IMODE(os.lstat(data_dir / rel).st_mode)
                os.mkdir(build / "data" / rel if rel else build / "data", mode)
                manifest["dirs"][rel] = mode
            for rel in files:
                mode = stat.S_IMODE(os.lstat(data_dir / rel).st_mode)
                size, digest = _copy_hashed(data_dir / rel, build / "data" / rel, mode)
                manifest["files"][rel] = [mode, size, digest]
            (build / MANIFEST_NAME).write_text(json.dumps(manifest))
            os.rename(build, self.root / key)  # atomic; fails when a concurrent build published first
            published = True
        except OSError as exc:
            log.debug("initdb template not stored: %s", exc)
        finally:
            if not published:
                shutil.rmtree(build, ignore_errors=True)

    def discard(self, key: str) -> None:
        """Take a bad entry out of use: rename it aside (atomic), then delete it."""
        aside = self.root / f".bad-{uuid.uuid4().hex}"
        try:
            os.rename(self.root / key, aside)
        except OSError:
            return  # already gone (another reader discarded it)
        shutil.rmtree(aside, ignore_errors=True)

    def _remove_stale_builds(self) -> None:
        try:
            for path in self.root.iterdir():
                if path.name.startswith((".build-", ".bad-")) and time.time() - path.lstat().st_mtime > 3600:
                    shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def _process_alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie waiting for a parent that is not us counts as gone)."""
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except ProcessLookupError:
        return False
    except (OSError, IndexError):
        return True  # no /proc (not Linux), or unreadable: os.kill said it exists


def _file_fingerprint(path: Path) -> list[object]:
    try:
        info = path.stat()
    except OSError:
        return [str(path), None]
    return [str(path), info.st_size, info.st_mtime_ns]


def _walk(root: Path) -> tuple[set[str], set[str]]:
    """Relative directories ("" is the root) and regular files under ``root``; anything else is an error."""
    dirs, files = {""}, set()
    for top, subdirs, names in os.walk(root, onerror=_raise):
        rel_top = os.path.relpath(top, root)
        for name in [*subdirs, *names]:
            path = os.path.join(top, name)
            rel = name if rel_top == "." else os.path.join(rel_top, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISDIR(mode):
                dirs.add(rel)
            elif stat.S_ISREG(mode):
                files.add(rel)
            else:  # a symlink (initdb -X) or stranger: not something we copy faithfully
                raise OSError(f"{rel} is not a regular file or directory")
    return dirs, files


def _raise(exc: OSError) -> None:
    raise exc


def _copy_hashed(source: Path, dest: Path, mode: int) -> tuple[int, str]:
    """Copy one file (dest created exclusively, with ``mode``); return the size and sha256 of what was read."""
    digest = hashlib.sha256()
    size = 0
    with open(source, "rb") as src, open(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as out:
        while chunk := src.read(HASH_CHUNK):
            digest.update(chunk)
            out.write(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


class ThrowawayCluster:
    """``with ThrowawayCluster() as cluster: cluster.conninfo("postgres")``."""

    def __init__(self, *, min_major: int = 0, bin_dir: Path | None = None,
                 settings: dict[str, str] | None = None, parent_dir: Path | None = None,
                 initdb_args: tuple[str, ...] = (), prepare: Callable[[Path], None] | None = None,
                 template_cache: Path | None = None) -> None:
        """``prepare``, when given, fills the (not yet existing) data directory instead of initdb, e.g. by
        unpacking a base backup; the tree is then handed to the server user. ``template_cache``, when
        given (and no ``prepare``), copies a cached initdb output instead of running initdb (``TemplateCache``);
        a missing or bad entry means initdb as usual, never a failed start."""
        self.initdb = find_tool("initdb", min_major=min_major, bin_dir=bin_dir)
        self.bin_dir = self.initdb.path.parent
        self.pg_ctl = self.bin_dir / "pg_ctl"
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

    @property
    def socket_dir(self) -> Path:
        assert self.root is not None
        return self.root / "sock"

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
        self.root = Path(tempfile.mkdtemp(prefix=DIR_PREFIX, dir=parent))
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
        self.socket_dir.mkdir()
        if ids is not None:
            for path in (self.root, self.socket_dir):
                os.chown(path, *ids)
            probe = subprocess.run([*as_server_user(), "test", "-w", str(self.root)], check=False)
            if probe.returncode != 0:
                raise ClusterError(f"the {SERVER_USER} user cannot reach {parent}; set TMPDIR to a directory "
                                   f"it can traverse (for example /tmp)")
        if self.prepare is not None:
            self.prepare(self.data_dir)
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

    def _hand_over(self, ids: tuple[int, int] | None) -> None:
        """Give a data directory we filled ourselves to the server user, with initdb's 0700."""
        if ids is not None:
            for path in [self.data_dir, *self.data_dir.rglob("*")]:
                os.lchown(path, *ids)
        os.chmod(self.data_dir, 0o700)

    def _start_argv(self) -> list[str]:
        options = " ".join(f"-c {k}={v}" for k, v in self.settings.items())
        return [str(self.pg_ctl), "-D", str(self.data_dir), "-l", str(self.root / "server.log"),
                "-w", "-t", "120", "-o", f"-p {self.port} -k {self.socket_dir} {options}", "start"]

    def restart(self) -> None:
        """Stop (fast shutdown) and start again on the same port: picks up edited configuration files."""
        self._run([str(self.pg_ctl), "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "120", "stop"],
                  "stopping the throwaway PostgreSQL")
        self.started = False
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
            if not _process_alive(pid):
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
