"""``backup-tasks``: the parser, settings, and one error path for every command.

Exit codes: 0 success; 1 the operation or check failed; 2 usage or configuration error.
With ``--json`` every command prints exactly one JSON document on stdout (errors included).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime

from backup_tasks import __version__
from backup_tasks.cli import daily, observe, pitr, upgrade, workflow
from backup_tasks.cli.output import Command, Parser, UsageError, fail
from backup_tasks.clock import parse_moment, utcnow
from backup_tasks.errors import BackupError
from backup_tasks.settings import Settings

log = logging.getLogger("backup_tasks")


def build_parser() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print one JSON document on stdout")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log progress to stderr")
    parser = Parser(prog="backup-tasks", parents=[common],
                                     description="Proven PostgreSQL backups for the trading stack.")
    parser.add_argument("--version", action="version", version=f"backup-tasks {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, func: Command, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    for register in (daily.register, pitr.register, workflow.register, observe.register, upgrade.register):
        register(add)
    return parser


def parse_as_of(text: str, settings: Settings) -> datetime:
    moment = parse_moment(text, settings.tz)
    if moment is None:
        raise UsageError(f"--as-of {text!r} is not a time I can read; write it like 2026-11-23 15:29:59+05:30 "
                         f"(no zone: {settings.timezone})")
    if moment > utcnow():
        raise UsageError(f"--as-of {text!r} is in the future: give a moment before now")
    return moment


def main(argv: Sequence[str] | None = None) -> int:
    argv_list = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv_list)
    except UsageError as exc:
        command = next((a for a in argv_list if not a.startswith("-")), "")
        return fail(exc, command=command, as_json="--json" in argv_list)
    args.json = getattr(args, "json", False)
    args.verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        # PostgreSQL runs wal-push/wal-fetch with its own environment: --archive-dir is all they need.
        server_command = args.command in ("wal-push", "wal-fetch") and (
            getattr(args, "archive_dir", None) or getattr(args, "archive_url", None))
        settings = Settings() if args.command == "demo" or server_command else Settings.from_env()
        if getattr(args, "as_of", None):
            settings = replace(settings, as_of=parse_as_of(args.as_of, settings))
        return int(args.func(args, settings))
    except BackupError as exc:
        return fail(exc, command=args.command, as_json=args.json)
    except KeyboardInterrupt as exc:
        # A command that can keep something when interrupted (restore) says what is where, and SIGTERM
        # exits 143 as a shell expects; the others keep nothing partial.
        detail = str(exc)
        if args.json:
            document = {"ok": False, "error": "interrupted", "error_type": "KeyboardInterrupt"}
            print(json.dumps({**document, "detail": detail} if detail else document))
        print(f"backup-tasks {args.command}: interrupted; {detail or 'nothing partial was kept'}", file=sys.stderr)
        return 128 + int(getattr(exc, "signum", signal.SIGINT))
