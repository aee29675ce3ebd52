"""``backup-tasks upgrade``: the CLI of a major upgrade without losing the way back (``physical.upgrade``).

``--begin`` against the old server before ``pg_upgrade``, ``--finish`` against the new one after it,
``--release-old`` once the new server has proven itself; the README's upgrade runbook.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

from backup_tasks.cli.output import Add, emit
from backup_tasks.settings import Settings


def cmd_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    from backup_tasks.physical import upgrade

    wait = upgrade.ARCHIVE_WAIT if args.wait is None else args.wait
    def say(text: str) -> None:
        if args.verbose:
            print(f"backup-tasks upgrade: {text}", file=sys.stderr, flush=True)

    if args.release_old:
        document = upgrade.release_old(settings)
        names = ", ".join(f"PostgreSQL {g['major']} (system {g['system_identifier']})" for g in document["released"])
        emit(args, document, f"released {names or 'nothing (already released)'}: the next prune may delete their "
                             f"last snapshots and WAL")
        return 0
    if args.begin:
        step = upgrade.begin(settings, wait=wait, take_snapshot=not args.no_snapshot, progress=say)
        head = (f"upgrade {step.upgrade_id} begun on {step.server} (PostgreSQL {step.server_version}, system "
                f"{step.system_identifier}): final snapshot {step.snapshot}, WAL archived through {step.last_segment}; "
                f"restorable up to {step.restorable_until}")
    else:
        step = upgrade.finish(settings, wait=wait, progress=say)
        head = (f"upgrade {step.upgrade_id} finished: {step.server} is PostgreSQL {step.server_version}, system "
                f"{step.system_identifier} (after PostgreSQL {step.previous_major}, system {step.previous_system}); "
                f"first snapshot {step.snapshot}")
    emit(args, asdict(step), "\n".join([head, "next:", *(f"  {n}. {s}" for n, s in enumerate(step.next_steps, 1))]))
    return 0


def register(add: Add) -> None:
    p = add("upgrade", cmd_upgrade, "a major upgrade without losing the way back: --begin against the old server "
                                    "before pg_upgrade, --finish against the new one after it")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--begin", action="store_true",
                       help="against the OLD server: final snapshot, switch WAL, wait until it is archived, record "
                            "the open upgrade, print the runbook")
    which.add_argument("--finish", action="store_true",
                       help="against the NEW server: check it is a new system of a higher major, open its "
                            "generation, switch WAL, take its first snapshot")
    which.add_argument("--release-old", action="store_true",
                       help="let retention delete the old generations' last snapshots and WAL")
    p.add_argument("--no-snapshot", action="store_true",
                   help="with --begin: no final snapshot; the newest one and the archived WAL must reach the end")
    p.add_argument("--wait", type=float, metavar="SECONDS",
                   help="how long to wait for the switched WAL segment to be archived (default 120)")
