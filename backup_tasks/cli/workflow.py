"""Commands that involve the workers: ``enqueue post-close`` and the self-contained ``demo``.

Celery is imported only when one of them runs.
"""

from __future__ import annotations

import argparse

from backup_tasks.cli.output import Add
from backup_tasks.settings import Settings


def cmd_enqueue(args: argparse.Namespace, settings: Settings) -> int:
    from backup_tasks.cli.enqueue import enqueue_post_close

    return enqueue_post_close(settings, day=args.day, wait=args.wait, timeout=args.timeout, as_json=args.json)


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from backup_tasks.cli.demo import run_demo

    return run_demo(size_mb=args.size_mb, keep=args.keep, as_json=args.json)


def register(add: Add) -> None:
    p = add("demo", cmd_demo, "run a full daily cycle on a throwaway cluster with sample data (no setup needed)")
    p.add_argument("--size-mb", type=float, default=20, help="sample database size (default 20 MB)")
    p.add_argument("--keep", metavar="DIR", help="keep the demo's backups in DIR instead of deleting them")
    p = add("enqueue", cmd_enqueue, "send a message to the workers")
    p.add_argument("message", choices=["post-close"], help="what to send")
    p.add_argument("--day", help="trading day, ISO date (default: today in BACKUP_TIMEZONE)")
    p.add_argument("--wait", action="store_true", help="wait for the workflow; exit 1 if it failed")
    p.add_argument("--timeout", type=float, default=3 * 3600, help="seconds to wait with --wait")
