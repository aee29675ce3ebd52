"""Tests of backup_tasks.logical: dump, verify and restore."""
