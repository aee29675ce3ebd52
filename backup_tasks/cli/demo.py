"""``backup-tasks demo``: a full daily cycle with nothing to set up.

A throwaway PostgreSQL cluster gets the trading schema and generated rows; a Celery worker runs in
this process on an in-memory broker; the post-close message starts dump -> verify -> prune, and
each step is shown as it goes. Everything lives under ``TMPDIR`` and is removed at the end, also
on Ctrl-C (unless ``--keep DIR`` asks to keep the backups).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from backup_tasks.catalog.manifest import catalog
from backup_tasks.catalog.tradingday import session_day
from backup_tasks.clock import utcnow
from backup_tasks.errors import BackupError
from backup_tasks.observe.health import check_health
from backup_tasks.postgres.cluster import ThrowawayCluster
from backup_tasks.postgres.connect import connect
from backup_tasks.postgres.queries import create_database
from backup_tasks.postgres.sampledata import generate
from backup_tasks.settings import Settings
from backup_tasks.storage.locations import open_storage


class Narrator:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.started = time.monotonic()

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"[{time.monotonic() - self.started:6.1f}s] {text}", flush=True)


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Tasks read their settings from the environment, as in production; set it for the demo only."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


@contextmanager
def _private_tempdir() -> Iterator[str]:
    """One directory under TMPDIR for everything the demo creates (cluster, backups, lock files).

    It is traversable but not listable by others, so the ``postgres`` OS user can reach the
    cluster directory inside it when we run as root; it is removed on the way out, Ctrl-C included.
    """
    saved = tempfile.tempdir
    with tempfile.TemporaryDirectory(prefix="backup-tasks-demo-") as scratch:
        os.chmod(scratch, 0o711)
        tempfile.tempdir = scratch
        try:
            yield scratch
        finally:
            tempfile.tempdir = saved


def run_demo(*, size_mb: float = 20, keep: str | None = None, as_json: bool = False) -> int:
    narrator = Narrator(quiet=as_json)
    logging.getLogger("kombu.connection").setLevel(logging.ERROR)  # the in-memory broker has no hostname
    with _private_tempdir() as scratch:
        backup_dir = str(Path(keep).resolve()) if keep else str(Path(scratch) / "backups")
        narrator.say("starting a throwaway PostgreSQL cluster (local binaries, 127.0.0.1, free port)")
        with ThrowawayCluster() as cluster:  # its own directory under TMPDIR, owned by the server user
            narrator.say(f"  up on port {cluster.port}; creating database 'aitrapp' with ~{size_mb:g} MB "
                         "of trading data")
            with connect(cluster.conninfo()) as admin:
                create_database(admin, "aitrapp")
            rows = generate(cluster.conninfo("aitrapp"), size_mb=size_mb)
            narrator.say("  " + ", ".join(f"{name} {count}" for name, count in rows.items()))
            env = {"DATABASE_URL": cluster.url("aitrapp"), "BACKUP_DIR": backup_dir,
                   "CELERY_BROKER_URL": "memory://", "CELERY_RESULT_BACKEND": "cache+memory://",
                   "BACKUP_LOCK_URL": "", "SENTRY_DSN": ""}
            with _environment(env):
                summary = _run_cycle(narrator)
            settings = Settings.from_env(env)
            health = check_health(settings)
            narrator.say(f"health: {'OK' if health.ok else 'UNHEALTHY: ' + '; '.join(health.problems)}")
            listing = catalog(open_storage(backup_dir))
            for manifest in listing:
                narrator.say(f"  catalog: {manifest.id}  {manifest.size_bytes} bytes  "
                             f"verified={'ok' if manifest.verified_ok else 'no'}  tables={len(manifest.tables)}")
            narrator.say("stopping the cluster and removing temporary files"
                         + (f"; backups kept in {backup_dir}" if keep else " (--keep DIR keeps the backups)"))
        if as_json:
            print(json.dumps({"ok": health.ok, "steps": summary, "backup_dir": backup_dir if keep else None,
                              "backups": [m.to_dict() for m in listing]}, indent=2, default=str))
        return 0 if health.ok else 1


def _run_cycle(narrator: Narrator) -> dict[str, Any]:
    """The post-close workflow through a worker in this process, sent and followed as ``enqueue --wait`` does."""
    from celery.contrib.testing.worker import start_worker

    from backup_tasks.worker.app import app
    from backup_tasks.worker.client import STEPS, follow, send_post_close
    from backup_tasks.worker.config import build_config

    app.conf.update(build_config())  # re-read the environment: in-memory broker and results
    settings = Settings.from_env()
    day = session_day(utcnow(), settings)
    names: dict[str, str] = {}
    shown: set[tuple[str, str]] = set()

    def narrate(task_id: str, state: str, info: Any) -> None:
        name = names.get(task_id, "post_close")
        if name in STEPS and (name, "") not in shown:
            shown.add((name, ""))
            narrator.say(f"{name} ({task_id[:8]}…)")
        if state == "SUCCESS" and name == "post_close" and isinstance(info, dict):
            names.update({step_id: step for step, step_id in (info.get("tasks") or {}).items()})
        elif state == "PROGRESS" and isinstance(info, dict) and (name, str(info.get("phase"))) not in shown:
            shown.add((name, str(info.get("phase"))))
            details = ", ".join(f"{k}={v}" for k, v in info.items() if k != "phase")
            narrator.say(f"  {name}: {info.get('phase')} ({details})")

    narrator.say("starting a Celery worker in this process (in-memory broker)")
    with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False, loglevel="WARNING"):
        narrator.say(f"post-close signal for trading day {day}: send_task('backup_tasks.post_close', ['{day}'])")
        outcome = follow(app, send_post_close(app, day).id, day, timeout=1800, on_state=narrate)
        if not outcome.ok:
            raise BackupError("the demo's workflow did not complete: " + "; ".join(outcome.problems))
        steps: dict[str, Any] = {"post_close": outcome.post_close.result if outcome.post_close else None}
        for name, step in outcome.steps.items():
            steps[name] = step.result
            narrator.say(f"  {name}: {_describe(name, step.result)}")
        narrator.say("stopping the worker")
    return steps


def _describe(name: str, result: dict[str, Any]) -> str:
    if name == "dump":
        return (f"{result['backup_id']} — {result['size_bytes']} bytes, {result['tables']} tables, "
                f"sha256 {result['sha256'][:16]}…")
    if name == "verify":
        return (f"restored into a throwaway cluster in {result['duration_seconds']:.1f}s; {result['tables_compared']} "
                f"tables match, {result['indexes_checked']} indexes checked ({', '.join(result['checked'])})")
    return f"retention kept {sum(d['keep'] for d in result['decisions'])}, deleted {len(result['deleted'])}"
