"""Tests of backup_tasks.storage: S3, mirrored locations and off-site copies."""
