"""Tests of backup_tasks.worker: Celery workflow, beat schedule, Sentry and Flower."""
