"""What every command prints: one JSON document with ``--json``, one human text otherwise; errors as one line.

Exit codes: 0 success; 1 the operation or check failed; 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from datetime import datetime
from typing import Any, NoReturn

from backup_tasks.errors import BackupError, ConfigError
from backup_tasks.progress import Progress, no_progress
from backup_tasks.settings import Settings

#: A command: parsed arguments and settings in, exit code out.
Command = Callable[[argparse.Namespace, Settings], int]
#: How a command module adds its subcommands: ``add(name, command, help) -> its parser``.
Add = Callable[[str, Command, str], argparse.ArgumentParser]


AS_OF_HELP = ("read the s3:// locations as they were at this time (a versioned bucket): backups deleted or "
              "overwritten since are found again; no zone means BACKUP_TIMEZONE")


def add_as_of(parser: argparse.ArgumentParser) -> None:
    """``--as-of TIME`` (``cli.main`` parses it into ``Settings.as_of``)."""
    parser.add_argument("--as-of", metavar="TIME", help=AS_OF_HELP)


class UsageError(ConfigError):
    """A command-line mistake (exit 2)."""


class Parser(argparse.ArgumentParser):
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


def fail(exc: BackupError, *, command: str, as_json: bool) -> int:
    """One line on stderr (never a traceback) and, with --json, one JSON document on stdout."""
    if as_json:
        print(json.dumps({"ok": False, "error": str(exc), "error_type": type(exc).__name__,
                          "at": datetime.now().astimezone().isoformat(timespec="seconds")}))
    print(f"backup-tasks {command}: error: {exc}".replace("backup-tasks : ", "backup-tasks: "), file=sys.stderr)
    return exc.exit_code


def progress_logger(args: argparse.Namespace) -> Progress:
    """With ``--verbose``, each progress report of a long command as a log line on stderr."""
    if not args.verbose:
        return no_progress
    log = logging.getLogger("backup_tasks")

    def progress(phase: str, **info: object) -> None:
        log.info("%s %s", phase, info)

    return progress
