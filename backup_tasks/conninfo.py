"""A PostgreSQL connection target parsed from the URL forms the trading app writes; redaction of secrets.

The password never appears in a repr or a message: ``redacted()`` and ``redact_url`` are what
messages use; the password travels only in psycopg's arguments or a child's ``PGPASSWORD``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from urllib.parse import parse_qsl, unquote, urlsplit

from backup_tasks.errors import ConfigError

#: URL schemes the trading app and its tools write; the driver suffix is irrelevant to libpq.
POSTGRES_SCHEMES = frozenset(
    {"postgresql", "postgres", "postgresql+psycopg2", "postgresql+psycopg", "postgresql+asyncpg",
     "postgresql+pg8000", "postgres+psycopg2"}
)


@dataclass(frozen=True)
class ConnInfo:
    """A PostgreSQL connection target, parsed from a URL; the password never appears in repr."""

    host: str | None
    port: int | None
    dbname: str
    user: str | None
    password: str | None = field(default=None, repr=False)
    options: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_url(cls, url: str, *, setting: str = "DATABASE_URL") -> ConnInfo:
        url = url.strip()
        if not url:
            raise ConfigError(f"{setting} is empty; set it to postgresql://USER@HOST:PORT/DATABASE")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"{setting} is not a valid URL ({exc}): {redact_url(url)}") from None
        if parts.scheme.lower() not in POSTGRES_SCHEMES:
            raise ConfigError(
                f"{setting} must start with postgresql:// (or postgres://, postgresql+psycopg2://, "
                f"postgresql+psycopg://), got {parts.scheme or 'no scheme'!r}: {redact_url(url)}"
            )
        dbname = unquote(parts.path.lstrip("/"))
        query = dict(parse_qsl(parts.query))
        # libpq allows host and dbname in the query string (postgresql:///db?host=/run/postgresql).
        host = unquote(parts.hostname) if parts.hostname else query.pop("host", None)
        dbname = dbname or query.pop("dbname", "")
        if not dbname:
            raise ConfigError(f"{setting} names no database (…/DATABASE at the end): {redact_url(url)}")
        if "/" in dbname:
            raise ConfigError(f"{setting} has a malformed database name {dbname!r}: {redact_url(url)}")
        user = unquote(parts.username) if parts.username else query.pop("user", None)
        password = unquote(parts.password) if parts.password is not None else query.pop("password", None)
        if "port" in query:
            try:
                port = int(query.pop("port"))
            except ValueError:
                raise ConfigError(f"{setting} has a non-numeric port: {redact_url(url)}") from None
        return cls(host=host, port=port, dbname=dbname, user=user, password=password,
                   options=tuple(sorted(query.items())))

    def with_dbname(self, dbname: str) -> ConnInfo:
        return replace(self, dbname=dbname)

    def with_connect_timeout(self, seconds: int) -> ConnInfo:
        """This connection with ``connect_timeout`` set, unless the URL sets its own: a probe must not hang."""
        if any(name == "connect_timeout" for name, _ in self.options):
            return self
        return replace(self, options=(*self.options, ("connect_timeout", str(seconds))))

    def kwargs(self) -> dict[str, str]:
        """Keyword arguments for ``psycopg.connect`` (password included: never log these)."""
        out: dict[str, str] = dict(self.options)
        out["dbname"] = self.dbname
        if self.host:
            out["host"] = self.host
        if self.port:
            out["port"] = str(self.port)
        if self.user:
            out["user"] = self.user
        if self.password is not None:
            out["password"] = self.password
        out.setdefault("connect_timeout", "10")
        out.setdefault("application_name", "backup-tasks")
        return out

    def libpq_env(self) -> dict[str, str]:
        """Environment for libpq tools (pg_dump, pg_restore): the password travels here, never on argv."""
        names = {"host": "PGHOST", "port": "PGPORT", "dbname": "PGDATABASE", "user": "PGUSER",
                 "password": "PGPASSWORD", "sslmode": "PGSSLMODE", "sslrootcert": "PGSSLROOTCERT",
                 "sslcert": "PGSSLCERT", "sslkey": "PGSSLKEY", "connect_timeout": "PGCONNECT_TIMEOUT",
                 "application_name": "PGAPPNAME", "options": "PGOPTIONS", "passfile": "PGPASSFILE",
                 "target_session_attrs": "PGTARGETSESSIONATTRS"}
        return {names[k]: v for k, v in self.kwargs().items() if k in names}

    @property
    def server_label(self) -> str:
        """Where the database lives, for manifests and messages: ``host:port`` without user or password."""
        return f"{self.host or 'local socket'}:{self.port or 5432}"

    def redacted(self) -> str:
        user = f"{self.user}@" if self.user else ""
        return f"postgresql://{user}{self.host or ''}{':' + str(self.port) if self.port else ''}/{self.dbname}"


_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@\s]*)@")
#: ``user:password@host`` without a scheme, as the seed script hands it to pg_dump.
_BARE_USERINFO = re.compile(r"(?<![\w/:@])(?P<user>[\w.%+-]+):(?P<pw>[^@\s/:]+)@(?=[\w.\[])")
_QUERY_PW = re.compile(r"(?i)((?:password|secret|token|key)=)[^&\s]+")


def redact_url(text: str) -> str:
    """Replace the password part of every URL in ``text`` with ``***`` (any scheme)."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    text = _BARE_USERINFO.sub(lambda m: f"{m['user']}:***@", text)
    return _QUERY_PW.sub(r"\1***", text)
