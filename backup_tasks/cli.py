"""The ``backup-tasks`` command line: the same plain functions the Celery tasks call.

Exit codes: 0 success; 1 the operation or check failed; 2 usage or configuration error.
With ``--json`` every command prints exactly one JSON document on stdout (errors included).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, is_dataclass
from datetime import datetime
from typing import Any, NoReturn

from . import __version__
from .errors import BackupError, ConfigError
from .settings import Settings

log = logging.getLogger("backup_tasks")


class UsageError(ConfigError):
    """A command-line mistake (exit 2)."""


class _Parser(argparse.ArgumentParser):
    """Usage errors become ``UsageError`` so that ``--json`` still gets its one document."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _jsonable(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def emit(args: argparse.Namespace, document: Any, human: str) -> None:
    if args.json:
        print(json.dumps(document, default=_jsonable, indent=2))
    else:
        print(human)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# --- commands ---------------------------------------------------------------------------------

def cmd_dump(args: argparse.Namespace, settings: Settings) -> int:
    from .dump import run_dump
    from .workflow import parse_day

    day = parse_day(args.trading_day) if args.trading_day else None

    def progress(phase: str, **info: Any) -> None:
        if args.verbose:
            log.info("%s %s", phase, info)

    manifest, skipped = run_dump(settings, trading_day=day, progress=progress)
    status = "already backed up for that day" if skipped else "complete"
    emit(args, manifest.to_dict() | ({"skipped": True} if skipped else {}),
         f"dump {manifest.id} {status}: {manifest.path}, {_size(manifest.size_bytes)}, "
         f"{len(manifest.tables)} tables, {sum(manifest.tables.values())} rows, sha256 {manifest.sha256[:16]}…")
    return 0


def cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    from .cli_pitr import cmd_verify_snapshot, snapshot_verify_requested
    from .verify import verify_backup

    if snapshot_verify_requested(args, settings):
        return cmd_verify_snapshot(args, settings)

    from . import manifest as catalog
    from .locations import open_locations

    # Resolve "the newest" before verifying: a dump finishing meanwhile must not change the answer.
    backup_id = args.backup_id or catalog.newest(open_locations(settings.backup_dir, settings.copy_to)).id
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
    from .prune import prune

    report = prune(settings, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    lines = [f"{'keep  ' if d.keep else 'delete'} {d.backup_id}  ({d.reason})" for d in report.decisions]
    lines.append(f"{verb} {len(report.deleted)} backup(s), {_size(report.freed_bytes)}")
    if getattr(report, "wal_deleted", None):
        lines.append(f"{verb} {len(report.wal_deleted)} archived WAL file(s), {_size(report.wal_freed_bytes)}: "
                     f"{report.wal_reason}")
    emit(args, asdict(report), "\n".join(lines))
    return 0


def cmd_restore(args: argparse.Namespace, settings: Settings) -> int:
    from .restore import restore_backup

    result = restore_backup(settings, args.backup_id, args.target_database_url, replace=args.replace,
                            no_owner=args.no_owner)
    human = (f"restored {result.backup_id} into {result.target}: {result.tables} tables, {result.rows} rows"
             + ("" if result.ok else "\nrow counts differ from the manifest:\n  " + "\n  ".join(result.problems)))
    emit(args, asdict(result), human)
    return 0 if result.ok else 1


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    from . import manifest as catalog
    from .locations import listing_by_location, open_locations

    storage = open_locations(settings.backup_dir, settings.copy_to)
    manifests = catalog.catalog(storage)  # each backup once, whichever locations hold it
    where = listing_by_location(storage) if settings.copy_to else {}

    def locations(m: catalog.Manifest) -> list[str]:
        return where.get(m.path, []) if settings.copy_to else [storage.location]

    lines = [f"{'id':44} {'kind':8} {'finished (UTC)':20} {'size':>10}  verified"]
    for m in manifests:
        verified = "never" if m.verification is None else ("ok " if m.verification.ok else "FAILED ") + \
            m.verification.verified_at
        lines.append(f"{m.id:44} {m.kind:8} {m.finished_at:20} {_size(m.size_bytes):>10}  {verified}"
                     + (f"  in {', '.join(locations(m)) or 'NO LOCATION'}" if settings.copy_to else ""))
    if not manifests:
        lines = [f"no backups in {settings.backup_dir}"]
    document: dict[str, Any] = {"backup_dir": settings.backup_dir, "copy_to": settings.copy_to,
                                "backups": [m.to_dict() | {"locations": locations(m)} for m in manifests]}
    if any(m.kind == "snapshot" for m in manifests):
        from .cli_pitr import snapshot_ranges_document

        document["restorable"] = snapshot_ranges_document(settings)  # live: what the WAL archive covers now
        lines += [f"snapshot {r['backup_id']} restores to any moment from {r['restorable_from']} to "
                  f"{r['restorable_until']}" + (f" (WAL gap at {r['wal_gap']})" if r["wal_gap"] else "")
                  for r in document["restorable"]]
    emit(args, document, "\n".join(lines))
    return 0


def cmd_health(args: argparse.Namespace, settings: Settings) -> int:
    from .health import check_health

    report = check_health(settings)
    human = (f"healthy: newest backup {report.newest_backup} finished {report.newest_finished_at}, verified"
             if report.ok else "UNHEALTHY:\n  " + "\n  ".join(report.problems))
    emit(args, asdict(report), human)
    return 0 if report.ok else 1


def cmd_sample_data(args: argparse.Namespace, settings: Settings) -> int:
    from .sampledata import generate
    from .settings import ConnInfo

    url = args.target_database_url or settings.database_url
    if not url:
        raise UsageError("sample-data needs --target-database-url or DATABASE_URL")
    rows = generate(ConnInfo.from_url(url), size_mb=args.size_mb)
    emit(args, {"tables": rows}, "\n".join(f"{name:12} {count:>10} rows" for name, count in rows.items()))
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from .demo import run_demo

    return run_demo(size_mb=args.size_mb, keep=args.keep, as_json=args.json)


def cmd_enqueue(args: argparse.Namespace, settings: Settings) -> int:
    from .enqueue import enqueue_post_close

    return enqueue_post_close(settings, day=args.day, wait=args.wait, timeout=args.timeout, as_json=args.json)


# --- parser -----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print one JSON document on stdout")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log progress to stderr")
    parser = _Parser(prog="backup-tasks", parents=[common],
                                     description="Proven PostgreSQL backups for the trading stack.")
    parser.add_argument("--version", action="version", version=f"backup-tasks {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, func: Callable[[argparse.Namespace, Settings], int], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    p = add("dump", cmd_dump, "take a full logical backup of DATABASE_URL now")
    p.add_argument("--trading-day", help="record the trading day (ISO date); skip if that day is already backed up")
    p = add("verify", cmd_verify, "restore a backup somewhere safe and compare it with its manifest")
    p.add_argument("backup_id", nargs="?", help="backup id (default: the newest dump)")
    p.add_argument("--snapshot", action="store_true", help="verify the newest snapshot (recovery to the end of "
                                                           "the WAL archive in a throwaway cluster)")
    p = add("prune", cmd_prune, "apply the retention policy")
    p.add_argument("--dry-run", action="store_true", help="show what would be deleted, delete nothing")
    p = add("restore", cmd_restore, "restore a dump into a database (created if missing)")
    p.add_argument("backup_id")
    p.add_argument("--target-database-url", help="where to restore (default: RESTORE_DATABASE_URL)")
    p.add_argument("--replace", action="store_true", help="drop and recreate a non-empty target first")
    p.add_argument("--no-owner", action="store_true", help="skip ownership and privileges (roles missing)")
    add("list", cmd_list, "show the catalog")
    add("health", cmd_health, "exit 1 unless there is a recent, non-empty, verified backup")
    p = add("demo", cmd_demo, "run a full daily cycle on a throwaway cluster with sample data (no setup needed)")
    p.add_argument("--size-mb", type=float, default=20, help="sample database size (default 20 MB)")
    p.add_argument("--keep", metavar="DIR", help="keep the demo's backups in DIR instead of deleting them")
    p = add("sample-data", cmd_sample_data, "create the trading schema with generated rows in an empty database")
    p.add_argument("--target-database-url", help="database to fill (default: DATABASE_URL)")
    p.add_argument("--size-mb", type=float, default=10, help="approximate size (default 10 MB)")
    p = add("enqueue", cmd_enqueue, "send a message to the workers")
    p.add_argument("message", choices=["post-close"], help="what to send")
    p.add_argument("--day", help="trading day, ISO date (default: today in BACKUP_TIMEZONE)")
    p.add_argument("--wait", action="store_true", help="wait for the workflow; exit 1 if it failed")
    p.add_argument("--timeout", type=float, default=3 * 3600, help="seconds to wait with --wait")
    from .cli_pitr import register  # snapshot, wal-push, wal-fetch, check, restore-point, restore-pitr

    register(add)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .entry import server_command_fast  # archive_command/restore_command: once per WAL segment

    fast = server_command_fast(list(sys.argv[1:] if argv is None else argv))
    if fast is not None:
        return fast
    argv_list = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv_list)
    except UsageError as exc:
        command = next((a for a in argv_list if not a.startswith("-")), "")
        return _fail(exc, command=command, as_json="--json" in argv_list)
    args.json = getattr(args, "json", False)
    args.verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        # PostgreSQL runs wal-push/wal-fetch with its own environment: --archive-dir is all they need.
        server_command = args.command in ("wal-push", "wal-fetch") and getattr(args, "archive_dir", None)
        settings = Settings() if args.command == "demo" or server_command else Settings.from_env()
        return int(args.func(args, settings))
    except BackupError as exc:
        return _fail(exc, command=args.command, as_json=args.json)
    except KeyboardInterrupt:
        if args.json:
            print(json.dumps({"ok": False, "error": "interrupted", "error_type": "KeyboardInterrupt"}))
        print(f"backup-tasks {args.command}: interrupted; nothing partial was kept", file=sys.stderr)
        return 130


def _fail(exc: BackupError, *, command: str, as_json: bool) -> int:
    """One line on stderr (never a traceback) and, with --json, one JSON document on stdout."""
    if as_json:
        print(json.dumps({"ok": False, "error": str(exc), "error_type": type(exc).__name__,
                          "at": datetime.now().astimezone().isoformat(timespec="seconds")}))
    print(f"backup-tasks {command}: error: {exc}".replace("backup-tasks : ", "backup-tasks: "), file=sys.stderr)
    return exc.exit_code

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
