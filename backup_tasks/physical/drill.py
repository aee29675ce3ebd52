"""The PITR drill: restore to a random moment in the covered range and prove the copy opens there.

The moment is drawn from the ranges of the snapshots planning may use (a snapshot whose latest
verification failed is skipped, as ``restore-pitr`` skips it), on any timeline; the plan then picks the
timeline as ``restore-pitr`` would. The copy must have reached the moment: not stopped short of it
(``recovery.recovery_problems``), and with no transaction replayed after it.

Its rows are counted as recovery leaves them: unlogged tables (empty after any physical recovery) are
named in ``unlogged_tables`` and not counted, as ``verify --snapshot`` leaves them out.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg

from backup_tasks.clock import isoformat, utcnow
from backup_tasks.errors import BackupError, BackupNotFound, ObjectMissing, RestoreFailed, StorageError
from backup_tasks.physical.chain import chain_problem
from backup_tasks.physical.plan import (
    RecoveryTarget,
    failed_verification,
    plan_restore,
)
from backup_tasks.physical.ranges import random_moment, restorable_ranges
from backup_tasks.physical.recovery import recovery_problems
from backup_tasks.physical.verify import (
    local_restore_failure,
    record_result,
    restored_cluster,
)
from backup_tasks.postgres.connect import connect
from backup_tasks.postgres.failures import first_line
from backup_tasks.postgres.queries import count_rows, unlogged_tables
from backup_tasks.settings import Settings
from backup_tasks.wal.setup import prepare_archive

log = logging.getLogger(__name__)


@dataclass
class DrillResult:
    ok: bool
    snapshot_id: str | None
    target_time: str | None
    duration_seconds: float
    reached: dict[str, Any] = field(default_factory=dict)
    tables: int = 0
    rows: int = 0
    problems: list[str] = field(default_factory=list)
    unlogged_tables: list[str] = field(default_factory=list)  # not counted: no physical recovery brings rows back
    drilled_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pitr_drill(settings: Settings, *, seed: int | None = None, target: datetime | None = None) -> DrillResult:
    """Restore to a random moment in the covered range into a throwaway cluster and prove it opens there."""
    storage = settings.locations()
    archive, _notes = prepare_archive(settings)
    every = restorable_ranges(storage, archive)
    known = {r.snapshot.id: r.snapshot for r in every}
    # Neither a failed snapshot nor an incremental whose chain is broken: planning would skip them too.
    ranges = [r for r in every if not failed_verification(r.snapshot) and not chain_problem(r.snapshot, known)]
    moment = target or random_moment(ranges, random.Random(seed))
    if moment is None:
        raise BackupNotFound("nothing to drill: no snapshot with archived WAL after it that did not fail its latest "
                             "verification (take a snapshot, and check that archiving works with "
                             "`backup-tasks check`)")
    started = time.monotonic()
    plan = plan_restore(settings, RecoveryTarget("time", time=moment), storage=storage, archive=archive)
    result = DrillResult(ok=False, snapshot_id=plan.snapshot.id, target_time=moment.isoformat(),
                         duration_seconds=0.0, drilled_at=isoformat(utcnow()))
    try:
        with restored_cluster(settings, storage, archive, plan.snapshot, plan) as restored:
            with connect(restored.conninfo) as conn:
                last, lsn = conn.execute("SELECT pg_last_xact_replay_timestamp(), pg_last_wal_replay_lsn()").fetchone()
                counts = count_rows(conn, recovered=True)
                result.unlogged_tables = unlogged_tables(conn)
            result.reached = {"stop_reason": restored.outcome.stop_reason,
                              "last_transaction_at": last.isoformat() if last else None,
                              "lsn": str(lsn) if lsn else None, "timeline": plan.timeline,
                              "to_end_of_archive": plan.to_end_of_archive}
            result.tables, result.rows = len(counts), sum(counts.values())
            result.problems += recovery_problems(plan, restored.outcome, reached_lsn=str(lsn) if lsn else None,
                                                 last_commit=last.astimezone(UTC) if last else None)
    except ObjectMissing as exc:  # a stored object of the snapshot is gone: that is a verdict on the backup
        result.problems.append(first_line(str(exc)))
    except StorageError:
        # This machine (a full disk where it unpacks, permission denied) or a storage that did not answer
        # failed, not the backup: raised, never recorded as a failed drill.
        raise
    except RestoreFailed as exc:
        local = local_restore_failure(exc, plan.snapshot)
        if local is not None:
            raise local from exc
        result.problems.append(first_line(str(exc)))
    except (BackupError, psycopg.Error) as exc:
        result.problems.append(first_line(str(exc)))
    except Exception as exc:  # a bug of ours still ends in a recorded result of one line, not a traceback
        log.info("the drill from %s failed", plan.snapshot.id, exc_info=True)
        result.problems.append(f"the drill failed: {type(exc).__name__}: {first_line(str(exc))}")
    result.ok = not result.problems
    result.duration_seconds = round(time.monotonic() - started, 3)
    try:
        record_result(storage, plan.snapshot.id, drill=result.to_dict())
    except BackupError as exc:
        log.warning("could not record the drill in %s: %s", plan.snapshot.id, exc)
    return result
