"""archive_command as printed by ``check``: the Object Lock travels with it to the server's wal-push."""

from __future__ import annotations

import shlex
from pathlib import Path

from backup_tasks.postgres.servercmd import archive_command
from backup_tasks.storage.objectlock import ObjectLock, object_lock_from_env


def test_a_locked_bucket_copy_puts_the_lock_in_front_of_wal_push() -> None:
    lock = ObjectLock(days=30, mode="COMPLIANCE")
    line = archive_command(["/opt/bt/bin/backup-tasks"], Path("/backups/wal"), "s3://vault/prod", lock=lock)
    words = shlex.split(line)
    assignments = dict(word.split("=", 1) for word in words[:2])
    assert object_lock_from_env(assignments) == lock  # what wal-push reads from its environment
    assert words[2:5] == ["/opt/bt/bin/backup-tasks", "wal-push", "--archive-dir"] and words[-1] == "%p"
    # No bucket copy, or no lock: nothing in front.
    for copy_to, with_lock in (("/mnt/offsite", lock), ("s3://vault/prod", None), (None, lock)):
        assert archive_command(["bt"], Path("/backups/wal"), copy_to, lock=with_lock).startswith("bt wal-push")
