"""Tests of backup_tasks.physical: snapshots and point-in-time recovery."""
