"""``restore-pitr``: a snapshot restored into an empty data directory, configured to recover to a target.

Refuses a non-empty directory and an uncovered target before touching anything; unpacks (an incremental
snapshot: its whole chain, combined in place: ``physical.chain``, ``physical.combine``), writes the
recovery settings (the target's timeline included: ``physical.plan``) and, with ``start``, runs the
server until recovery is over and reports where it stopped. A recovery that stopped short of the target
(``recovery.recovery_problems``) is a failure: the report says what is missing, and the server is
stopped so that nothing goes on writing into a copy that is not the state asked for.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from backup_tasks.errors import (
    ConfigError,
    RestoreRefused,
)
from backup_tasks.physical.chain import describe_chain, resolve_chain, restore_chain, scratch_beside
from backup_tasks.physical.plan import (
    RecoveryTarget,
    plan_restore,
)
from backup_tasks.physical.ranges import describe_ranges, restorable_ranges
from backup_tasks.physical.recovery import (
    ACTIONS,
    TOOL_DIR,
    RecoveryOutcome,
    explain_failure,
    recovery_problems,
    start_server,
    wait_for_recovery,
    wal_fetch_command,
    write_recovery_config,
)
from backup_tasks.physical.unpack import (
    check_empty_target,
    empty_directory,
    restore_config_files,
    snapshot_identities,
    unpack_with_fallback,
)
from backup_tasks.postgres.cluster import SERVER_USER, as_server_user, free_port, server_uid_gid
from backup_tasks.postgres.servercmd import server_can_reach
from backup_tasks.postgres.tools import tool_for_data_dir
from backup_tasks.settings import Settings
from backup_tasks.wal.prefetch import clear_spools
from backup_tasks.wal.remote import archive_for_reading

log = logging.getLogger(__name__)

RESTORE_LOG = "backup-tasks-restore.log"


@dataclass
class RestoreReport:
    ok: bool
    data_dir: str
    snapshot_id: str
    target: str
    recovery_settings: dict[str, str]
    available: str
    timeline: int | None = None  # the recovery target timeline
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    skipped_snapshots: list[dict[str, str]] = field(default_factory=list)  # {backup_id, reason}: failed verify
    #: The snapshots restored, root first: ``[snapshot_id]`` for a full, the whole chain for an incremental.
    chain: list[str] = field(default_factory=list)
    started: bool = False
    port: int | None = None
    log_file: str | None = None
    outcome: RecoveryOutcome | None = None
    duration_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def restore_pitr(settings: Settings, target: RecoveryTarget, data_dir: Path, *, start: bool = False,
                 port: int | None = None, action: str = "promote", keep_archiving: bool = False,
                 timeout: float = 6 * 3600, snapshot_id: str | None = None) -> RestoreReport:
    began = time.monotonic()
    data_dir = data_dir.absolute()
    check_empty_target(data_dir)
    if action not in ACTIONS:
        raise ConfigError(f"--target-action must be one of {', '.join(ACTIONS)}")
    storage = settings.locations()
    archive = archive_for_reading(settings)  # the bucket's wal/ when BACKUP_DIR is one
    plan = plan_restore(settings, target, storage=storage, archive=archive, snapshot_id=snapshot_id)
    for warning in plan.warnings:  # on stderr now: the unpack of a failed snapshot may fail before the report
        log.warning("%s", warning)
    ids = server_uid_gid()
    if ids is not None and start and not server_can_reach(data_dir.parent):
        raise RestoreRefused(f"the {SERVER_USER} OS user cannot reach {data_dir.parent}; choose a data directory it "
                             f"can get to (the restored server runs as {SERVER_USER}; nothing was changed)")
    restore_cmd = wal_fetch_command(settings, archive, tool_dir=data_dir.parent / TOOL_DIR)
    chain = resolve_chain(storage, plan.snapshot)  # [snapshot] for a full; a missing ancestor is named
    # Before the data directory is touched: every member's identity is proven to open it.
    identities = {member.id: snapshot_identities(settings, storage, member) for member in chain}
    created = not data_dir.exists()
    scratch: Path | None = None
    try:
        notes = list(plan.notes)
        if len(chain) == 1:
            unpack_with_fallback(storage, plan.snapshot, data_dir, identities[plan.snapshot.id])
        else:
            scratch = scratch_beside(data_dir)  # on the target's filesystem: whole files move in with a rename
            combined = restore_chain(settings, storage, chain, data_dir, identities, scratch=scratch)
            notes.append(f"combined {describe_chain(plan.snapshot)} in place ({combined.blocks_written} blocks "
                         f"written, {combined.reconstructed} relation files reconstructed; checked by "
                         f"pg_combinebackup --dry-run)")
        notes += restore_config_files(storage, plan.snapshot, data_dir, identities[plan.snapshot.id])
        values = write_recovery_config(data_dir, restore_cmd=restore_cmd, plan=plan, action=action,
                                       keep_archiving=keep_archiving)
        if ids is not None:
            for path in [data_dir, *data_dir.rglob("*")]:
                os.lchown(path, *ids)
        os.chmod(data_dir, 0o700)
    except BaseException:
        empty_directory(data_dir, remove=created)
        raise
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)  # the data directory's links keep what it needs
    report = RestoreReport(ok=True, data_dir=str(data_dir), snapshot_id=plan.snapshot.id,
                           chain=[member.id for member in chain],
                           target=plan.target.describe(), recovery_settings=values,
                           available=describe_ranges(restorable_ranges(storage, archive)), timeline=plan.timeline,
                           notes=notes, warnings=plan.warnings,
                           skipped_snapshots=[asdict(s) for s in plan.skipped])
    if start:
        # The restored directory's own major (PG_VERSION), never "the newest": 18's pg_ctl refuses a 15 directory.
        bin_dir = tool_for_data_dir("pg_ctl", data_dir, bin_dir=settings.pg_bin_dir).path.parent
        report.port = port or free_port()
        report.log_file = str(data_dir / RESTORE_LOG)
        start_server(bin_dir, data_dir, report.port, Path(report.log_file))
        report.started = True
        report.outcome = wait_for_recovery(bin_dir, data_dir, Path(report.log_file), action=action, timeout=timeout)
        clear_spools(data_dir / "pg_wal")  # wal-fetch's read-ahead, left when recovery stopped before the end
        report.ok = report.outcome.finished and not report.outcome.errors
        if not report.ok:
            report.notes.append(explain_failure(report.outcome))
        else:
            problems = recovery_problems(plan, report.outcome)
            if problems:
                report.ok = False
                report.notes += problems
                report.notes.append(_stop_short_copy(bin_dir, data_dir))
    report.duration_seconds = round(time.monotonic() - began, 3)
    return report


def _stop_short_copy(bin_dir: Path, data_dir: Path) -> str:
    """Stop a server that recovered to the wrong point, so nothing connects to it believing it is the target."""
    result = subprocess.run([*as_server_user(), str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-m", "fast", "-w",
                             "stop"], capture_output=True, text=True, check=False, cwd="/")
    if result.returncode != 0:
        return f"the restored server is STILL RUNNING (stopping it failed): stop it with pg_ctl -D {data_dir} stop"
    return (f"the restored server was stopped; {data_dir} holds the copy as recovered, for inspection only "
            f"(remove it before restoring there again)")
