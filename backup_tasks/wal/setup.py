"""Setting up the WAL archive directory, and ``check``: is the server archiving correctly, right now?

``prepare_archive`` creates the archive so that root (worker, CLI, prune) and the server's OS user
(archive_command, restore_command) can both use it: the directory belongs to the server user and
its group, mode ``2770`` (setgid, so every file and directory below inherits that group); files
are ``0640``. Every directory above it must let that user through: when the archive sits inside
``BACKUP_DIR`` (the default), ``BACKUP_DIR`` is given to the server user's group with mode ``0710``
(enter, not list; the backups in it stay ``0600`` root).

``check_archiving`` asks the server for its archive settings, forces a segment switch and waits for
that segment to arrive in the archive, then checks it decompresses to what was archived. It judges
by that outcome: an archive_command in another form than the printed one (``BACKUP_DIR=...
backup-tasks wal-push %p``, a wrapper) that delivers the segment is a warning naming the canonical
line; the form is a problem only when the segment does not arrive (or the switch cannot be tried).
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from backup_tasks.errors import BackupError, ConfigError, IdentityUnusable, WalArchiveError
from backup_tasks.postgres.archiver import archiver_stats
from backup_tasks.postgres.cluster import SERVER_USER, server_uid_gid
from backup_tasks.postgres.connect import connect
from backup_tasks.postgres.failures import first_line
from backup_tasks.postgres.servercmd import (
    archive_command,
    installed_command,
    restore_command,
    runnable_by_server,
    server_can_reach,
)
from backup_tasks.settings import Settings
from backup_tasks.storage.files import PRIVATE_MODES
from backup_tasks.wal.archive import WalArchive
from backup_tasks.wal.layout import COPY_SUBDIR, DIR_MODE

log = logging.getLogger(__name__)


DEFAULT_ARCHIVE_TIMEOUT = "60s"


def prepare_archive(settings: Settings) -> tuple[WalArchive, list[str]]:
    """Create (or repair the modes of) the archive directory; return it and notes on what was changed.

    A local ``BACKUP_COPY_TO`` gets the same treatment for ``<BACKUP_COPY_TO>/wal``: wal-push runs as
    the server user and writes every segment there too.
    """
    root = settings.wal_archive
    notes: list[str] = []
    backup_dir = Path(settings.backup_dir).absolute() if "://" not in settings.backup_dir else None
    _prepare_wal_dir(root, backup_dir, notes, "WAL_ARCHIVE_DIR", "the WAL archive")
    if settings.copy_to and "://" not in settings.copy_to:
        copy_dir = Path(settings.copy_to).expanduser().absolute()
        _prepare_wal_dir(copy_dir / COPY_SUBDIR, copy_dir, notes, "BACKUP_COPY_TO", "the WAL archive's copy")
    return WalArchive.for_settings(settings, root), notes


def _prepare_wal_dir(root: Path, backup_dir: Path | None, notes: list[str], setting: str, what: str) -> None:
    """``root`` owned by the server user and its group, mode 2770, reachable by that user through ``backup_dir``."""
    inside_backup_dir = backup_dir is not None and backup_dir in root.parents
    try:
        if inside_backup_dir and backup_dir is not None and not backup_dir.exists():
            backup_dir.mkdir(parents=True, mode=PRIVATE_MODES.directory)
        if not root.exists():
            root.mkdir(parents=True, mode=PRIVATE_MODES.directory)  # 2770 below, once it is the server user's
            notes.append(f"created {what} directory {root}")  # ``what`` brings its article: "the WAL archive"
        ids = server_uid_gid()
        if ids is not None:
            current = root.stat()
            if (current.st_uid, current.st_gid) != ids:
                os.chown(root, *ids)
            if stat.S_IMODE(current.st_mode) != DIR_MODE:
                os.chmod(root, DIR_MODE)
    except OSError as exc:
        raise WalArchiveError(f"cannot prepare {what} directory {root}: {exc.strerror}") from None
    if ids is not None and not server_can_reach(root, write=True):
        blocked = _first_blocked(root)
        if blocked is not None and blocked == backup_dir and blocked.stat().st_uid == os.geteuid():
            os.chown(blocked, -1, ids[1])
            os.chmod(blocked, (stat.S_IMODE(blocked.stat().st_mode) & 0o700) | 0o010)
            notes.append(f"gave {blocked} to group {SERVER_USER!r} with mode 0710 so that the {SERVER_USER} user "
                         f"can reach the archive inside it (the backups there stay 0600)")
        if not server_can_reach(root, write=True):
            where = f"{blocked} (mode {stat.S_IMODE(blocked.stat().st_mode):04o})" if blocked else str(root)
            example = "/var/lib/backup-tasks/wal" if setting == "WAL_ARCHIVE_DIR" else "/var/lib/backup-tasks-copy"
            raise ConfigError(f"the {SERVER_USER} OS user cannot write {what} {root}: it cannot get past "
                              f"{where}. Choose a {setting} it can reach (e.g. {example}) or "
                              f"let it through (chmod o+x on that directory)")


def _first_blocked(path: Path) -> Path | None:
    for ancestor in [*reversed(path.parents), path]:
        if not server_can_reach(ancestor):
            return ancestor
    return None


def postgresql_conf_lines(settings: Settings, command: list[str] | None = None,
                          archive_timeout: str = DEFAULT_ARCHIVE_TIMEOUT) -> list[str]:
    """The exact lines for the server's postgresql.conf (archive_mode needs a restart)."""
    command = command or installed_command()
    push = archive_command(command, settings.wal_archive, settings.copy_to, settings.encrypt_recipients,
                           settings.object_lock)
    return ["wal_level = replica",
            "archive_mode = on",
            f"archive_command = '{_conf_escape(push)}'",
            f"archive_timeout = {archive_timeout}"
            "    # RPO: a quiet server still ships its newest WAL at least this often"]


def _conf_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "''")


@dataclass
class ArchiveCheck:
    ok: bool
    archive_dir: str
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    server: str | None = None
    settings: dict[str, str] = field(default_factory=dict)
    archiver: dict[str, Any] = field(default_factory=dict)
    segment: str | None = None
    arrived: bool = False
    waited_seconds: float | None = None
    command_runnable_by_server: bool | None = None
    postgresql_conf: list[str] = field(default_factory=list)
    restore_command: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_archiving(settings: Settings, *, timeout: float = 60.0) -> ArchiveCheck:
    """Everything that must hold for archiving to work, checked for real (segment switch included)."""
    command = installed_command()
    report = ArchiveCheck(ok=False, archive_dir=str(settings.wal_archive),
                          postgresql_conf=postgresql_conf_lines(settings, command),
                          restore_command=restore_command(command, settings.wal_archive,
                                                          settings.copy_to, settings.decrypt_identity_file))
    archive: WalArchive | None = None
    try:
        archive, report.notes = prepare_archive(settings)
    except BackupError as exc:
        report.problems.append(str(exc))
    report.command_runnable_by_server = runnable_by_server(command)
    conninfo = settings.source()
    report.server = conninfo.server_label
    try:
        with connect(conninfo) as conn:
            _check_server(conn, settings, report, archive, timeout)
    except psycopg.Error as exc:
        report.problems.append(f"querying the server failed: {first_line(str(exc))}")
    if not report.command_runnable_by_server:
        # What the server runs is judged by whether its segment arrived; this install only matters to it
        # when its archive_command names it (or names nothing yet). A wrapper or a copy of the tool that
        # the server user can run archives fine: then only the printed lines below are unusable as they are.
        unusable = f"the {SERVER_USER} OS user cannot run {command[0]}"
        remedy = "install backup-tasks where it can (e.g. /usr/bin/python3 -m venv /opt/backup-tasks; see the README)"
        if command[0] in report.settings.get("archive_command", command[0]) or not report.arrived:
            report.problems.append(f"{unusable}; {remedy}")
        else:
            report.warnings.append(f"{unusable}, so the archive_command and restore_command printed here would "
                                   f"fail as they are (the server's own archive_command works); {remedy}")
    report.ok = not report.problems
    return report


def _check_server(conn: psycopg.Connection, settings: Settings, report: ArchiveCheck, archive: WalArchive | None,
                  timeout: float) -> None:
    names = ("wal_level", "archive_mode", "archive_command", "archive_timeout", "archive_library")
    for name in names:
        row = conn.execute("SELECT current_setting(%s, true)", (name,)).fetchone()
        report.settings[name] = "" if row is None or row[0] is None else str(row[0])
    if report.settings["wal_level"] == "minimal":
        report.problems.append("wal_level is minimal: set wal_level = replica (needs a restart)")
    if report.settings["archive_mode"] not in ("on", "always"):
        report.problems.append("archive_mode is off: set archive_mode = on (needs a restart)")
    command = report.settings["archive_command"]
    if report.settings.get("archive_library"):
        report.problems.append(f"archive_library is set ({report.settings['archive_library']}); archive_command "
                               f"is ignored while it is: clear archive_library")
    # Another form than the printed one (``BACKUP_DIR=... backup-tasks wal-push %p``, a wrapper script) may
    # work perfectly: judged after the forced switch below, by whether the segment arrives.
    other_form = "wal-push" not in command or str(settings.wal_archive) not in command
    lock = settings.object_lock
    if lock is not None and settings.copy_to and settings.copy_to.startswith("s3://") and "wal-push" in command \
            and not all(f"{name}=" in command for name in lock.environment()):
        report.problems.append(f"BACKUP_OBJECT_LOCK_DAYS is set but archive_command does not pass it to wal-push: "
                               f"the WAL copy in {settings.copy_to} would be refused; the line with it is printed "
                               f"below")
    if report.settings["archive_timeout"] in ("0", "0s", ""):
        report.warnings.append("archive_timeout is 0: on a quiet server the newest WAL can stay unarchived "
                               f"indefinitely (unbounded RPO); set archive_timeout = {DEFAULT_ARCHIVE_TIMEOUT}")
    report.archiver = archiver_stats(conn)
    worked = _force_segment(conn, report, archive, timeout)
    if other_form:
        canonical = next((line for line in report.postgresql_conf if line.startswith("archive_command")),
                         "archive_command = <see postgresql_conf>")
        if worked:
            report.warnings.append(f"archive_command is {command!r}, not the form backup-tasks prints; segment "
                                   f"{report.segment} arrived through it and read back, so archiving works, but "
                                   f"the canonical line is: {canonical}")
        else:  # not arrived, or not tried: now the command's form is a likely cause worth naming
            report.problems.append(f"archive_command does not push to {settings.wal_archive} with backup-tasks "
                                   f"wal-push (it is {command or 'empty'!r}); use: {canonical}")


def _force_segment(conn: psycopg.Connection, report: ArchiveCheck, archive: WalArchive | None,
                   timeout: float) -> bool:
    """Force a segment switch, wait for that segment in the archive and read it back; True when all that worked."""
    if report.problems and report.settings["archive_mode"] not in ("on", "always"):
        return False
    if archive is None:
        return False
    if conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
        report.warnings.append("the server is a standby: cannot force a segment switch here")
        return False
    started = time.time()
    try:
        conn.execute("SELECT txid_current()")  # a commit record, so the switch below always completes a segment
        segment = str(conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0])
    except psycopg.Error as exc:
        report.problems.append(f"could not force a WAL segment switch: {first_line(str(exc))} (needs superuser "
                               f"or GRANT EXECUTE ON FUNCTION pg_switch_wal)")
        return False
    report.segment = segment
    deadline = time.monotonic() + timeout
    while not archive.exists(segment) and time.monotonic() < deadline:
        time.sleep(0.1)
    report.waited_seconds = round(time.time() - started, 3)
    report.arrived = archive.exists(segment)
    if not report.arrived:
        stats = archiver_stats(conn)
        report.archiver = stats
        failing = bool(stats.get("failing"))
        detail = (f"; the server reports archive_command failing for {stats['last_failed_wal']} at "
                  f"{stats['last_failed_time']} (see the server log)" if failing else "")
        report.problems.append(f"segment {segment} did not arrive in {archive.root} within {timeout:.0f}s{detail}")
        return False
    read_back = True
    try:
        for _chunk in archive.verified_chunks(segment, hashlib.sha256()):
            pass
    except IdentityUnusable as exc:
        if archive.identity_file is None:  # a machine with only the public key: it cannot read WAL back
            report.notes.append(f"segment {segment} arrived encrypted; not read back (no "
                                f"BACKUP_DECRYPT_IDENTITY_FILE here)")
        else:
            read_back = False
            report.problems.append(f"segment {segment} arrived but cannot be decrypted: {exc}")
    except BackupError as exc:
        read_back = False
        report.problems.append(f"segment {segment} arrived but does not read back: {exc}")
    report.archiver = archiver_stats(conn)
    return read_back
