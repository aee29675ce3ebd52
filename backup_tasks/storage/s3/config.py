"""Configuring a bucket location: where (``S3Location``), how (``S3Options``), as whom (``S3Credentials``),
and the boto3 clients made from them (``S3Clients``), at first use only.

boto3 costs ~0.3 s to import: it is imported by ``S3Clients`` when a request is first needed, never
by importing this package (``wal-push``'s fast path imports ``backup_tasks.storage`` modules).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from backup_tasks.errors import ConfigError, StorageError

if TYPE_CHECKING:
    from botocore.client import BaseClient


MIB = 1 << 20


DEFAULT_PART_SIZE = 8 * MIB


#: S3's minimum size for every part but the last.
MIN_PART_SIZE = 5 * MIB


@dataclass(frozen=True)
class S3Location:
    """``s3://bucket/prefix`` split into bucket and key prefix (``""`` or ending in ``/``)."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str, *, setting: str = "BACKUP_DIR") -> S3Location:
        url = url.strip()
        try:
            parts = urlsplit(url)
        except ValueError:
            raise ConfigError(f"{setting} is not a valid s3:// URL") from None
        if parts.scheme != "s3":
            raise ConfigError(f"{setting} must look like s3://BUCKET/PREFIX")
        if "@" in parts.netloc or parts.query or parts.fragment:
            # Never echo it: whatever sits before the @ may be a secret key.
            raise ConfigError(f"{setting} must be s3://BUCKET/PREFIX with nothing else in it; credentials "
                              f"come from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile, not the URL")
        bucket = parts.netloc
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{2,254}", bucket or ""):
            raise ConfigError(f"{setting} names no valid bucket (s3://BUCKET/PREFIX): {url}")
        segments = [s for s in parts.path.split("/") if s]
        if any(s in (".", "..") for s in segments):
            raise ConfigError(f"{setting} has '.' or '..' in its prefix: {url}")
        return cls(bucket=bucket, prefix="".join(f"{s}/" for s in segments))

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/") if self.prefix else f"s3://{self.bucket}"

    def full_key(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def object_key(self, key: str) -> str:
        """The full key of the object ``key``; a ``StorageError`` for a key that would leave the location."""
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise StorageError(f"refusing an object key outside the backup location: {key!r}")
        return self.full_key(key)

    def relative(self, full_key: str) -> str:
        """``full_key`` (as the bucket lists it) as our key, without the location's prefix."""
        return full_key[len(self.prefix):]


@dataclass(frozen=True)
class S3Options:
    """Tuning and the time bound. Defaults give up on a dead endpoint within 99 s, under two minutes."""

    part_size: int = DEFAULT_PART_SIZE
    max_concurrency: int = 2
    connect_timeout: float = 10.0
    read_timeout: float = 20.0
    max_attempts: int = 3  # in total, the first one included (botocore's total_max_attempts)

    def __post_init__(self) -> None:
        if self.part_size < MIN_PART_SIZE:
            raise ConfigError(f"the S3 part size must be at least 5 MiB (S3's minimum), got {self.part_size}")
        if self.max_concurrency < 1 or self.max_attempts < 1:
            raise ConfigError("S3 concurrency and attempts must be at least 1")

    @property
    def worst_case_seconds(self) -> float:
        """Longest one call can take against an endpoint that never answers.

        Per attempt: the connect timeout, one second waiting for ``100 Continue`` before a body is
        sent, and the read timeout; between attempts, standard mode's jittered backoff (≤ 2^n s).
        """
        backoff = sum(min(2.0**n, 20.0) for n in range(1, self.max_attempts))
        return self.max_attempts * (self.connect_timeout + 1.0 + self.read_timeout) + backoff


@dataclass(frozen=True)
class S3Credentials:
    """Credentials other than the default chain's: a profile, or a key pair (prune's own, BACKUP_PRUNE_AWS_*)."""

    profile: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)
    #: The setting they came from, named in messages.
    setting: str = "BACKUP_PRUNE_AWS_PROFILE"

    def session_args(self) -> dict[str, str]:
        if self.profile:
            return {"profile_name": self.profile}
        return {"aws_access_key_id": self.access_key_id or "", "aws_secret_access_key": self.secret_access_key or ""}


class S3Clients:
    """The boto3 clients of one location, each made at its first use and then shared by every thread.

    ``client`` makes every request with the options' timeouts and attempts; ``cleanup`` makes one
    quick attempt, for aborting after a failure (which must not add another full timeout budget).
    Making a client also notes the secret key and session token in use, for scrubbing (``secrets``).
    """

    def __init__(self, location: S3Location, options: S3Options, credentials: S3Credentials | None = None) -> None:
        self.location = location
        self.options = options
        self.credentials = credentials
        self._client: BaseClient | None = None
        self._cleanup: BaseClient | None = None
        self._lock = threading.Lock()
        self._secrets: list[str] = []

    @property
    def client(self) -> BaseClient:
        with self._lock:
            if self._client is None:
                opts = self.options
                self._client = self._make(attempts=opts.max_attempts, connect_timeout=opts.connect_timeout,
                                          read_timeout=opts.read_timeout)
            return self._client

    @property
    def cleanup(self) -> BaseClient:
        with self._lock:
            if self._cleanup is None:
                self._cleanup = self._make(attempts=1, connect_timeout=min(5.0, self.options.connect_timeout),
                                           read_timeout=min(10.0, self.options.read_timeout))
            return self._cleanup

    @property
    def endpoint(self) -> str:
        """Where requests go (``scheme://host:port``), for messages; never carries credentials."""
        try:
            parts = urlsplit(self.client.meta.endpoint_url)
            return f"{parts.scheme}://{parts.hostname}{':' + str(parts.port) if parts.port else ''}"
        except Exception:
            return "the S3 endpoint"

    def secrets(self) -> list[str]:
        """The secret key and session token in use (known once a client is made)."""
        return list(self._secrets)

    def _make(self, *, attempts: int, connect_timeout: float, read_timeout: float) -> BaseClient:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ProfileNotFound

        try:
            session = boto3.session.Session(**(self.credentials.session_args() if self.credentials else {}))
            config = Config(connect_timeout=connect_timeout, read_timeout=read_timeout,
                            retries={"total_max_attempts": attempts, "mode": "standard"},
                            max_pool_connections=max(10, self.options.max_concurrency + 4),
                            user_agent_extra="backup-tasks")
            client = session.client("s3", config=config)
        except ProfileNotFound as exc:
            source = self.credentials.setting if self.credentials and self.credentials.profile else "AWS_PROFILE"
            raise ConfigError(f"AWS profile {exc.kwargs.get('profile')!r} ({source}) is not in the AWS "
                              f"config files") from None
        except (BotoCoreError, ValueError) as exc:
            raise ConfigError(f"the AWS settings for {self.location.url} are not usable: "
                              f"{type(exc).__name__}") from None
        try:
            credentials = session.get_credentials()
            if credentials is not None:
                frozen = credentials.get_frozen_credentials()
                self._secrets = [s for s in (frozen.secret_key, frozen.token) if s]
        except Exception:
            pass  # only wanted for scrubbing; the first request reports unusable credentials properly
        return client
