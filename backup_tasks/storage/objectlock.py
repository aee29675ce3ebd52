"""S3 Object Lock as backup-tasks applies it: the retention every write carries, and what a bucket enforces.

``BACKUP_OBJECT_LOCK_DAYS=N`` (and ``BACKUP_OBJECT_LOCK_MODE``: ``GOVERNANCE``, the default, or
``COMPLIANCE``) make every object written to an ``s3://`` location (``BACKUP_DIR``,
``BACKUP_COPY_TO``, the WAL copy) carry a retention until N days after it was written.

Where the setting comes from: the environment, read by ``locations.open_storage`` each time it opens
a bucket, as boto3 reads the ``AWS_*`` variables. So every process that writes to a bucket applies
it without being handed ``Settings``: the workers and the CLI, and ``wal-push``, which PostgreSQL
runs with its own environment; there the assignments go in front of the command in
archive_command (``ObjectLock.environment`` gives them). A process that forgets them cannot write
unlocked objects by accident: ``S3Storage`` refuses to write to a bucket that has Object Lock
enabled but no default retention unless it was given a lock (``s3.protection.BucketGuard.before_write``).
``Settings.from_env`` validates the same variables with ``object_lock_from_env`` (exit 2 at start).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from backup_tasks.clock import utcnow
from backup_tasks.errors import ConfigError

DAYS_SETTING = "BACKUP_OBJECT_LOCK_DAYS"
MODE_SETTING = "BACKUP_OBJECT_LOCK_MODE"
#: GOVERNANCE: nobody deletes a version before its date unless allowed s3:BypassGovernanceRetention.
#: COMPLIANCE: nobody at all, the account's root user included, until the date.
LOCK_MODES = ("GOVERNANCE", "COMPLIANCE")
DEFAULT_MODE = "GOVERNANCE"


@dataclass(frozen=True)
class ObjectLock:
    """The retention every object written gets: ``mode`` until ``days`` days after it was written."""

    days: int
    mode: str = DEFAULT_MODE

    def __post_init__(self) -> None:
        if self.days < 1:
            raise ConfigError(f"{DAYS_SETTING} must be at least 1 (days), got {self.days}")
        if self.mode not in LOCK_MODES:
            raise ConfigError(f"{MODE_SETTING} must be GOVERNANCE or COMPLIANCE, got {self.mode!r}")

    def retain_until(self, written_at: datetime | None = None) -> datetime:
        return (written_at or utcnow()) + timedelta(days=self.days)

    def describe(self) -> str:
        return f"{self.mode}, {self.days} day{'s' if self.days != 1 else ''}"

    def environment(self) -> dict[str, str]:
        """The variables that carry this lock into a process started elsewhere (archive_command's wal-push)."""
        return {DAYS_SETTING: str(self.days), MODE_SETTING: self.mode}


def object_lock_from_env(env: Mapping[str, str]) -> ObjectLock | None:
    """``BACKUP_OBJECT_LOCK_DAYS`` / ``_MODE`` as an ``ObjectLock``; None when the days are unset (no lock)."""
    raw_days = env.get(DAYS_SETTING, "").strip()
    raw_mode = env.get(MODE_SETTING, "").strip()
    if not raw_days:
        if raw_mode:
            raise ConfigError(f"{MODE_SETTING} is set but {DAYS_SETTING} is not: set how many days each object "
                              f"stays locked (or unset {MODE_SETTING})")
        return None
    try:
        days = int(raw_days)
    except ValueError:
        raise ConfigError(f"{DAYS_SETTING} must be a whole number of days, got {raw_days!r}") from None
    return ObjectLock(days, raw_mode.upper() or DEFAULT_MODE)


@dataclass(frozen=True)
class BucketProtection:
    """What a bucket itself enforces, as ``check`` reports it per location.

    ``None`` for a field means the store would not say (no permission for the request, or an
    S3-compatible store that does not implement it).
    """

    bucket: str
    #: "Enabled", "Suspended" or "Off" (never enabled).
    versioning: str | None
    #: Whether Object Lock is enabled on the bucket (it can only be on together with versioning).
    object_lock: bool | None
    #: The bucket's own default retention ("GOVERNANCE, 30 days"), applied to objects written without one.
    default_retention: str | None = None

    def problems(self, lock: ObjectLock | None) -> list[str]:
        """Why objects written with ``lock`` would not be protected here: what to enable on the bucket."""
        if lock is None:
            return []
        found = []
        if self.object_lock is False:
            found.append(f"bucket {self.bucket} has no Object Lock configuration, so {DAYS_SETTING} cannot lock "
                         f"anything in it: Object Lock is enabled when a bucket is created (aws s3api create-bucket "
                         f"--bucket NAME --object-lock-enabled-for-bucket), or on an existing versioned bucket with "
                         f"aws s3api put-object-lock-configuration --bucket {self.bucket} "
                         f"--object-lock-configuration ObjectLockEnabled=Enabled")
        if self.versioning is not None and self.versioning != "Enabled":
            found.append(f"bucket {self.bucket} has versioning {self.versioning.lower()}: Object Lock protects "
                         f"object versions, enable it with aws s3api put-bucket-versioning --bucket {self.bucket} "
                         f"--versioning-configuration Status=Enabled")
        return found
