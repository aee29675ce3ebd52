"""CLI commands for snapshots, the WAL archive and point-in-time recovery (registered by ``cli.py``).

Kept import-light: ``wal-push`` and ``wal-fetch`` run once per WAL segment as the server's OS user,
so everything heavier than the archive module is imported inside the command that needs it.

wal-fetch exit codes follow restore_command's contract: 0 restored; 1 not in the archive (the
normal end of archived WAL: recovery ends there); ``RECOVERY_FATAL`` (200) when the archive is
damaged or unreadable (a corrupt file; a gap: a missing segment with later ones present; no archive
directory; permission denied). PostgreSQL treats an exit status above 125 as fatal and stops
recovery, instead of ending it early at the damage. The fast path for both is ``entry.py``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from backup_tasks.cli.output import Add, UsageError, add_as_of, emit, progress_logger
from backup_tasks.errors import WalMissing
from backup_tasks.progress import human_size
from backup_tasks.settings import Settings
from backup_tasks.wal.command import ARGUMENTS, OPTIONS, RECOVERY_FATAL, FetchRequest


def _archive_dir(args: argparse.Namespace, settings: Settings) -> Path:
    return Path(args.archive_dir).absolute() if getattr(args, "archive_dir", None) else settings.wal_archive


def _copy_to(args: argparse.Namespace, settings: Settings) -> str | None:
    """``--copy-to`` (what archive_command passes), else BACKUP_COPY_TO."""
    return getattr(args, "copy_to", None) or settings.copy_to


def cmd_wal_push(args: argparse.Namespace, settings: Settings) -> int:
    from backup_tasks.wal.archive import WalArchive
    from backup_tasks.wal.command import push_and_record

    recipients = settings.encrypt_recipients
    if getattr(args, "encrypt_to", None):
        from backup_tasks.streams.crypto import parse_recipients

        recipients = parse_recipients(args.encrypt_to, setting="--encrypt-to")
    archive = WalArchive.in_directory(_archive_dir(args, settings), _copy_to(args, settings), recipients=recipients)
    # As the fast path does: push-ahead with a copy, then the state file the exporter reads.
    result = push_and_record(archive, Path(args.path), level=args.level,
                             copy_within=args.copy_timeout or settings.copy_timeout_seconds,
                             drop_after=args.drop_after or settings.wal_drop_after_bytes, detach=True)
    if args.json or args.verbose:
        emit(args, asdict(result), f"{result.name}: {result.status} ({result.original_bytes} -> "
                                    f"{result.stored_bytes} bytes), copy: {result.copy or 'none'}")
    return 0


def cmd_wal_ship(args: argparse.Namespace, settings: Settings) -> int:
    from backup_tasks.wal.archive import WalArchive
    from backup_tasks.wal.ship import ship_to_copy

    archive = WalArchive.in_directory(_archive_dir(args, settings), _copy_to(args, settings),
                                      identity_file=settings.decrypt_identity_file)
    report = ship_to_copy(archive, put_timeout=settings.copy_timeout_seconds)
    remaining = report.remaining
    human = (f"WAL copy {report.copy or '(none: give --copy-to or BACKUP_COPY_TO)'}: shipped {len(report.shipped)} "
             f"({human_size(report.bytes)}) in {report.seconds:.1f}s, {len(report.already_there)} already there; "
             + ("another shipper is running; " if report.busy else "")
             + (f"{remaining.files} still queued ({human_size(remaining.bytes)}, oldest {remaining.oldest})"
                if remaining.files else "nothing left behind")
             + "".join(f"\n  {name}: {why}" for name, why in report.failed.items())
             + (f"\n  the copy failed: {report.error}" if report.error else ""))
    emit(args, report.to_dict(), human)
    return 0 if report.ok else 1


def cmd_wal_fetch(args: argparse.Namespace, settings: Settings) -> int:
    from backup_tasks.wal.command import fetch

    # The rules of wal.command, for what was given; then the settings fill in what was not.
    given = FetchRequest(args.name, Path(args.destination),
                         archive_dir=Path(args.archive_dir).absolute() if args.archive_dir else None,
                         archive_url=args.archive_url, copy_to=args.copy_to, identity_file=args.identity_file,
                         prefetch=args.prefetch, as_of=settings.as_of)
    problem = given.problem()
    if problem:
        raise UsageError(problem)
    try:
        request = given._replace(identity_file=given.identity_file or settings.decrypt_identity_file)
        if not request.archive_url:
            request = request._replace(archive_dir=_archive_dir(args, settings), copy_to=_copy_to(args, settings))
        size = fetch(request)
    except WalMissing as exc:
        # The normal end of the archive: PostgreSQL asks for the next file until this happens.
        if args.json:
            emit(args, {"ok": False, "name": args.name, "missing": True, "error": str(exc)}, "")
        print(f"backup-tasks wal-fetch: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a gap, damage, an unreadable archive, a bug: anything but "not archived"
        if args.json:
            emit(args, {"ok": False, "name": args.name, "fatal": True, "error": str(exc)}, "")
        print(f"backup-tasks wal-fetch: FATAL: {exc}", file=sys.stderr)
        return RECOVERY_FATAL
    if args.json or args.verbose:
        emit(args, {"ok": True, "name": args.name, "bytes": size}, f"{args.name}: restored ({size} bytes)")
    return 0


def cmd_snapshot(args: argparse.Namespace, settings: Settings) -> int:
    from backup_tasks.physical.chain import incremental_of
    from backup_tasks.physical.snapshot import take_snapshot

    manifest = take_snapshot(settings, progress=progress_logger(args), incremental=args.incremental)
    info = manifest.snapshot or {}
    warnings = info.get("warnings") or []
    chain = incremental_of(manifest)
    what = (f"incremental snapshot {manifest.id} (on {chain.parent}, a chain of {len(chain.chain)})" if chain
            else f"snapshot {manifest.id}")
    checked = "checked by pg_verifybackup, its chain by pg_combinebackup --dry-run" if chain else \
        "checked by pg_verifybackup"
    human = (f"{what} complete: {human_size(manifest.size_bytes)}, WAL {manifest.start_lsn} to "
             f"{manifest.stop_lsn} on timeline {manifest.timeline}, {checked}"
             + (f"\n  full, not incremental: {info['incremental_reason']}" if info.get("incremental_reason") else "")
             + "".join(f"\n  warning: {w}" for w in warnings))
    emit(args, manifest.to_dict(), human)
    return 0


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    from backup_tasks.wal.setup import check_archiving

    report = check_archiving(settings, timeout=args.timeout)
    storage_document, storage_lines = storage_and_keys(settings)
    document = report.to_dict() | storage_document
    document["ok"] = ok = report.ok and storage_document["storage_ok"] and storage_document["keys"]["ok"]
    lines = [f"WAL archive {report.archive_dir} on {report.server}: "
             + ("archiving works" if report.ok else "ARCHIVING IS NOT WORKING")]
    if report.segment:
        lines.append(f"  forced a switch: segment {report.segment} "
                     + (f"arrived in {report.waited_seconds:.1f}s" if report.arrived else "did not arrive"))
    lines += [f"  problem: {p}" for p in report.problems]
    lines += [f"  warning: {w}" for w in report.warnings]
    lines += [f"  note: {n}" for n in report.notes]
    lines.append("postgresql.conf:")
    lines += [f"  {line}" for line in report.postgresql_conf]
    compression_document, compression_line = snapshot_compression_check(settings)
    document["snapshot_compression"] = compression_document
    lines.append(compression_line)
    incremental_document, incremental_line = incremental_check(settings)
    document["incremental_snapshots"] = incremental_document
    lines.append(incremental_line)
    lines += storage_lines
    emit(args, document, "\n".join(lines))
    return 0 if ok else 1


def snapshot_compression_check(settings: Settings) -> tuple[dict[str, Any], str]:
    """For ``check``: who will compress the next snapshot (server, pg_basebackup or backup-tasks), and why."""
    from backup_tasks.errors import BackupError
    from backup_tasks.physical.compression import planned_compression

    try:
        planned = planned_compression(settings)
    except BackupError as exc:  # the archiving check above already reports an unreachable server
        return {"error": str(exc)}, f"snapshots: cannot tell who will compress them ({exc})"
    return {"by": planned.by, "spec": planned.spec, "reason": planned.reason}, planned.describe()


def incremental_check(settings: Settings) -> tuple[dict[str, Any], str]:
    """For ``check``: the server's summarize_wal, and whether ``snapshot --incremental`` would be incremental."""
    from backup_tasks.errors import BackupError
    from backup_tasks.physical.chain import readiness

    try:
        ready = readiness(settings)
    except BackupError as exc:  # the archiving check above already reports an unreachable server
        return {"error": str(exc)}, f"incremental snapshots: cannot tell ({exc})"
    return asdict(ready), ready.describe()


def storage_and_keys(settings: Settings) -> tuple[dict[str, Any], list[str]]:
    """For ``check``: each storage location reachable and writable? the encryption keys usable?"""
    from backup_tasks.errors import BackupError
    from backup_tasks.storage.integrity import LocationStatus, probe_all
    from backup_tasks.streams.crypto import key_status

    try:
        statuses = probe_all(settings.locations())
    except BackupError as exc:
        statuses = [LocationStatus(settings.backup_dir, "primary", False, False, 0.0, str(exc), type(exc).__name__)]
    keys = key_status(settings.encrypt_recipients, settings.decrypt_identity_file)
    storage_ok = all(s.reachable and s.writable for s in statuses)
    lines = ["storage:"]
    for s in statuses:
        lines.append(f"  {s.role} {s.location}: " + ("reachable and writable" if s.reachable and s.writable else
                                                     f"NOT {'WRITABLE' if s.reachable else 'REACHABLE'}: {s.error}"))
        if s.versioning is not None or s.object_lock is not None:
            lines.append(f"    versioning {s.versioning or 'unknown'}; Object Lock "
                         + ("on" if s.object_lock else "off" if s.object_lock is False else "unknown")
                         + (f"; each object written is locked {s.lock}" if s.lock else
                            "; objects written are not locked")
                         + (f"; the bucket's default retention: {s.default_retention}" if s.default_retention else ""))
        if s.delete_refused:
            lines.append(f"    note: deleting here is refused ({s.delete_refused}); prune needs its own credentials "
                         f"(BACKUP_PRUNE_AWS_PROFILE) or the bucket's lifecycle rules")
    retention_warnings = settings.lock_outlasts_retention()
    lines += [f"  warning: {w}" for w in retention_warnings]
    lines.append("encryption: " + (f"to {', '.join(keys.recipients)}" if keys.encrypting else "off")
                 + (f"; identity file {keys.identity_file}" if keys.identity_file else ""))
    lines += [f"  problem: {p}" for p in keys.problems] + [f"  warning: {w}" for w in keys.warnings]
    return {"storage_ok": storage_ok, "locations": [asdict(s) for s in statuses], "keys": asdict(keys),
            "retention_warnings": retention_warnings}, lines


def cmd_restore_point(args: argparse.Namespace, settings: Settings) -> int:
    from dataclasses import asdict as as_dict

    from backup_tasks.wal.restore_points import create_restore_point

    point = create_restore_point(settings, args.name, trading_day=args.trading_day, switch_wal=not args.no_switch)
    emit(args, {"ok": True, **as_dict(point)}, f"restore point {point.name!r} at WAL {point.lsn} "
                                                f"(segment {point.segment}), {point.created_at}")
    return 0


def cmd_restore_pitr(args: argparse.Namespace, settings: Settings) -> int:
    from backup_tasks.physical.plan import latest_target, name_target, time_target
    from backup_tasks.physical.restore import restore_pitr

    if args.target_time and args.target_name:
        raise UsageError("give --target-time or --target-name, not both")
    target = (time_target(args.target_time, settings, args.timeline) if args.target_time
              else name_target(args.target_name, args.timeline) if args.target_name else latest_target(args.timeline))
    report = restore_pitr(settings, target, Path(args.data_dir), start=args.start, port=args.port,
                          action=args.target_action, keep_archiving=args.keep_archiving, timeout=args.timeout,
                          snapshot_id=args.snapshot)
    lines = [f"restored snapshot {report.snapshot_id} into {report.data_dir} for {report.target} "
             f"(recovery target timeline {report.timeline})"]
    lines += [f"  warning: {w}" for w in report.warnings] + [f"  note: {n}" for n in report.notes]
    if report.outcome is not None:
        o = report.outcome
        lines.append(("recovery finished" if report.ok else "RECOVERY FAILED") + f" (server state: {o.state})")
        for label, value in (("stopped", o.stop_reason), ("last transaction", o.last_transaction_at),
                             ("redo done at", o.redo_done_at), ("new timeline", o.new_timeline)):
            if value:
                lines.append(f"  {label}: {value}")
        if report.ok and report.port:
            lines.append(f"  running on 127.0.0.1:{report.port}; stop it with: pg_ctl -D {report.data_dir} stop")
    else:
        lines.append(f"start it as the server user: pg_ctl -D {report.data_dir} start "
                     f"(it recovers, then {args.target_action}s)")
    emit(args, report.to_dict(), "\n".join(lines))
    return 0 if report.ok else 1


def snapshot_verify_requested(args: argparse.Namespace, settings: Settings) -> bool:
    if getattr(args, "snapshot", False):
        return True
    if not args.backup_id:
        return False
    from backup_tasks.catalog import manifest as catalog

    storage = settings.locations()
    return storage.exists(catalog.manifest_key(args.backup_id)) and \
        catalog.load(storage, args.backup_id).kind == "snapshot"


def cmd_verify_snapshot(args: argparse.Namespace, settings: Settings) -> int:
    from backup_tasks.physical.verify import snapshot_to_verify, verify_snapshot

    # Resolve "the newest" before verifying: a snapshot finishing meanwhile must not change the answer.
    backup_id = snapshot_to_verify(settings.locations(), args.backup_id).id
    result = verify_snapshot(settings, backup_id)
    document = {"ok": result.ok, "backup_id": backup_id, **asdict(result)}
    if result.ok:
        human = (f"verified snapshot {backup_id}: recovered to the end of the archive "
                 f"({(result.details or {}).get('reached_lsn')}) in {result.duration_seconds:.1f}s, "
                 f"{result.tables_compared} tables read, {result.indexes_checked} indexes sound "
                 f"({', '.join(result.checked)})")
    else:
        human = f"VERIFICATION FAILED for snapshot {backup_id}:\n  " + "\n  ".join(result.problems)
    emit(args, document, human)
    return 0 if result.ok else 1


def snapshot_ranges_document(settings: Settings) -> list[dict[str, Any]]:
    """For ``list --json``: what each snapshot can restore to right now."""
    from backup_tasks.physical.plan import snapshot_ranges
    from backup_tasks.wal.remote import archive_for_reading

    try:
        archive = archive_for_reading(settings)  # the bucket's wal/ when BACKUP_DIR is one (disaster recovery)
        ranges = snapshot_ranges(settings.locations(), archive)
    except Exception:  # listing must not fail because the archive is unreadable
        return []
    return [{"backup_id": r.snapshot.id, "restorable_from": r.restorable_from.isoformat(),
             "restorable_until": r.restorable_until.isoformat(), "wal_gap": r.coverage.gap,
             "wal_segments": r.coverage.segments} for r in ranges]


def register(add: Add) -> None:
    p = add("snapshot", cmd_snapshot, "take a physical snapshot (pg_basebackup) of the cluster, verified by "
                                      "pg_verifybackup")
    p.add_argument("--incremental", action="store_true",
                   help="PostgreSQL 17+ with summarize_wal = on: only the blocks changed since the newest snapshot "
                        "(pg_basebackup --incremental); where that is not possible a full snapshot is taken and the "
                        "reason said")
    for command, help_text in (("wal-push", "archive one WAL file (PostgreSQL's archive_command: wal-push "
                                            "--archive-dir DIR <path>)"),
                               ("wal-fetch", "restore one WAL file (PostgreSQL's restore_command: wal-fetch "
                                             "--archive-dir DIR <name> <path>)")):
        p = add(command, cmd_wal_push if command == "wal-push" else cmd_wal_fetch, help_text)
        for argument, argument_help in ARGUMENTS[command]:  # the command line of wal.command, nothing else
            p.add_argument(argument, help=argument_help.replace("%", "%%"))
        for option in OPTIONS[command]:
            p.add_argument(option.flag, metavar=option.metavar, type=int if option.integer else str,
                           default=option.default, help=option.help)
    p = add("wal-ship", cmd_wal_ship, "send the WAL files the copy lacks (queued by wal-push while BACKUP_COPY_TO "
                                      "was down or slow) to it, in order; exit 1 while any are left")
    p.add_argument("--archive-dir", help="the WAL archive (default: WAL_ARCHIVE_DIR, else BACKUP_DIR/wal)")
    p.add_argument("--copy-to", help="the copy (default: BACKUP_COPY_TO)")
    p = add("check", cmd_check, "check that the server archives WAL correctly (forces a segment switch and waits "
                                "for it); prints the postgresql.conf lines")
    p.add_argument("--timeout", type=float, default=60, help="seconds to wait for the segment (default 60)")
    p = add("restore-point", cmd_restore_point, "create a named restore point (pg_create_restore_point)")
    p.add_argument("name")
    p.add_argument("--trading-day", help="the trading day it marks (ISO date), for snapshot verification")
    p.add_argument("--no-switch", action="store_true", help="do not switch WAL segments afterwards")
    p = add("restore-pitr", cmd_restore_pitr, "restore the cluster to a point in time into an empty data directory")
    add_as_of(p)
    p.add_argument("--data-dir", required=True, help="where to restore (must be empty or not exist)")
    p.add_argument("--target-time", help="any timestamp PostgreSQL accepts (no zone: BACKUP_TIMEZONE)")
    p.add_argument("--target-name", help="a restore point name")
    p.add_argument("--timeline", type=int, metavar="N",
                   help="the timeline the target is on (default: the archive's newest timeline when it covers the "
                        "target, else the newest that does)")
    p.add_argument("--snapshot", metavar="ID", help="start from this snapshot (default: the newest that covers the "
                                                    "target and did not fail its latest verification)")
    p.add_argument("--target-action", choices=["promote", "pause", "shutdown"], default="promote",
                   help="what the server does at the target (default promote)")
    p.add_argument("--start", action="store_true", help="start the server, wait for recovery, report the point")
    p.add_argument("--port", type=int, help="port for --start (default: a free one)")
    p.add_argument("--keep-archiving", action="store_true",
                   help="leave archive_mode as in the snapshot (default: off, so the copy never archives)")
    p.add_argument("--timeout", type=float, default=6 * 3600, help="seconds to wait with --start")



