"""Tests of backup_tasks.catalog: retention, health and pruning."""
