"""Tests of backup_tasks.streams: age encryption and compression."""
