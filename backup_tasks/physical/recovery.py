"""Running recovery: the settings that make a data directory recover, and judging how it ended.

``write_recovery_config`` appends ``restore_command`` (through ``wal-fetch``), the target, its
timeline (the plan's: ``physical.plan``) and ``recovery.signal``; a restored copy never archives into
the production archive unless asked. ``wait_for_recovery`` judges the outcome from the server log and
pg_controldata, without a connection.

``recovery_problems`` compares the point reached with the target (restore-pitr, the drill and
``verify --snapshot`` all ask it). PostgreSQL itself refuses to promote short of a time or restore
point target it was given, but not when it was given none: a restore to the latest point, or to a
time with no commit after it in the archive, ends wherever ``restore_command`` first answers "not
archived". So when the log names no stop at the target, the point reached (the replay LSN, or "redo
done at" in the log) must lie in the newest segment the plan saw on the target's path; and nothing
replayed may be later than a time target.
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from backup_tasks.clock import parse_moment, utcnow
from backup_tasks.errors import (
    ConfigError,
    RestoreFailed,
)
from backup_tasks.physical.plan import (
    RestorePlan,
)
from backup_tasks.physical.ranges import format_moment
from backup_tasks.postgres.cluster import as_server_user
from backup_tasks.postgres.controldata import controldata_state, postmaster_running
from backup_tasks.postgres.failures import first_line
from backup_tasks.postgres.servercmd import conf_quote, restore_command, server_command
from backup_tasks.settings import Settings
from backup_tasks.wal.archive import WalArchive
from backup_tasks.wal.command import restore_command_for
from backup_tasks.wal.names import parse_lsn, segment_name, segment_number
from backup_tasks.wal.timelines import timeline_for

ACTIONS = ("promote", "pause", "shutdown")


TOOL_DIR = ".backup-tasks-tool"  # portable wal-fetch inside the archive, for installs postgres cannot run


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


def wal_fetch_command(settings: Settings, archive: WalArchive, *, tool_dir: Path | None = None) -> str:
    """restore_command for a server run by the server user: this install, else a portable copy in the archive.

    An archive that is no directory here (a bucket alone: disaster recovery, read as of ``--as-of``) is read
    with ``--archive-url``; the portable copy (with boto3) then goes to ``tool_dir``, a directory the
    server user can reach beside what is being restored; without one, this installation must be
    runnable by the server user (a clear error otherwise).
    """
    if archive.root is None:
        return restore_command_for(server_command(tool_dir), archive.location, settings.decrypt_identity_file,
                                   as_of=settings.as_of)
    command = server_command(archive.root / TOOL_DIR)
    return restore_command(command, archive.root, settings.copy_to, settings.decrypt_identity_file)


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


def recovery_problems(plan: RestorePlan, outcome: RecoveryOutcome, *, reached_lsn: str | None = None,
                      last_commit: datetime | None = None) -> list[str]:
    """What is wrong with the point recovery reached for ``plan``: stopped short of it, or went past it.

    ``reached_lsn``: ``pg_last_wal_replay_lsn()`` (the end of the last record replayed), when the caller
    could connect; else the start of that record from the log ("redo done at"). ``last_commit``: the
    last replayed commit's time (``pg_last_xact_replay_timestamp()``), else the log's.
    """
    target, problems = plan.target, []
    last = last_commit or _log_time(outcome.last_transaction_at)
    if target.kind == "time" and target.time is not None and last is not None and last > target.time:
        problems.append(f"recovery replayed a transaction committed at {format_moment(last)}, after the target "
                        f"{format_moment(target.time)}")
    stopped_at_target = outcome.stop_reason is not None and (
        "recovery_target_time" in plan.recovery_settings() or "recovery_target_name" in plan.recovery_settings())
    if stopped_at_target:
        return problems  # replay is sequential: PostgreSQL passed everything before the target to stop there
    short = _short_of_end(plan, outcome, reached_lsn)
    return problems + ([short] if short else [])


def _short_of_end(plan: RestorePlan, outcome: RecoveryOutcome, reached_lsn: str | None) -> str | None:
    """Why recovery ended before the newest segment the plan saw on its path; None when it did not."""
    size, end = int(plan.snapshot.wal_segment_size or 0), plan.range.coverage.end_segment
    if not size or end is None:
        return None  # nothing archived after the snapshot: it recovers from its own WAL
    if reached_lsn:
        reached, last_byte = reached_lsn, max(parse_lsn(reached_lsn) - 1, 0)
    elif outcome.redo_done_at:
        reached, last_byte = outcome.redo_done_at, parse_lsn(outcome.redo_done_at)
    else:
        return (f"could not tell how far recovery went for {plan.target.describe()} (no replay position, and no "
                f"\"redo done at\" in the server log): do not rely on this copy until its point is checked")
    segno = last_byte // size
    if segno >= segment_number(end, size):
        return None
    missing = segment_name(timeline_for(plan.range.steps, segno + 1), segno + 1, size)
    since = f", last transaction {outcome.last_transaction_at}" if outcome.last_transaction_at else ""
    return (f"recovery stopped SHORT of {plan.target.describe()}: it replayed WAL up to {reached} (segment "
            f"{segment_name(timeline_for(plan.range.steps, segno), segno, size)}{since}), but the archive held WAL "
            f"up to segment {end} on timeline {plan.timeline} ({format_moment(plan.range.restorable_until)}) when "
            f"the restore was planned: segment {missing} could not be fetched. Everything after that point is "
            f"missing from this copy: do not use it. Make segment {missing} readable again (put it back into the "
            f"WAL archive, or let BACKUP_COPY_TO answer) and run again (restore-pitr into an empty directory), or "
            f"choose a --target-time before the point reached")


def _log_time(text: str | None) -> datetime | None:
    return parse_moment(text, UTC) if text else None


def start_server(bin_dir: Path, data_dir: Path, port: int, log_file: Path) -> None:
    options = f"-p {port} -c listen_addresses=127.0.0.1 -c lc_messages=C"
    result = subprocess.run([*as_server_user(), str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-l", str(log_file),
                             "-W", "-o", options, "start"], capture_output=True, text=True, check=False, cwd="/")
    if result.returncode != 0:
        raise RestoreFailed(f"could not start the restored server: {first_line(result.stderr or result.stdout)}")
