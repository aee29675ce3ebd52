"""Tests of backup_tasks.postgres: connections and the one classifier of server and tool failures."""
