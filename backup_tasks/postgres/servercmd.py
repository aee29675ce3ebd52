"""The ``backup-tasks`` command as PostgreSQL's OS user runs it: archive_command and restore_command.

``archive_command`` and ``restore_command`` run as the server's user (``postgres``), not as whoever
runs the worker or the CLI. They must name an executable that user can run, with the archive
location embedded (the server's environment has none of our settings). When this installation is
not runnable by that user (a virtualenv under ``/root``), ``portable_tool`` builds a
self-contained copy (the package, what wal-push and wal-fetch import: zstandard, pyrage, boto3, and a
wrapper pinned to the real interpreter) in a
directory the server user can read: that is what throwaway restores use, and what a user can
install under ``/usr/local`` (see the README).
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from importlib.metadata import Distribution, PackageNotFoundError, distribution
from pathlib import Path

from backup_tasks.errors import ConfigError
from backup_tasks.postgres.cluster import SERVER_USER, as_server_user
from backup_tasks.storage.objectlock import ObjectLock


def installed_command() -> list[str]:
    """This installation's ``backup-tasks`` as an absolute command line."""
    script = Path(sys.executable).parent / "backup-tasks"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script.absolute())]
    return [str(Path(sys.executable).absolute()), "-m", "backup_tasks"]


def runnable_by_server(command: list[str]) -> bool:
    """Whether the server's OS user can run ``command --version`` (always true when we are not root)."""
    if os.geteuid() != 0:
        return True
    try:
        probe = subprocess.run([*as_server_user(), *command, "--version"], capture_output=True, timeout=60,
                               check=False, cwd="/")
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def server_can_reach(path: Path, *, write: bool = False) -> bool:
    """Whether the server's OS user can traverse to (and, with ``write``, write in) ``path``."""
    if os.geteuid() != 0:
        return os.access(path, os.W_OK | os.X_OK if write else os.X_OK)
    test = ["test", "-w", str(path), "-a", "-x", str(path)] if write else ["test", "-x", str(path)]
    try:
        return subprocess.run([*as_server_user(), *test], capture_output=True, timeout=30,
                              check=False, cwd="/").returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


#: What the server-side commands (wal-push, wal-fetch) import beyond the standard library: zstandard
#: always, pyrage for an encrypted archive, boto3 (with what it requires) for a copy in a bucket or a
#: restore from the bucket alone.
SERVER_SIDE_DISTRIBUTIONS = ("zstandard", "pyrage", "boto3")


def _requirement_closure(names: tuple[str, ...]) -> list[Distribution]:
    """The installed distributions ``names`` and everything they require (extras aside), each once."""
    found: dict[str, Distribution] = {}
    pending = list(names)
    while pending:
        name = pending.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in found:
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue  # optional here (an install without pyrage), or a requirement for another Python
        found[key] = dist
        for requirement in dist.requires or ():
            if "extra ==" not in requirement:
                pending.append(re.split(r"[\s;<>=!~\[(]", requirement.strip(), maxsplit=1)[0])
    return list(found.values())


def _copy_distribution(dist: Distribution, lib: Path) -> None:
    """The files ``dist`` installed into site-packages, hard-linked into ``lib`` where the filesystem allows."""
    site = Path(str(dist.locate_file(""))).resolve()
    for entry in dist.files or ():
        source = Path(str(dist.locate_file(entry))).resolve()
        if site not in source.parents or "__pycache__" in source.parts or not source.is_file():
            continue  # console scripts in bin/, byte code: the wrapper needs neither
        target = lib / source.relative_to(site)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            continue
        try:
            os.link(source, target)  # same inode, same 0644: cheap, and readable as the original is
        except OSError:
            shutil.copy2(source, target)


def portable_tool(destination: Path, distributions: tuple[str, ...] = SERVER_SIDE_DISTRIBUTIONS) -> list[str]:
    """Copy this package and ``distributions`` (with their requirements) into ``destination``, with a wrapper.

    By default what the server-side commands import; ``("backup-tasks",)`` copies every runtime
    dependency, for running any command as the server user.

    The wrapper runs the real interpreter behind this virtualenv (``-I -S``: isolated, no site import,
    so it starts fast and ignores the caller's environment). Raises ``ConfigError`` when even that
    interpreter is out of the server user's reach.
    """
    interpreter = Path(os.path.realpath(sys.executable))
    closure = _requirement_closure(distributions)
    # One lib directory per set of versions: an upgraded install gets a fresh one, never old files mixed
    # with new, and a server still recovering with the previous wrapper keeps what it runs.
    versions = sorted(f"{d.metadata['Name']}=={d.version}" for d in closure)
    lib = destination / f"lib-{hashlib.sha256(' '.join(versions).encode()).hexdigest()[:12]}"
    package = Path(__file__).resolve().parents[1]  # backup_tasks/, this file being postgres/servercmd.py
    shutil.copytree(package, lib / "backup_tasks", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                    dirs_exist_ok=True)
    for dist in closure:
        _copy_distribution(dist, lib)
    wrapper = destination / "backup-tasks"
    wrapper.write_text(f"#!{interpreter} -IS\n"
                       f"import sys\nsys.path.insert(0, {str(lib)!r})\n"
                       f"from backup_tasks.entry import main\nsys.exit(main())\n")
    for path in (destination, *destination.rglob("*")):
        if path.is_dir() or path == wrapper:
            os.chmod(path, 0o755)
        elif not path.stat().st_nlink > 1:
            os.chmod(path, 0o644)  # a hard link shares the original's inode and mode: leave it as installed
    command = [str(wrapper)]
    if not runnable_by_server(command):
        raise ConfigError(f"the {SERVER_USER} OS user cannot run {interpreter} (the interpreter behind "
                          f"{sys.executable}); install backup-tasks in a virtualenv made from a system Python, "
                          f"e.g. /usr/bin/python3 -m venv /opt/backup-tasks")
    return command


def server_command(workdir: Path | None = None) -> list[str]:
    """A ``backup-tasks`` command the server user can run: this installation, else a portable copy in ``workdir``."""
    command = installed_command()
    if runnable_by_server(command):
        return command
    if workdir is None:
        raise ConfigError(f"the {SERVER_USER} OS user cannot run {command[0]} (is it under a directory only root "
                          f"can enter, such as /root?); install backup-tasks where that user can run it, "
                          f"e.g. /usr/bin/python3 -m venv /opt/backup-tasks && /opt/backup-tasks/bin/pip install .")
    return portable_tool(workdir)


def _option_args(copy_to: str | None, recipients: tuple[str, ...] = (), identity_file: object = None) -> list[str]:
    args = ["--copy-to", shlex.quote(copy_to)] if copy_to else []
    if recipients:
        args += ["--encrypt-to", shlex.quote(",".join(recipients))]
    if identity_file:
        args += ["--identity-file", shlex.quote(str(identity_file))]
    return args


def archive_command(command: list[str], archive_dir: Path, copy_to: str | None = None,
                    recipients: tuple[str, ...] = (), lock: ObjectLock | None = None) -> str:
    """The ``archive_command`` value: self-contained, absolute, quoted for the shell PostgreSQL uses.

    With ``copy_to`` (BACKUP_COPY_TO) every segment also goes to ``<copy_to>/wal``; the server's OS
    user then needs credentials for it (for a bucket: the standard AWS variables or ~/.aws of that user).
    With ``recipients`` (BACKUP_ENCRYPT_RECIPIENT, public keys only) every segment is age-encrypted.
    With ``lock`` (BACKUP_OBJECT_LOCK_DAYS/_MODE) and a bucket copy, the line starts with those two
    variables: the server's environment has none of ours, and an unlocked WAL copy in a locked bucket
    would be refused.
    """
    assignments = [f"{name}={shlex.quote(value)}" for name, value in lock.environment().items()] \
        if lock is not None and copy_to and copy_to.startswith("s3://") else []
    return " ".join([*assignments, *map(shlex.quote, command), "wal-push", "--archive-dir",
                     shlex.quote(str(archive_dir)), *_option_args(copy_to, recipients), "%p"])


def restore_command(command: list[str], archive_dir: Path, copy_to: str | None = None,
                    identity_file: object = None) -> str:
    """``restore_command``; with an encrypted archive the server's OS user must be able to read ``identity_file``."""
    return " ".join([*map(shlex.quote, command), "wal-fetch", "--archive-dir", shlex.quote(str(archive_dir)),
                     *_option_args(copy_to, identity_file=identity_file), "%f", "%p"])


def conf_quote(value: str) -> str:
    """A value for postgresql.conf: single-quoted, quotes doubled."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"
