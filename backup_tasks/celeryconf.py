"""Compatibility name: ``celeryconfig.py`` (ours, and copies of it in deployments) imports ``build_config`` from here.

The Celery configuration lives in ``backup_tasks.worker.config``.
"""

from backup_tasks.worker.config import build_config

__all__ = ["build_config"]
