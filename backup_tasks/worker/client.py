"""Sending the post-close message, and following the workflow it starts.

The trading app does not need this package to trigger a backup: the message is a task *name*, one
ISO-date argument and a queue, which any Celery client can send::

    Celery(broker=REDIS_URL).send_task("backup_tasks.post_close", args=["2026-11-27"], queue="backups")

``send_post_close`` is that one-liner for code that does import ``backup_tasks``
(``backup_tasks.enqueue.send_post_close``); ``follow`` waits for the tasks it started. Neither
imports the worker's application or tasks: a client needs the broker URL, nothing else.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo

from celery import Celery
from celery.result import AsyncResult

from backup_tasks.catalog.tradingday import parse_day
from backup_tasks.conninfo import redact_url
from backup_tasks.errors import BrokerUnavailable
from backup_tasks.worker.config import QUEUE

POST_CLOSE = "backup_tasks.post_close"


STEPS = ("dump", "verify", "prune")


#: Seconds to wait for a TCP connect or a reply from Redis before calling it unreachable.
CONNECT_TIMEOUT = 3.0


#: Three publish attempts at most: an unreachable broker fails the command in well under 20 s.
PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0.5, "interval_step": 1.5, "interval_max": 3.0}


POLL_INTERVAL = 0.5


OK_STATE = "SUCCESS"


FAILED_STATES = frozenset({"FAILURE", "REVOKED", "REJECTED"})


def client_app(broker_url: str, result_backend: str | None = None) -> Celery:
    """A minimal Celery client: JSON only, bounded connection attempts, no task modules."""
    # No backend: a sender needs the broker only. (Celery still prefers CELERY_BROKER_URL and
    # CELERY_RESULT_BACKEND from the environment over these arguments when they are set.)
    app = Celery("backup_tasks_client", broker=broker_url, backend=result_backend or "disabled", set_as_current=False)
    app.conf.update(
        task_serializer="json", result_serializer="json", accept_content=["json"], result_accept_content=["json"],
        broker_connection_timeout=CONNECT_TIMEOUT,
        broker_transport_options={"socket_connect_timeout": CONNECT_TIMEOUT, "socket_timeout": CONNECT_TIMEOUT},
        redis_socket_connect_timeout=CONNECT_TIMEOUT,
        redis_socket_timeout=CONNECT_TIMEOUT * 5,
        result_backend_transport_options={"retry_policy": PUBLISH_RETRY},
        task_publish_retry_policy=PUBLISH_RETRY,
        task_send_sent_event=True,  # Flower then shows the message as sent before a worker takes it
    )
    return app


def today(timezone: str | ZoneInfo = "Asia/Kolkata") -> str:
    """Today's date where the exchange is, not where this machine is."""
    zone = timezone if isinstance(timezone, ZoneInfo) else ZoneInfo(timezone)
    return datetime.now(zone).date().isoformat()


def send_post_close(app_or_broker_url: Celery | str, day: str | date | None = None, *,
                    timezone: str = "Asia/Kolkata", result_backend: str | None = None) -> AsyncResult:
    """Enqueue ``backup_tasks.post_close`` for ``day`` (default: today in ``timezone``); returns its result handle.

    ``app_or_broker_url`` is the caller's own Celery app or a broker URL such as the trading app's
    ``REDIS_URL`` (results are then read from ``result_backend``, by default that same Redis, as the
    workers write them). Raises ``BrokerUnavailable`` when the broker cannot be reached (nothing was sent).
    """
    if isinstance(day, datetime):
        day = day.date()
    trading_day = parse_day(day.isoformat() if isinstance(day, date) else day) if day else today(timezone)
    if isinstance(app_or_broker_url, str):
        app = client_app(app_or_broker_url, result_backend or app_or_broker_url)
    else:
        app = app_or_broker_url
    return send(app, trading_day)


def send(app: Celery, day: str) -> AsyncResult:
    try:
        # Reach the broker first, so that a dead broker is reported as such (Celery would otherwise
        # first try the result backend, usually the same dead Redis, and blame that).
        with app.connection_for_write() as connection:
            connection.ensure_connection(**PUBLISH_RETRY)
        return app.send_task(POST_CLOSE, args=[day], queue=QUEUE, retry=True, retry_policy=PUBLISH_RETRY)
    except Exception as exc:
        if is_connection_error(exc):
            where = redact_url(str(app.conf.broker_url))
            raise BrokerUnavailable(f"cannot reach the Celery broker at {where} ({first_error_line(exc)}); nothing was "
                                    f"sent. Is Redis running, and is CELERY_BROKER_URL right?") from None
        if isinstance(exc, RuntimeError) and "result store" in str(exc):
            # Celery subscribes to the result before publishing (CELERY_RESULT_BACKEND wins over our
            # settings when it is in the environment), so this too means nothing was sent.
            where = redact_url(str(app.conf.result_backend))
            raise BrokerUnavailable(f"cannot reach the Celery result backend at {where}; nothing was sent. "
                                    f"Is CELERY_RESULT_BACKEND right?") from None
        raise


def is_connection_error(exc: BaseException) -> bool:
    from kombu.exceptions import OperationalError

    try:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError
    except ImportError:  # pragma: no cover - redis is a dependency
        return isinstance(exc, OperationalError | OSError)
    return isinstance(exc, OperationalError | OSError | RedisConnectionError | RedisTimeoutError)


def first_error_line(exc: BaseException) -> str:
    text = redact_url(str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass
class StepOutcome:
    """What became of one task: its final state and result (or error)."""

    task_id: str
    state: str
    result: Any = None
    error: str | None = None
    error_type: str | None = None

    @property
    def ok(self) -> bool:
        return self.state == OK_STATE

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"task_id": self.task_id, "state": self.state}
        if self.error is not None:
            out.update(error=self.error, error_type=self.error_type)
        else:
            out["result"] = self.result
        return out


@dataclass
class WorkflowOutcome:
    task_id: str
    trading_day: str
    status: str = "pending"  # complete | skipped | failed | timeout
    post_close: StepOutcome | None = None
    steps: dict[str, StepOutcome] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status in ("complete", "skipped") and not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "trading_day": self.trading_day, "ok": self.ok, "status": self.status,
                "problems": self.problems, "post_close": self.post_close.to_dict() if self.post_close else None,
                "steps": {name: step.to_dict() for name, step in self.steps.items()}}


def wait_for_step(app: Celery, task_id: str, deadline: float, *, on_state: Any = None) -> StepOutcome:
    """Poll the result backend until the task is done or ``deadline`` (monotonic) passes."""
    result = app.AsyncResult(task_id)
    last = None
    try:
        while True:
            state = result.state
            if state != last and on_state is not None:
                on_state(task_id, state, result.info if state not in FAILED_STATES else None)
            last = state
            if state == OK_STATE:
                return StepOutcome(task_id, state, result=result.result)
            if state in FAILED_STATES:
                error = result.result
                return StepOutcome(task_id, state, error=first_error_line(error) if isinstance(error, BaseException)
                                   else str(error), error_type=type(error).__name__)
            if time.monotonic() >= deadline:
                return StepOutcome(task_id, "TIMEOUT", error=f"still {state} when the wait ended", error_type="Timeout")
            time.sleep(POLL_INTERVAL)
    except Exception as exc:
        if is_connection_error(exc) or "result store" in str(exc):
            raise BrokerUnavailable(f"lost the result backend while waiting for task {task_id}: "
                                    f"{first_error_line(exc)}; "
                                    f"the workflow may still be running") from None
        raise


def follow(app: Celery, task_id: str, day: str, timeout: float, *, on_state: Any = None) -> WorkflowOutcome:
    """Wait for post_close, then for the dump, verify and prune tasks it names."""
    deadline = time.monotonic() + timeout
    outcome = WorkflowOutcome(task_id=task_id, trading_day=day)
    outcome.post_close = wait_for_step(app, task_id, deadline, on_state=on_state)
    if not outcome.post_close.ok:
        outcome.status = "timeout" if outcome.post_close.state == "TIMEOUT" else "failed"
        outcome.problems.append(f"post_close {outcome.post_close.state}: {outcome.post_close.error}")
        return outcome
    started = outcome.post_close.result if isinstance(outcome.post_close.result, dict) else {}
    tasks = started.get("tasks") or {}
    for name in STEPS:
        if name in tasks:
            step = wait_for_step(app, tasks[name], deadline, on_state=on_state)
            outcome.steps[name] = step
            if not step.ok:
                outcome.problems.append(f"{name} {step.state}: {step.error}")
    if started.get("verified") is False and not tasks:
        outcome.problems.append(f"the day's backup {started.get('backup_id')} failed verification")
    if any(step.state == "TIMEOUT" for step in outcome.steps.values()):
        outcome.status = "timeout"
    elif outcome.problems:
        outcome.status = "failed"
    else:
        outcome.status = "skipped" if started.get("status") == "skipped" else "complete"
    return outcome
