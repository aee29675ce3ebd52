"""The one exception tree of backup-tasks.

Every failure a user can act on has its own type. Each type says whether retrying can help
(``retryable``) and which exit code the CLI uses, so Celery's retry policy and the CLI's exit codes
follow from the type rather than from matching message strings. Messages never contain secrets:
callers pass redacted URLs only.

One base per subsystem, so a caller can catch a whole family::

    BackupError
      ConfigError                  settings and usage (exit 2): SystemMismatch, ClockAhead
      PostgresError                the server and its tools: SourceUnavailable (retry), AuthenticationFailed,
                                   DatabaseMissing, ToolMissing, ClusterError
      StorageError                 where backups live: StorageFull, StorageUnavailable (retry), StorageAuthFailed,
                                   BucketMissing, ObjectMissing, ObjectLocked, StorageReadOnly, and the WAL
                                   archive's WalArchiveError (WalConflict, WalMissing, WalGap)
      BackupFailed                 taking a backup: DumpFailed, SnapshotFailed, BackupIdTaken
      IntegrityError               what is stored: BackupNotFound, BackupCorrupt (WalCorrupt), VerificationFailed,
                                   HealthCheckFailed
      RestoreError                 RestoreRefused (TargetOutOfRange, RolesMissing), RestoreFailed
      CryptoError                  IdentityUnusable, EncryptionFailed
      CoordinationError            LockBusy, LockLost, LockServerUnavailable, BrokerUnavailable (all retry)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from datetime import datetime


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


def retryable_errors() -> tuple[type[BackupError], ...]:
    """Every error type whose ``retryable`` flag is set: Celery's ``autoretry_for``."""
    found: list[type[BackupError]] = []
    pending: list[type[BackupError]] = [BackupError]
    while pending:
        cls = pending.pop()
        if cls.retryable and cls not in found:
            found.append(cls)
        pending.extend(cls.__subclasses__())
    return tuple(found)


class ConfigError(BackupError):
    """A setting is missing or malformed (bad URL, unknown compression, bad schedule)."""

    exit_code = 2


class SystemMismatch(ConfigError):
    """A catalog or WAL archive belongs to another PostgreSQL system (another system identifier): nothing written."""


class ClockAhead(ConfigError):
    """This host's clock is implausibly ahead of what a backup location itself timestamped: prune deletes nothing."""


# --- PostgreSQL and its tools ----------------------------------------------------------------------

class PostgresError(BackupError):
    """The database server, or a PostgreSQL binary, failed us."""


class SourceUnavailable(PostgresError):
    """The database server cannot be reached right now (refused, timed out, starting up)."""

    retryable = True


class AuthenticationFailed(PostgresError):
    """The server rejected the credentials; retrying with the same ones cannot help."""


class DatabaseMissing(PostgresError):
    """The named database does not exist on the server."""


class ToolMissing(PostgresError):
    """A required PostgreSQL client binary (pg_dump, pg_restore, initdb...) is not installed."""


class ClusterError(PostgresError):
    """A throwaway PostgreSQL cluster could not be created or started."""


# --- storage (BACKUP_DIR, BACKUP_COPY_TO) and the WAL archive ------------------------------------------

class StorageError(BackupError):
    """Writing or reading the backup storage failed."""


class StorageFull(StorageError):
    """No space left where the backup is written; the partial file has been removed."""


class StorageUnavailable(StorageError):
    """The storage endpoint did not answer (refused, timed out, 5xx) within the bounded retries."""

    retryable = True


class StorageAuthFailed(StorageError):
    """The storage rejected the credentials (unknown key, bad signature, access denied, none found)."""


class BucketMissing(StorageError):
    """The bucket named in the storage URL does not exist."""


class ObjectMissing(StorageError):
    """The requested object is not in this storage location."""


class ObjectLocked(StorageError):
    """An object cannot be deleted before its S3 Object Lock retention ends: expected, not damage; delete it later.

    ``retain_until`` (aware UTC) is when the last lock on it ends; a run after that can delete it.
    """

    def __init__(self, message: str, retain_until: datetime) -> None:
        super().__init__(message)
        self.retain_until = retain_until

    def __reduce__(self) -> tuple[type[ObjectLocked], tuple[str, datetime]]:
        return type(self), (self.message, self.retain_until)  # pickles (Celery, multiprocessing) with its date


class StorageReadOnly(StorageError):
    """A location opened as of a past time (``--as-of``) only reads: writing or deleting through it is refused."""

    exit_code = 2


class WalArchiveError(StorageError):
    """The WAL archive cannot be written or read (missing directory, permissions, bad name)."""


class WalConflict(WalArchiveError):
    """A segment is already archived with different content: two servers share an archive, or worse."""


class WalMissing(WalArchiveError):
    """The requested WAL file is not in the archive (the normal end of the archive for recovery)."""


class WalGap(WalArchiveError):
    """A WAL segment is missing although later ones are archived: recovery past it is impossible."""


# --- taking a backup -------------------------------------------------------------------------------

class BackupFailed(BackupError):
    """Taking a backup failed; nothing was kept."""


class DumpFailed(BackupFailed):
    """pg_dump exited with an error; nothing was kept."""


class SnapshotFailed(BackupFailed):
    """pg_basebackup or pg_verifybackup failed; nothing was kept."""


class BackupIdTaken(BackupFailed):
    """A backup with this id is already in the catalog; its manifest was left untouched."""


# --- what is stored ---------------------------------------------------------------------------------

class IntegrityError(BackupError):
    """A backup is missing, damaged or does not restore to what was backed up."""


class BackupNotFound(IntegrityError):
    """No backup with the requested id (or no backup at all) is in the catalog."""


class BackupCorrupt(IntegrityError):
    """A stored backup does not match its manifest (checksum, size, unreadable archive)."""


class WalCorrupt(BackupCorrupt):
    """An archived WAL file fails its checksum or cannot be decompressed."""


class VerificationFailed(IntegrityError):
    """The backup restored, but the restored database differs from what was backed up."""


class HealthCheckFailed(IntegrityError):
    """The catalog is unhealthy: no recent backup, an empty one, or one that failed verification."""


# --- restoring --------------------------------------------------------------------------------------

class RestoreError(BackupError):
    """A restore did not happen or did not finish."""


class RestoreRefused(RestoreError):
    """The restore target is not safe to write to (not empty, or it is the source)."""


class TargetOutOfRange(RestoreRefused):
    """The requested recovery target lies outside what the snapshots and the WAL archive cover."""


class RolesMissing(RestoreRefused):
    """Roles the backup needs (owners, grantees, policy roles) do not exist on the target server: nothing was
    written. ``--with-roles`` creates them, ``--no-owner`` restores without them. ``roles`` names them."""

    def __init__(self, message: str, roles: list[str]) -> None:
        super().__init__(message)
        self.roles = roles

    def __reduce__(self) -> tuple[type[RolesMissing], tuple[str, list[str]]]:
        return type(self), (self.message, self.roles)


class RestoreFailed(RestoreError):
    """pg_restore or the restored server failed."""


# --- encryption --------------------------------------------------------------------------------------

class CryptoError(BackupError):
    """Encryption or decryption keys are missing or wrong."""


class IdentityUnusable(CryptoError):
    """No usable age identity: not configured, unreadable, malformed, or not one the backup was encrypted to."""


class EncryptionFailed(CryptoError):
    """Encrypting a stream failed (not a storage error: those keep their own type)."""


# --- coordination: locks and the broker ---------------------------------------------------------------

class CoordinationError(BackupError):
    """Another run, a lock or the message broker stands in the way."""


class LockBusy(CoordinationError):
    """Another run holds the lock for the same database; try again later."""

    retryable = True


class BrokerUnavailable(CoordinationError):
    """The Celery broker (or result backend) cannot be reached: nothing was sent, or the outcome is unknown."""

    retryable = True


class LockLost(CoordinationError):
    """This run lost its lock (it expired, or the lock server stopped answering) and stopped before committing."""

    retryable = True


class LockServerUnavailable(CoordinationError):
    """The lock server (Redis) cannot be reached, and the deployment is not declared single-host."""

    retryable = True
