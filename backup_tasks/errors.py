"""The one exception tree of backup-tasks.

Every failure a user can act on has its own type. Each type says whether retrying can help
(``retryable``) and which exit code the CLI uses, so Celery's retry policy and the CLI's exit codes
follow from the type rather than from matching message strings. Messages never contain secrets:
callers pass redacted URLs only.
"""

from __future__ import annotations


class BackupError(Exception):
    """Root of every error this package raises on purpose."""

    #: Whether trying the same operation again later can succeed without anyone changing anything.
    retryable: bool = False
    #: Exit code of the CLI: 1 for "the operation or check failed", 2 for usage/configuration.
    exit_code: int = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(BackupError):
    """A setting is missing or malformed (bad URL, unknown compression, bad schedule)."""

    exit_code = 2


class SourceUnavailable(BackupError):
    """The database server cannot be reached right now (refused, timed out, starting up)."""

    retryable = True


class AuthenticationFailed(BackupError):
    """The server rejected the credentials; retrying with the same ones cannot help."""


class DatabaseMissing(BackupError):
    """The named database does not exist on the server."""


class ToolMissing(BackupError):
    """A required PostgreSQL client binary (pg_dump, pg_restore, initdb...) is not installed."""


class StorageError(BackupError):
    """Writing or reading the backup storage failed."""


class StorageFull(StorageError):
    """No space left where the backup is written; the partial file has been removed."""


class DumpFailed(BackupError):
    """pg_dump exited with an error; nothing was kept."""


class BackupNotFound(BackupError):
    """No backup with the requested id (or no backup at all) is in the catalog."""


class BackupCorrupt(BackupError):
    """A stored backup does not match its manifest (checksum, size, unreadable archive)."""


class VerificationFailed(BackupError):
    """The backup restored, but the restored database differs from what was backed up."""


class RestoreRefused(BackupError):
    """The restore target is not safe to write to (not empty, or it is the source)."""


class RestoreFailed(BackupError):
    """pg_restore or the restored server failed."""


class LockBusy(BackupError):
    """Another run holds the lock for the same database; try again later."""

    retryable = True


class ClusterError(BackupError):
    """A throwaway PostgreSQL cluster could not be created or started."""


class HealthCheckFailed(BackupError):
    """The catalog is unhealthy: no recent backup, an empty one, or one that failed verification."""


def retryable_errors() -> tuple[type[BackupError], ...]:
    """Every error type whose ``retryable`` flag is set: Celery's ``autoretry_for``."""
    found: list[type[BackupError]] = []
    pending: list[type[BackupError]] = [BackupError]
    while pending:
        cls = pending.pop()
        if cls.retryable:
            found.append(cls)
        pending.extend(cls.__subclasses__())
    return tuple(found)


class StorageUnavailable(StorageError):
    """The storage endpoint did not answer (refused, timed out, 5xx) within the bounded retries."""

    retryable = True


class StorageAuthFailed(StorageError):
    """The storage rejected the credentials (unknown key, bad signature, access denied, none found)."""


class BucketMissing(StorageError):
    """The bucket named in the storage URL does not exist."""


class ObjectMissing(StorageError):
    """The requested object is not in this storage location."""


class IdentityUnusable(BackupError):
    """No usable age identity: not configured, unreadable, malformed, or not one the backup was encrypted to."""


class EncryptionFailed(BackupError):
    """Encrypting a stream failed (not a storage error: those keep their own type)."""


class BrokerUnavailable(BackupError):
    """The Celery broker (or result backend) cannot be reached: nothing was sent, or the outcome is unknown."""

    retryable = True


class SnapshotFailed(BackupError):
    """pg_basebackup or pg_verifybackup failed; nothing was kept."""


class WalArchiveError(StorageError):
    """The WAL archive cannot be written or read (missing directory, permissions, bad name)."""


class WalConflict(WalArchiveError):
    """A segment is already archived with different content: two servers share an archive, or worse."""


class WalMissing(WalArchiveError):
    """The requested WAL file is not in the archive (the normal end of the archive for recovery)."""


class WalGap(WalArchiveError):
    """A WAL segment is missing although later ones are archived: recovery past it is impossible."""


class WalCorrupt(BackupCorrupt):
    """An archived WAL file fails its checksum or cannot be decompressed."""


class TargetOutOfRange(RestoreRefused):
    """The requested recovery target lies outside what the snapshots and the WAL archive cover."""
