"""``backup-tasks enqueue post-close``: send the message, optionally follow the workflow, and say how it went.

Sending and following are the worker client's (``worker.client``); this module only prints.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from backup_tasks.catalog.tradingday import parse_day
from backup_tasks.errors import ConfigError
from backup_tasks.settings import Settings
from backup_tasks.worker.client import (
    POST_CLOSE,
    WorkflowOutcome,
    client_app,
    follow,
    send,
    today,
)
from backup_tasks.worker.config import QUEUE


def enqueue_post_close(settings: Settings, *, day: str | None, wait: bool, timeout: float, as_json: bool) -> int:
    """``backup-tasks enqueue post-close [--day D] [--wait] [--timeout S] [--json]``; returns the exit code."""
    if timeout <= 0:
        raise ConfigError(f"--timeout must be a positive number of seconds, got {timeout:g}")
    trading_day = parse_day(day) if day else today(settings.tz)
    # The sender has no result backend: sending must depend on the broker alone.
    sender = client_app(settings.broker_url)
    try:
        task_id = send(sender, trading_day).id
    finally:
        sender.close()
    if not wait:
        if as_json:
            print(json.dumps({"task_id": task_id, "task": POST_CLOSE, "trading_day": trading_day, "queue": QUEUE}))
        else:
            print(task_id)
        return 0
    if not as_json:
        print(task_id, flush=True)
        print(f"post-close for {trading_day} sent; waiting up to {timeout:g}s for the workflow", file=sys.stderr)
    reader = client_app(settings.broker_url, settings.effective_result_backend)
    try:
        outcome = follow(reader, task_id, trading_day, timeout, on_state=None if as_json else _report_state)
    finally:
        reader.close()
    if as_json:
        print(json.dumps(outcome.to_dict(), indent=2, default=str))
    else:
        print(_describe(outcome))
    return 0 if outcome.ok else 1


def _report_state(task_id: str, state: str, info: Any) -> None:
    detail = f" {info.get('phase')}" if isinstance(info, dict) and state == "PROGRESS" else ""
    print(f"  {task_id[:8]}… {state}{detail}", file=sys.stderr, flush=True)


def _describe(outcome: WorkflowOutcome) -> str:
    post = outcome.post_close.result if outcome.post_close and isinstance(outcome.post_close.result, dict) else {}
    lines = [f"post-close {outcome.trading_day}: {post.get('status', 'not started')}"
             + (f" ({post['reason']})" if post.get("reason") else "")
             + (f", backup {post['backup_id']}" if post.get("backup_id") else "")]
    for name, step in outcome.steps.items():
        lines.append(f"  {name:7} {step.state:8} {step.error or _step_summary(name, step.result)}")
    lines.extend(f"  problem: {problem}" for problem in outcome.problems)
    skipped = ("the workflow an earlier signal started for this day is complete" if outcome.steps
               else "nothing to do: the day is already backed up")
    verdict = {"complete": "workflow complete", "skipped": skipped, "failed": "workflow FAILED",
               "timeout": "gave up waiting (the workflow may still finish)"}
    lines.append(verdict.get(outcome.status, outcome.status))
    return "\n".join(lines)


def _step_summary(name: str, result: Any) -> str:
    if not isinstance(result, dict):
        return str(result)
    if name == "dump":
        return f"{result.get('status')}: {result.get('path')}, {result.get('size_bytes')} bytes"
    if name == "verify":
        return f"restored and compared {result.get('tables_compared')} tables in {result.get('duration_seconds')}s"
    if name == "prune":
        return f"deleted {len(result.get('deleted') or [])} backup(s)"
    return json.dumps(result)[:200]
