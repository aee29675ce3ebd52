"""Public name for applications that import this package: ``backup_tasks.enqueue.send_post_close``.

The client lives in ``backup_tasks.worker.client``; the trading app does not need this package at all
(see that module for the one-line ``send_task`` it can use instead).
"""

from backup_tasks.worker.client import send_post_close

__all__ = ["send_post_close"]
