"""The daily cycle's commands: dump, verify, prune, restore, list, health, sample-data.

Each imports what it runs inside the command, so ``backup-tasks --help`` stays fast.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from backup_tasks.cli.output import Add, UsageError, add_as_of, emit, progress_logger
from backup_tasks.progress import human_size
from backup_tasks.settings import Settings

if TYPE_CHECKING:
    from backup_tasks.storage.base import Storage


def cmd_dump(args: argparse.Namespace, settings: Settings) -> int:
    from backup_tasks.catalog.tradingday import parse_day
    from backup_tasks.logical.dump import run_dump

    day = parse_day(args.trading_day) if args.trading_day else None

    manifest, skipped = run_dump(settings, trading_day=day, progress=progress_logger(args))
    status = "already backed up for that day" if skipped else "complete"
    emit(args, manifest.to_dict() | ({"skipped": True} if skipped else {}),
         f"dump {manifest.id} {status}: {manifest.path}, {human_size(manifest.size_bytes)}, "
         f"{len(manifest.tables)} tables, {sum(manifest.tables.values())} rows, sha256 {manifest.sha256[:16]}…")
    return 0


def cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    from backup_tasks.cli.pitr import cmd_verify_snapshot, snapshot_verify_requested
    from backup_tasks.logical.verify import verify_backup

    if snapshot_verify_requested(args, settings):
        return cmd_verify_snapshot(args, settings)

    from backup_tasks.catalog import manifest as catalog

    # Resolve "the newest" before verifying: a dump finishing meanwhile must not change the answer.
    backup_id = args.backup_id or catalog.newest(settings.locations()).id
    result = verify_backup(settings, backup_id)
    document = {"ok": result.ok, "backup_id": backup_id, **asdict(result)}
    if result.ok:
        human = (f"verified {backup_id}: restored in {result.duration_seconds:.1f}s, {result.tables_compared} tables "
                 f"match, {result.indexes_checked} indexes sound ({', '.join(result.checked)})")
    else:
        human = f"VERIFICATION FAILED for {backup_id}:\n  " + "\n  ".join(result.problems)
    emit(args, document, human)
    return 0 if result.ok else 1


def cmd_prune(args: argparse.Namespace, settings: Settings) -> int:
    from backup_tasks.catalog.prune import prune

    report = prune(settings, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    lines = [f"{'keep  ' if d.keep else 'delete'} {d.backup_id}  ({d.reason})" for d in report.decisions]
    lines.append(f"{verb} {len(report.deleted)} backup(s), {human_size(report.freed_bytes)}")
    lines += [f"locked {entry.backup_id} until {entry.locked_until} (expired; a prune after that date deletes it)"
              for entry in report.locked]
    if report.wal_deleted:
        lines.append(f"{verb} {len(report.wal_deleted)} archived WAL file(s), {human_size(report.wal_freed_bytes)}: "
                     f"{report.wal_reason}")
    if report.wal_locked:
        lines.append(f"locked {report.wal_locked} expired WAL file(s) until {report.wal_locked_until} at the latest")
    if report.other_systems:
        lines.append(f"left alone {len(report.other_systems)} backup(s) of another PostgreSQL system (a shared "
                     f"BACKUP_COPY_TO prefix?): {', '.join(report.other_systems)}")
    if report.clock_refusal:
        lines.append(f"a real run would delete nothing: {report.clock_refusal}")
    emit(args, asdict(report), "\n".join(lines))
    return 0


def cmd_restore(args: argparse.Namespace, settings: Settings) -> int:
    from backup_tasks.logical.restore import restore_backup

    result = restore_backup(settings, args.backup_id, args.target_database_url, replace=args.replace,
                            no_owner=args.no_owner, with_roles=args.with_roles)
    human = (f"restored {result.backup_id} into {result.target}: {result.tables} tables, {result.rows} rows"
             + ("" if result.ok else "\nrow counts differ from the manifest:\n  " + "\n  ".join(result.problems))
             + (f"\n  roles created: {', '.join(result.roles_created)}" if result.roles_created else "")
             + "".join(f"\n  database {line}" for line in result.database_properties)
             + "".join(f"\n  {line}" for line in result.policies_changed)
             + "".join(f"\n  note: {note}" for note in result.notes))
    emit(args, asdict(result), human)
    return 0 if result.ok else 1


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    from backup_tasks.catalog import manifest as catalog
    from backup_tasks.physical.chain import incremental_of
    from backup_tasks.storage.integrity import listing_by_location

    # Costs the backups, not the WAL: the catalog and each location are listed at their top level only
    # (in S3 one ListObjectsV2 with a delimiter, whatever the copy's wal/ holds). The restorable ranges
    # need the archive's coverage: one listing pass of the local archive, never a listing of the copy.
    storage = settings.locations()
    manifests = catalog.catalog(storage)  # each backup once, whichever locations hold it
    where = listing_by_location(storage) if settings.copy_to else {}

    def locations(m: catalog.Manifest) -> list[str]:
        return where.get(m.path, []) if settings.copy_to else [storage.location]

    lines = [f"{'id':44} {'kind':8} {'finished (UTC)':20} {'size':>10}  verified"]
    for m in manifests:
        verified = "never" if m.verification is None else ("ok " if m.verification.ok else "FAILED ") + \
            m.verification.verified_at
        facts = incremental_of(m)
        lines.append(f"{m.id:44} {m.kind:8} {m.finished_at:20} {human_size(m.size_bytes):>10}  {verified}"
                     + (f"  incremental on {facts.parent} (chain of {len(facts.chain)})" if facts else "")
                     + (f"  in {', '.join(locations(m)) or 'NO LOCATION'}" if settings.copy_to else ""))
    if not manifests:
        lines = [f"no backups in {settings.backup_dir}"]
    document: dict[str, Any] = {"backup_dir": settings.backup_dir, "copy_to": settings.copy_to,
                                "backups": [m.to_dict() | {"locations": locations(m)} for m in manifests]}
    if any(m.kind == "snapshot" for m in manifests):
        document["restorable"] = _restorable(settings, storage)  # live: what the WAL archive covers now
        lines += [f"snapshot {r['backup_id']} restores to any moment from {r['restorable_from']} to "
                  f"{r['restorable_until']} on timeline {r['timeline']}"
                  + (f" (PostgreSQL {r['major']})" if r.get("major") else "")
                  + (f" (WAL gap at {r['wal_gap']})" if r["wal_gap"] else "") for r in document["restorable"]]
    document["generations"] = _generations(settings, storage, manifests)
    if len(document["generations"]) > 1:  # after a major upgrade: which server each backup is of
        lines += [f"generation PostgreSQL {g['major'] or '?'}, system {g['system_identifier']}: {len(g['backups'])} "
                  f"backup(s)" + (f", opened {g['opened_at']} ({g['reason']})" if g["previous"] else " (the first)")
                  + (", released to retention" if g["released"] else "") for g in document["generations"]]
    emit(args, document, "\n".join(lines))
    return 0


def _generations(settings: Settings, storage: Storage, manifests: list[Any]) -> list[dict[str, Any]]:
    """For ``list``: the PostgreSQL systems the catalog and the WAL archive held across major upgrades, oldest first,
    each with the ids of its backups (``catalog.generations``); one before any upgrade."""
    from backup_tasks.catalog.generations import generation_of, read_generations
    from backup_tasks.wal.remote import archive_for_reading

    try:
        archive = archive_for_reading(settings)
        primary = archive.primary if archive.available() else None
    except Exception:  # the archive's records only add first segments: the catalog's records suffice
        primary = None
    try:
        known = read_generations(storage, primary, manifests)
    except Exception:  # listing must not fail because a record is unreadable (health says so)
        return []
    members: dict[str, list[str]] = {g.system: [] for g in known.generations}
    for m in manifests:
        generation = generation_of(m, known)
        if generation is not None:
            members[generation.system].append(m.id)
    return [g.to_dict() | {"backups": members[g.system]} for g in known.generations]


def _restorable(settings: Settings, storage: Storage) -> list[dict[str, Any]]:
    """For ``list``: what each snapshot can restore to right now, one entry per timeline it restores onto."""
    from backup_tasks.physical.ranges import restorable_ranges
    from backup_tasks.wal.remote import archive_for_reading

    try:
        # The bucket's wal/ when BACKUP_DIR is one (disaster recovery); the copy listed only to fill a hole.
        archive = archive_for_reading(settings, copy_on_gap=True)
        return [r.to_dict() for r in restorable_ranges(storage, archive)]
    except Exception:  # listing must not fail because the archive is unreadable
        return []


def cmd_health(args: argparse.Namespace, settings: Settings) -> int:
    from backup_tasks.observe.health import check_health

    report = check_health(settings)
    if not report.ok:
        human = "UNHEALTHY:\n  " + "\n  ".join(report.problems)  # one problem a line
    else:
        lines = [f"healthy: newest backup {report.newest_backup} finished {report.newest_finished_at}, verified"]
        snapshot, wal = report.snapshot, report.wal
        if snapshot["pitr"]:
            lines.append(f"newest snapshot {snapshot['newest']} finished {snapshot['finished_at']}, "
                         + ("verified" if snapshot["verified"] else "verification pending"))
        if wal["checked"] and wal["from"]:
            server = f", server on timeline {wal['server_timeline']}" if wal["server_timeline"] is not None else ""
            lines.append(f"WAL {wal['from']} to {wal['to']}: {wal['found']} segments found, none lost, "
                         f"{wal['missing_in_flight']} in flight; archive on timeline {wal['timeline']}{server}")
        if not snapshot["pitr"]:
            lines.append(f"point-in-time recovery not judged: {snapshot['why']}")
        human = "\n".join(lines)
    emit(args, asdict(report), human)
    return 0 if report.ok else 1


def cmd_sample_data(args: argparse.Namespace, settings: Settings) -> int:
    from backup_tasks.conninfo import ConnInfo
    from backup_tasks.postgres.sampledata import generate

    url = args.target_database_url or settings.database_url
    if not url:
        raise UsageError("sample-data needs --target-database-url or DATABASE_URL")
    rows = generate(ConnInfo.from_url(url), size_mb=args.size_mb)
    emit(args, {"tables": rows}, "\n".join(f"{name:12} {count:>10} rows" for name, count in rows.items()))
    return 0


def register(add: Add) -> None:
    p = add("dump", cmd_dump, "take a full logical backup of DATABASE_URL now")
    p.add_argument("--trading-day", help="record the trading day (ISO date); skip if that day is already backed up")
    p = add("verify", cmd_verify, "restore a backup somewhere safe and compare it with its manifest")
    p.add_argument("backup_id", nargs="?", help="backup id (default: the newest dump)")
    p.add_argument("--snapshot", action="store_true", help="verify the newest snapshot (recovery to the end of "
                                                           "the WAL archive in a throwaway cluster)")
    add_as_of(p)
    p = add("prune", cmd_prune, "apply the retention policy")
    p.add_argument("--dry-run", action="store_true", help="show what would be deleted, delete nothing")
    p = add("restore", cmd_restore, "restore a dump into a database (created if missing)")
    p.add_argument("backup_id")
    p.add_argument("--target-database-url", help="where to restore (default: RESTORE_DATABASE_URL)")
    p.add_argument("--replace", action="store_true", help="drop and recreate a non-empty target first")
    roles = p.add_mutually_exclusive_group()
    roles.add_argument("--with-roles", action="store_true",
                       help="create the roles the backup needs that the target server lacks (existing roles are "
                            "never altered); without it, missing roles stop the restore before anything is written")
    roles.add_argument("--no-owner", action="store_true",
                       help="restore without the backup's owners and privileges (the roles need not exist); a "
                            "row-level security policy keeps only the roles that exist here, and is left out when "
                            "it names none")
    add_as_of(p)
    add_as_of(add("list", cmd_list, "show the catalog"))
    add("health", cmd_health, "exit 1 unless the newest dump is recent, non-empty and verified and, with PITR, the "
                              "newest snapshot too and the WAL unbroken from the earliest restorable snapshot")
    p = add("sample-data", cmd_sample_data, "create the trading schema with generated rows in an empty database")
    p.add_argument("--target-database-url", help="database to fill (default: DATABASE_URL)")
    p.add_argument("--size-mb", type=float, default=10, help="approximate size (default 10 MB)")
