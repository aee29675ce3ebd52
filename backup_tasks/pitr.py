"""Point-in-time recovery: choose a snapshot, unpack it, configure recovery, optionally run it.

``restore_pitr`` is the user's ``restore-pitr``: it refuses a non-empty data directory and a target
outside what the snapshots and the WAL archive cover (saying what is covered), unpacks the right
snapshot while checking every byte against the catalog, writes ``restore_command`` (through
``wal-fetch``), the recovery target and ``recovery.signal``, and with ``start`` runs the server
until recovery is over and reports where it stopped. A restored copy never archives into the
production archive unless asked to (``archive_mode = off``).

The same pieces serve the snapshot verification and the PITR drill (``snapshot_verify.py``).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

import psycopg

from . import manifest as catalog
from .cluster import SERVER_USER, _as_server_user, free_port, server_uid_gid
from .codec import CHUNK
from .crypto import Identities, check_identity, manifest_recipients, open_decrypted
from .errors import (
    BackupCorrupt,
    BackupError,
    BackupNotFound,
    ConfigError,
    IdentityUnusable,
    RestoreFailed,
    RestoreRefused,
    StorageError,
    TargetOutOfRange,
    WalArchiveError,
)
from .locations import members, open_locations
from .manifest import Manifest, utcnow
from .pg import connect, find_tool, first_line
from .restore import identities_for
from .servercmd import conf_quote, restore_command, server_can_reach, server_command
from .settings import Settings
from .snapshot import is_restorable, snapshot_files
from .storage import Storage
from .wal import WalArchive, position, segment_number, timeline_of
from .walcoverage import Coverage, RestorePoint, coverage, restore_points, save_restore_point

log = logging.getLogger(__name__)

ACTIONS = ("promote", "pause", "shutdown")
RESTORE_LOG = "backup-tasks-restore.log"
TOOL_DIR = ".backup-tasks-tool"  # portable wal-fetch inside the archive, for installs postgres cannot run
MAX_WALDUMP_SEGMENTS = 256


# --- targets --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RecoveryTarget:
    kind: str  # "latest", "time" or "name"
    time: datetime | None = None  # aware
    name: str | None = None
    given: str | None = None  # as the user wrote it

    def describe(self) -> str:
        if self.kind == "time" and self.time is not None:
            return f"time {self.time.isoformat()}"
        if self.kind == "name":
            return f"restore point {self.name!r}"
        return "the latest archived point"


_ZONE_WORDS = re.compile(r"\s*(?:UTC|GMT|Z)$", re.IGNORECASE)


def parse_target_time(text: str, settings: Settings) -> datetime:
    """Any timestamp PostgreSQL accepts (``now()``'s output included); no zone means ``BACKUP_TIMEZONE``."""
    raw = text.strip()
    candidate = _ZONE_WORDS.sub("+00:00", raw) if _ZONE_WORDS.search(raw) else raw
    try:
        moment = datetime.fromisoformat(candidate)
    except ValueError:
        moment = _parse_with_server(raw, settings)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=settings.tz)
    return moment.astimezone(UTC)


def _parse_with_server(raw: str, settings: Settings) -> datetime:
    """Let PostgreSQL itself read forms Python does not know ("Nov 27 2026 3:29pm IST"...)."""
    if settings.database_url:
        try:
            with connect(settings.source()) as conn:
                conn.execute("SELECT set_config('TimeZone', %s, false)", (settings.timezone,))
                value = conn.execute("SELECT %s::timestamptz", (raw,)).fetchone()[0]
                return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
        except psycopg.Error as exc:
            raise ConfigError(f"--target-time {raw!r} is not a timestamp PostgreSQL accepts: "
                              f"{first_line(str(exc))}") from None
        except BackupError:
            pass
    raise ConfigError(f"--target-time {raw!r} is not a timestamp I can read; write it like "
                      f"2026-11-23 15:29:59+05:30 (no zone: {settings.timezone})")


# --- planning -------------------------------------------------------------------------------------

@dataclass
class SnapshotRange:
    snapshot: Manifest
    coverage: Coverage
    restorable_from: datetime
    restorable_until: datetime

    def describe(self) -> str:
        gap = f" (WAL segment {self.coverage.gap} is missing after that)" if self.coverage.gap else ""
        return f"{_fmt(self.restorable_from)} to {_fmt(self.restorable_until)} from snapshot {self.snapshot.id}{gap}"


@dataclass
class RestorePlan:
    snapshot: Manifest
    target: RecoveryTarget
    range: SnapshotRange
    #: True when nothing committed between the target time and the end of the archive: recovering to the
    #: end gives exactly the state at the target (PostgreSQL would refuse a time target it never passes).
    to_end_of_archive: bool = False
    restore_point: RestorePoint | None = None
    notes: list[str] = field(default_factory=list)

    def recovery_settings(self) -> dict[str, str]:
        if self.target.kind == "time" and not self.to_end_of_archive and self.target.time is not None:
            return {"recovery_target_time": self.target.time.astimezone(UTC).isoformat(sep=" ")}
        if self.target.kind == "name" and self.target.name is not None:
            return {"recovery_target_name": self.target.name}
        return {}


def _fmt(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(sep=" ", timespec="microseconds")


def snapshot_ranges(storage: Storage, archive: WalArchive) -> list[SnapshotRange]:
    """What every complete snapshot can restore to, given the archive as it is now (oldest first)."""
    names = archive.segment_names() if archive.root.is_dir() else []
    ranges = []
    for snap in catalog.catalog(storage, kind="snapshot"):
        if not is_restorable(snap) or not snap.wal_segment_size or not snap.restorable_from:
            continue
        cov = coverage(archive, str(snap.start_segment), snap.wal_segment_size, names)
        start = datetime.fromisoformat(snap.restorable_from)
        until = start
        if cov.covered_until is not None and cov.end_segment is not None and snap.stop_segment and \
                position(cov.end_segment) >= position(str(snap.stop_segment)):
            until = max(start, cov.covered_until)
        ranges.append(SnapshotRange(snap, cov, start, until))
    return ranges


def describe_ranges(ranges: list[SnapshotRange]) -> str:
    if not ranges:
        return "nothing: there is no complete snapshot"
    return "; ".join(r.describe() for r in ranges)


def plan_restore(settings: Settings, target: RecoveryTarget, *, storage: Storage | None = None,
                 archive: WalArchive | None = None) -> RestorePlan:
    storage = storage or open_locations(settings.backup_dir, settings.copy_to)
    archive = archive or WalArchive.for_settings(settings)
    ranges = snapshot_ranges(storage, archive)
    if not ranges:
        raise BackupNotFound(f"no complete snapshot in {storage.location}; take one with `backup-tasks snapshot`")
    available = describe_ranges(ranges)
    if target.kind == "latest":
        chosen = ranges[-1]
        if chosen.coverage.gap:
            raise RestoreFailed(
                f"WAL segment {chosen.coverage.gap} is missing from the archive {archive.root} although later "
                f"segments are there: recovery to the latest point would silently stop at "
                f"{_fmt(chosen.restorable_until)}. Put the segment back, or restore to a --target-time up to that "
                f"moment. Available: {available}")
        return RestorePlan(chosen.snapshot, target, chosen)
    if target.kind == "time":
        assert target.time is not None
        fitting = [r for r in ranges if r.restorable_from <= target.time <= r.restorable_until]
        if not fitting:
            raise TargetOutOfRange(f"cannot restore to {_fmt(target.time)}: the snapshots and the WAL archive cover "
                                   f"{available}")
        chosen = fitting[-1]  # the newest snapshot: least WAL to replay
        plan = RestorePlan(chosen.snapshot, target, chosen)
        plan.to_end_of_archive = not _commit_after(settings, archive, chosen, target.time)
        if plan.to_end_of_archive:
            plan.notes.append(f"no transaction committed between {_fmt(target.time)} and the end of the archived WAL: "
                              f"recovering to the end of the archive gives the state at the target")
        return plan
    points = [p for p in restore_points(archive) if p.name == target.name]
    for point in reversed(points):
        for candidate in reversed(ranges):
            snap, cov = candidate.snapshot, candidate.coverage
            if snap.stop_segment and position(str(snap.stop_segment)) <= position(point.segment) and \
                    cov.end_segment and position(cov.end_segment) >= position(point.segment):
                return RestorePlan(snap, target, candidate, restore_point=point)
    if points:
        raise TargetOutOfRange(f"restore point {target.name!r} (WAL {points[-1].lsn}, "
                               f"{points[-1].created_at}) is not covered by any snapshot and the archive; "
                               f"available: {available}")
    chosen = ranges[-1]
    plan = RestorePlan(chosen.snapshot, target, chosen)
    plan.notes.append(f"restore point {target.name!r} was not created through backup-tasks: PostgreSQL stops there "
                      f"if it lies in the archived WAL after snapshot {chosen.snapshot.id}")
    return plan


def _commit_after(settings: Settings, archive: WalArchive, chosen: SnapshotRange, moment: datetime) -> bool:
    """Whether the archived WAL holds a commit (or abort) later than ``moment``, scanning back from the end."""
    cov, snap = chosen.coverage, chosen.snapshot
    if cov.end_segment is None or not snap.wal_segment_size:
        return False
    size = snap.wal_segment_size
    try:
        waldump = find_tool("pg_waldump", min_major=int(snap.server_version.split(".")[0]), bin_dir=settings.pg_bin_dir)
    except BackupError:
        return True  # cannot tell: let PostgreSQL decide (it refuses a target it never reaches)
    segno = segment_number(cov.end_segment, size)
    first = segment_number(cov.start_segment, size)
    with tempfile.TemporaryDirectory(prefix="backup-tasks-waldump-") as scratch:
        for _ in range(MAX_WALDUMP_SEGMENTS):
            if segno < first:
                return False
            name = _archived_name(archive, segno, cov, size)
            if name is None:
                return True
            if archive.trailer(name).completed_at <= moment.timestamp():
                return False  # everything from here back was written before the target
            # Read it with the segment before: a commit record may start there and end in this one.
            previous = _archived_name(archive, segno - 1, cov, size) if segno > first else None
            names = [n for n in (previous, name) if n is not None and n[:8] == name[:8]]
            for each in names:
                archive.fetch(each, Path(scratch) / each)
            stamps = _commit_times(waldump.path, Path(scratch), names)
            for each in names:
                os.unlink(Path(scratch) / each)
            if any(stamp > moment for stamp in stamps):
                return True
            segno -= 1
    return True


def _archived_name(archive: WalArchive, segno: int, cov: Coverage, size: int) -> str | None:
    return next((n for n in _names_for(segno, cov, size) if archive.exists(n)), None)


def _names_for(segno: int, cov: Coverage, size: int) -> list[str]:
    from .wal import segment_name

    return [segment_name(t, segno, size) for t in sorted(cov.timelines, reverse=True)]


_COMMIT = re.compile(r"desc: (?:COMMIT|ABORT)(?:_PREPARED)? (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) UTC")


def _commit_times(waldump: Path, directory: Path, names: list[str]) -> list[datetime]:
    result = subprocess.run([str(waldump), "-p", str(directory), "-r", "Transaction", names[0], names[-1]],
                            capture_output=True, text=True, check=False, env={**os.environ, "TZ": "UTC"})
    return [datetime.fromisoformat(m[1]).replace(tzinfo=UTC) for m in _COMMIT.finditer(result.stdout)]


# --- unpacking ------------------------------------------------------------------------------------

def check_empty_target(data_dir: Path) -> None:
    if data_dir.exists():
        if not data_dir.is_dir():
            raise RestoreRefused(f"{data_dir} exists and is not a directory")
        if any(data_dir.iterdir()):
            raise RestoreRefused(f"{data_dir} is not empty; restore into an empty or new directory "
                                 f"(nothing was changed)")


class _HashingReader(io.RawIOBase):
    """Reads a stored object, keeping the sha256 and size of the bytes as stored (ciphertext when encrypted)."""

    def __init__(self, source: BinaryIO) -> None:
        super().__init__()
        self.source = source
        self.digest = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size)
        self.digest.update(data)
        self.size += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def drain(self) -> None:
        """Hash whatever the decryptor left unread, so the checksum always covers the whole object."""
        while self.read(CHUNK):
            pass

    def close(self) -> None:
        if not self.closed:
            self.source.close()
        super().close()


def snapshot_identities(settings: Settings, storage: Storage, snapshot: Manifest) -> Identities | None:
    """The identities for an encrypted snapshot, proven to open its base object (``IdentityUnusable`` if not).

    Called before anything is unpacked: a wrong or missing identity must not leave a half-restored directory.
    """
    identities = identities_for(settings, snapshot)
    if identities is None:
        return None
    locations = members(storage)
    for number, location in enumerate(locations):
        try:
            check_identity(location.open(snapshot.path), identities, what=f"snapshot {snapshot.id}",
                           recipients=manifest_recipients(snapshot.encryption))
            return identities
        except (BackupCorrupt, StorageError):  # a damaged or missing copy: the unpack falls back, so may we
            if number == len(locations) - 1:
                raise
    return identities


def _plaintext(source: BinaryIO, snapshot: Manifest, key: str, identities: Identities | None) -> BinaryIO:
    if not snapshot.encryption:
        return source
    if identities is None:
        source.close()
        raise IdentityUnusable(f"snapshot {snapshot.id} is encrypted; no identity was given to decrypt {key}")
    return open_decrypted(source, identities, what=f"{key} of snapshot {snapshot.id}",
                          recipients=manifest_recipients(snapshot.encryption))


def read_snapshot_object(storage: Storage, snapshot: Manifest, key: str, identities: Identities | None) -> bytes:
    """A small stored object of a snapshot (backup_manifest, config), decrypted when the snapshot is encrypted."""
    with _plaintext(storage.open(key), snapshot, key, identities) as plain:
        return plain.read()


def unpack_snapshot(storage: Storage, snapshot: Manifest, data_dir: Path, identities: Identities | None = None) -> None:
    """Unpack base and WAL tars into ``data_dir``, checking each stored object's sha256 as it streams."""
    import zstandard

    if snapshot.encryption and identities is None:
        raise IdentityUnusable(f"snapshot {snapshot.id} is encrypted; no identity was given to decrypt it")
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    files = snapshot_files(snapshot)
    order = sorted(files.items(), key=lambda kv: {"base": 0, "wal": 1}.get(kv[1].get("role", ""), 2))
    for key, info in order:
        role = info.get("role")
        if role not in ("base", "wal"):
            continue
        target = data_dir if role == "base" else data_dir / "pg_wal"
        target.mkdir(parents=True, exist_ok=True, mode=0o700)
        proc = subprocess.Popen(["tar", "-x", "--no-same-owner", "-f", "-", "-C", str(target)],
                                stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        digest = hashlib.sha256()
        size = 0
        assert proc.stdin is not None
        try:
            decompressor = zstandard.ZstdDecompressor().decompressobj()
            stored = _HashingReader(storage.open(key))
            with _plaintext(stored, snapshot, key, identities) as source:  # type: ignore[arg-type]
                while chunk := source.read(CHUNK):
                    try:
                        proc.stdin.write(decompressor.decompress(chunk))
                    except zstandard.ZstdError as exc:
                        raise BackupCorrupt(f"{key} cannot be decompressed: {exc}") from None
                stored.drain()
            digest, size = stored.digest, stored.size
            proc.stdin.close()
        except BrokenPipeError:
            pass
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        returncode = proc.wait()
        stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        if size != info["size"] or digest.hexdigest() != info["sha256"]:
            raise BackupCorrupt(f"{key} of snapshot {snapshot.id} is damaged: {size} bytes with sha256 "
                                f"{digest.hexdigest()[:16]}…, the catalog says {info['size']} bytes, "
                                f"{str(info['sha256'])[:16]}…")
        if returncode != 0:
            raise BackupCorrupt(f"{key} of snapshot {snapshot.id} does not unpack: {first_line(stderr)}")


def restore_config_files(storage: Storage, snapshot: Manifest, data_dir: Path,
                         identities: Identities | None = None) -> list[str]:
    """Put back pg_hba.conf / pg_ident.conf kept outside PGDATA, and a minimal postgresql.conf if there was none."""
    import json

    notes = []
    for key, info in snapshot_files(snapshot).items():
        if info.get("role") != "config":
            continue
        for name, text in json.loads(read_snapshot_object(storage, snapshot, key, identities)).items():
            path = data_dir / name
            if not path.exists() and name in ("pg_hba.conf", "pg_ident.conf"):
                path.write_text(text)
                notes.append(f"{name} restored from the server's copy outside its data directory")
    for name, text in (("postgresql.conf", MINIMAL_CONF), ("pg_hba.conf", MINIMAL_HBA), ("pg_ident.conf", "")):
        path = data_dir / name
        if not path.exists():
            path.write_text(text)
            notes.append(f"{name} was outside the source's data directory and not copied: wrote a minimal one")
    return notes


MINIMAL_CONF = """# Written by backup-tasks restore-pitr: the source server kept its postgresql.conf outside its data
# directory, so it is not part of the snapshot. Copy your settings here before using this copy for real.
listen_addresses = 'localhost'
"""
MINIMAL_HBA = """# Written by backup-tasks restore-pitr (the source's pg_hba.conf was not available).
local   all   all                 peer
host    all   all   127.0.0.1/32  scram-sha-256
host    all   all   ::1/128       scram-sha-256
"""


def write_recovery_config(data_dir: Path, *, restore_cmd: str, plan: RestorePlan | None, action: str = "promote",
                          keep_archiving: bool = False, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Append the recovery settings to postgresql.auto.conf (last one wins) and create recovery.signal."""
    if action not in ACTIONS:
        raise ConfigError(f"recovery target action must be one of {', '.join(ACTIONS)}, got {action!r}")
    values = {"restore_command": restore_cmd, "recovery_target_timeline": "latest"}
    if plan is not None:
        values.update(plan.recovery_settings())
    if "recovery_target_time" in values or "recovery_target_name" in values:
        values["recovery_target_action"] = action
    if not keep_archiving:
        values["archive_mode"] = "off"  # a restored copy must never write into the production archive
    values.update(extra or {})
    stamp = utcnow().isoformat(timespec="seconds")
    lines = [f"\n# Added by backup-tasks restore-pitr at {stamp}"
             + (f": snapshot {plan.snapshot.id}, target {plan.target.describe()}" if plan else "")]
    lines += [f"{key} = {conf_quote(value)}" for key, value in values.items()]
    with open(data_dir / "postgresql.auto.conf", "a") as conf:
        conf.write("\n".join(lines) + "\n")
    (data_dir / "recovery.signal").touch()
    (data_dir / "standby.signal").unlink(missing_ok=True)
    return values


def wal_fetch_command(settings: Settings, archive: WalArchive) -> str:
    """restore_command for a server run by the server user: this install, else a portable copy in the archive."""
    command = server_command(archive.root / TOOL_DIR)
    return restore_command(command, archive.root, settings.copy_to, settings.decrypt_identity_file)


# --- running recovery -----------------------------------------------------------------------------

@dataclass
class RecoveryOutcome:
    finished: bool
    state: str  # pg_controldata's cluster state
    stop_reason: str | None = None  # "recovery stopping before commit of transaction 745, time ..."
    last_transaction_at: str | None = None
    redo_done_at: str | None = None
    new_timeline: int | None = None
    consistent_at: str | None = None
    errors: list[str] = field(default_factory=list)
    log_tail: list[str] = field(default_factory=list)


_LOG_PATTERNS = {
    "stop_reason": re.compile(r"(recovery stopping (?:before|after|at) .*)$"),
    "last_transaction_at": re.compile(r"last completed transaction was at log time (.+)$"),
    "redo_done_at": re.compile(r"redo done at ([0-9A-F]+/[0-9A-F]+)"),
    "new_timeline": re.compile(r"selected new timeline ID: (\d+)"),
    "consistent_at": re.compile(r"consistent recovery state reached at ([0-9A-F]+/[0-9A-F]+)"),
}


def read_outcome(log_text: str, state: str, finished: bool) -> RecoveryOutcome:
    outcome = RecoveryOutcome(finished=finished, state=state)
    for line in log_text.splitlines():
        for attr, pattern in _LOG_PATTERNS.items():
            match = pattern.search(line)
            if match:
                value: Any = int(match[1]) if attr == "new_timeline" else match[1].strip()
                setattr(outcome, attr, value)
        if "FATAL:" in line or "PANIC:" in line:
            outcome.errors.append(line.split("FATAL:", 1)[-1].split("PANIC:", 1)[-1].strip())
    outcome.log_tail = log_text.strip().splitlines()[-15:]
    return outcome


def controldata_state(bin_dir: Path, data_dir: Path) -> str:
    result = subprocess.run([str(bin_dir / "pg_controldata"), str(data_dir)], capture_output=True, text=True,
                            check=False, env={**os.environ, "LC_ALL": "C"})
    match = re.search(r"Database cluster state:\s*(.+)", result.stdout)
    return match[1].strip() if match else "unknown"


def postmaster_running(data_dir: Path) -> bool:
    try:
        pid = int((data_dir / "postmaster.pid").read_text().splitlines()[0])
        os.kill(pid, 0)
        return True
    except (OSError, ValueError, IndexError):
        return False


def recovery_log_tail(text: str) -> str:
    """The log of the latest recovery run only (a restarted server appends to the same file)."""
    marks = [text.rfind(m) for m in ("starting point-in-time recovery", "starting archive recovery",
                                     "starting backup recovery")]
    start = max(marks)
    return text[start:] if start >= 0 else text


def wait_for_recovery(bin_dir: Path, data_dir: Path, log_file: Path, *, action: str = "promote",
                      timeout: float = 6 * 3600, poll: float = 0.3, archive_recovery: bool = True) -> RecoveryOutcome:
    """Wait until recovery is over (promoted, paused or shut down at the target) or the server died.

    Judged from the server log and pg_controldata, so it needs no connection (and no password).
    """
    began = time.monotonic()
    seen_running = False
    while True:
        text = log_file.read_text(errors="replace") if log_file.exists() else ""
        tail = recovery_log_tail(text)
        running = postmaster_running(data_dir)
        seen_running = seen_running or running
        done = "archive recovery complete" in tail or not archive_recovery
        if running and done and "ready to accept connections" in tail:
            return read_outcome(tail, controldata_state(bin_dir, data_dir), True)
        if running and action == "pause" and ("pausing at the end of recovery" in tail
                                               or "recovery has paused" in tail):
            return read_outcome(tail, controldata_state(bin_dir, data_dir), True)
        if not running and (seen_running or "FATAL:" in tail or time.monotonic() - began > 60):
            time.sleep(poll)  # let the last lines reach the log
            tail = recovery_log_tail(log_file.read_text(errors="replace") if log_file.exists() else "")
            state = controldata_state(bin_dir, data_dir)
            outcome = read_outcome(tail, state, action == "shutdown" and "shutdown at recovery target" in tail)
            if not outcome.finished and not outcome.errors:
                outcome.errors.append("the restored server stopped before recovery finished (see its log)")
            return outcome
        if time.monotonic() - began > timeout:
            outcome = read_outcome(tail, controldata_state(bin_dir, data_dir), False)
            outcome.errors.append(f"recovery did not finish within {timeout:.0f}s (it may still be running)")
            return outcome
        time.sleep(poll)


def explain_failure(outcome: RecoveryOutcome) -> str:
    text = " | ".join(outcome.errors) or "unknown error"
    if "exit code 200" in text or any("missing from the archive" in line or "is damaged" in line
                                      for line in outcome.log_tail):
        detail = next((line for line in outcome.log_tail if "backup-tasks wal-fetch" in line), "")
        return f"recovery failed: the WAL archive is damaged: {detail or text}"
    if "recovery ended before configured recovery target was reached" in text:
        return ("recovery failed: the archived WAL ends before the recovery target (the target is later than "
                "anything archived, or a restore point of that name is not in the WAL after the snapshot)")
    return f"recovery failed: {text}"


# --- the user's restore-pitr ----------------------------------------------------------------------

@dataclass
class RestoreReport:
    ok: bool
    data_dir: str
    snapshot_id: str
    target: str
    recovery_settings: dict[str, str]
    available: str
    notes: list[str] = field(default_factory=list)
    started: bool = False
    port: int | None = None
    log_file: str | None = None
    outcome: RecoveryOutcome | None = None
    duration_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def restore_pitr(settings: Settings, target: RecoveryTarget, data_dir: Path, *, start: bool = False,
                 port: int | None = None, action: str = "promote", keep_archiving: bool = False,
                 timeout: float = 6 * 3600) -> RestoreReport:
    began = time.monotonic()
    data_dir = data_dir.absolute()
    check_empty_target(data_dir)
    if action not in ACTIONS:
        raise ConfigError(f"--target-action must be one of {', '.join(ACTIONS)}")
    storage = open_locations(settings.backup_dir, settings.copy_to)
    archive = WalArchive.for_settings(settings)
    plan = plan_restore(settings, target, storage=storage, archive=archive)
    ids = server_uid_gid()
    if ids is not None and start and not server_can_reach(data_dir.parent):
        raise RestoreRefused(f"the {SERVER_USER} OS user cannot reach {data_dir.parent}; choose a data directory it "
                             f"can get to (the restored server runs as {SERVER_USER}; nothing was changed)")
    restore_cmd = wal_fetch_command(settings, archive)
    identities = snapshot_identities(settings, storage, plan.snapshot)  # before the data directory is touched
    created = not data_dir.exists()
    try:
        unpack_with_fallback(storage, plan.snapshot, data_dir, identities)
        notes = plan.notes + restore_config_files(storage, plan.snapshot, data_dir, identities)
        values = write_recovery_config(data_dir, restore_cmd=restore_cmd, plan=plan, action=action,
                                       keep_archiving=keep_archiving)
        if ids is not None:
            for path in [data_dir, *data_dir.rglob("*")]:
                os.lchown(path, *ids)
        os.chmod(data_dir, 0o700)
    except BaseException:
        _empty(data_dir, remove=created)
        raise
    report = RestoreReport(ok=True, data_dir=str(data_dir), snapshot_id=plan.snapshot.id,
                           target=plan.target.describe(), recovery_settings=values,
                           available=describe_ranges(snapshot_ranges(storage, archive)), notes=notes)
    if start:
        bin_dir = find_tool("pg_ctl", min_major=int(plan.snapshot.server_version.split(".")[0]),
                            bin_dir=settings.pg_bin_dir).path.parent
        report.port = port or free_port()
        report.log_file = str(data_dir / RESTORE_LOG)
        _start_server(bin_dir, data_dir, report.port, Path(report.log_file))
        report.started = True
        report.outcome = wait_for_recovery(bin_dir, data_dir, Path(report.log_file), action=action, timeout=timeout)
        report.ok = report.outcome.finished and not report.outcome.errors
        if not report.ok:
            report.notes.append(explain_failure(report.outcome))
    report.duration_seconds = round(time.monotonic() - began, 3)
    return report


def _start_server(bin_dir: Path, data_dir: Path, port: int, log_file: Path) -> None:
    options = f"-p {port} -c listen_addresses=127.0.0.1 -c lc_messages=C"
    result = subprocess.run([*_as_server_user(), str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-l", str(log_file),
                             "-W", "-o", options, "start"], capture_output=True, text=True, check=False, cwd="/")
    if result.returncode != 0:
        raise RestoreFailed(f"could not start the restored server: {first_line(result.stderr or result.stdout)}")


def unpack_with_fallback(storage: Storage, snapshot: Manifest, data_dir: Path,
                         identities: Identities | None = None) -> None:
    """Unpack from BACKUP_DIR; when an object is missing or damaged there, start again from BACKUP_COPY_TO."""
    locations = members(storage)
    for number, location in enumerate(locations):
        try:
            unpack_snapshot(location, snapshot, data_dir, identities)
            return
        except (BackupCorrupt, StorageError) as exc:
            if number == len(locations) - 1:
                raise
            log.warning("snapshot %s cannot be unpacked from %s (%s); starting again from %s", snapshot.id,
                        location.location, exc, locations[number + 1].location)
            _empty(data_dir, remove=False)


def _empty(data_dir: Path, *, remove: bool) -> None:
    """Undo a failed unpack: nothing half-restored stays behind."""
    if remove:
        shutil.rmtree(data_dir, ignore_errors=True)
        return
    for child in data_dir.iterdir() if data_dir.exists() else []:
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


# --- restore points -------------------------------------------------------------------------------

def create_restore_point(settings: Settings, name: str, *, trading_day: str | None = None,
                         switch_wal: bool = True) -> RestorePoint:
    """``pg_create_restore_point(name)`` on the server, recorded in the archive; the WAL is switched so the
    point reaches the archive now rather than at the next archive_timeout."""
    if not name or len(name.encode()) > 63:
        raise ConfigError(f"a restore point name must be 1 to 63 bytes long, got {name!r}")
    archive = WalArchive.for_settings(settings)
    with connect(settings.source()) as conn:
        if conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
            raise RestoreRefused("the server is a standby: create restore points on the primary")
        level = conn.execute("SELECT current_setting('wal_level')").fetchone()[0]
        if level == "minimal":
            raise ConfigError("wal_level is minimal: restore points need wal_level = replica")
        try:
            lsn = str(conn.execute("SELECT pg_create_restore_point(%s)", (name,)).fetchone()[0])
        except psycopg.Error as exc:
            raise RestoreRefused(f"pg_create_restore_point failed: {first_line(str(exc))} (needs superuser or "
                                 f"GRANT EXECUTE ON FUNCTION pg_create_restore_point)") from None
        created = utcnow()
        row = conn.execute("SELECT timeline_id FROM pg_control_checkpoint()").fetchone()
        timeline = int(row[0])
        segment = str(conn.execute("SELECT pg_walfile_name(%s::pg_lsn + 1)", (lsn,)).fetchone()[0])
        sysid = str(conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()[0])
        if switch_wal:
            conn.execute("SELECT pg_switch_wal()")
    point = RestorePoint(name=name, lsn=lsn, timeline=timeline_of(segment) or timeline, segment=segment,
                         created_at=created.isoformat(timespec="microseconds"), system_identifier=sysid,
                         trading_day=trading_day)
    try:
        archive.ensure()
        save_restore_point(archive, point)
    except (OSError, WalArchiveError) as exc:
        log.warning("restore point %s created at %s but not recorded in %s: %s", name, lsn, archive.root, exc)
    return point


def restore_point_for_day(settings: Settings, trading_day: str) -> RestorePoint | None:
    """The post-close hook's "end of trading day N" mark; None (nothing done) when the server does not archive
    WAL, i.e. point-in-time recovery is not configured."""
    with connect(settings.source()) as conn:
        mode = conn.execute("SELECT current_setting('archive_mode')").fetchone()[0]
        level = conn.execute("SELECT current_setting('wal_level')").fetchone()[0]
    if mode == "off" or level == "minimal":
        return None
    return create_restore_point(settings, restore_point_name(trading_day), trading_day=trading_day)


def restore_point_name(trading_day: str) -> str:
    """The name the post-close workflow gives the end of a trading day."""
    return f"trading-day-{trading_day}-close"


def latest_target() -> RecoveryTarget:
    return RecoveryTarget("latest")


def time_target(text: str, settings: Settings) -> RecoveryTarget:
    return RecoveryTarget("time", time=parse_target_time(text, settings), given=text)


def name_target(name: str) -> RecoveryTarget:
    return RecoveryTarget("name", name=name, given=name)


def random_moment(ranges: list[SnapshotRange], rng: Any) -> datetime | None:
    """A uniformly random moment in the union of the snapshots' ranges."""
    spans = [(r.restorable_from, r.restorable_until) for r in ranges if r.restorable_until > r.restorable_from]
    total = sum((b - a).total_seconds() for a, b in spans)
    if total <= 0:
        return None
    pick = rng.random() * total
    for begin, end in spans:
        length = (end - begin).total_seconds()
        if pick <= length:
            return begin + timedelta(seconds=pick)
        pick -= length
    return spans[-1][1]
