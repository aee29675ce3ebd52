"""Adapter: the ``backup-tasks`` command line.

Owns argument parsing, ``--json`` documents, exit codes and human output; each command calls the
same plain functions the Celery tasks call. ``main`` parses, reads the settings and turns every
``BackupError`` into one line and its exit code. One module per command group: ``daily`` (dump,
verify, prune, restore, list, health), ``pitr`` (snapshot, WAL, check, restore points, PITR),
``workflow`` (enqueue, demo); ``output`` is the shared printing.

May import anything below it (worker client, capabilities, infrastructure, core). Nothing imports
it except ``backup_tasks.entry``. Heavy modules are imported inside the command that needs them.
"""

from __future__ import annotations

from typing import Any


def main(argv: Any = None) -> int:
    """The CLI (``backup_tasks.cli.main``), for callers that import ``backup_tasks.cli``."""
    from backup_tasks.cli.main import main as cli_main

    return cli_main(argv)
