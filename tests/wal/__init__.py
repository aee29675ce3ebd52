"""Tests of backup_tasks.wal: the WAL archive."""
