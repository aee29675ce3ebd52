"""Tests of backup_tasks.cli."""
