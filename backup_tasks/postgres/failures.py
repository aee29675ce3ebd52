"""The one classifier of PostgreSQL failures: libpq connection errors and the stderr of pg_dump & co.

Every path that talks to a server (``connect``, pg_dump, pg_basebackup, pg_restore, verify's
connections) hands what went wrong to ``classify``, so a missing role is ``AuthenticationFailed``
and an unknown host a ``ConfigError`` whichever tool met it, and Celery retries only what a retry
can fix. What is not a connection problem becomes the caller's ``fallback`` (``DumpFailed``,
``SnapshotFailed``, ``RestoreFailed``...).

Categories, first match wins (English server and libpq messages):

* replication not allowed (pg_hba.conf has no replication line, no REPLICATION attribute,
  ``max_wal_senders = 0``): the caller's ``fallback``, with the line to add or the setting to change;
* authentication (wrong or missing password, ``role "x" does not exist``, peer/ident/cert/...
  authentication failed, no pg_hba.conf entry, SCRAM and channel-binding failures, no CONNECT
  privilege): ``AuthenticationFailed``;
* ``database "x" does not exist``: ``DatabaseMissing``;
* a host name the resolver does not know: ``ConfigError("unknown host ...")`` (a *temporary*
  resolver failure is ``SourceUnavailable``: the same name may resolve in a minute);
* malformed connection settings (invalid option, value, integer, port) and TLS set-up errors:
  ``ConfigError``;
* the server cannot be reached or went away (refused, timeout, starting up, shutting down, too
  many clients, connection closed or terminated, any other failed connection attempt):
  ``SourceUnavailable`` (retryable);
* anything else: ``fallback``.

Messages are one line: the tool, the redacted target (``ConnInfo.redacted()``, never a
password), the server's reason and what to do.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from backup_tasks.conninfo import ConnInfo, redact_url
from backup_tasks.errors import AuthenticationFailed, BackupError, ConfigError, DatabaseMissing, SourceUnavailable

#: Builds the error for what is not a connection problem, from the one-line message.
Fallback = Callable[[str], BackupError]


_REPLICATION_HBA = re.compile(r"no pg_hba\.conf entry for replication connection|"
                              r"pg_hba\.conf rejects replication connection")
_REPLICATION_ROLE = re.compile(r"must be superuser or replication role|permission denied to start WAL sender|"
                               r"must have the REPLICATION attribute")
_NO_WAL_SENDERS = re.compile(r"exceeds max_wal_senders \(currently 0\)")
# Role and database are FATAL at connection time; pg_restore's `ERROR:  role "x" does not exist`
# (an owner missing on the target) is a failed restore, not a failed login.
_AUTHENTICATION = re.compile(
    r"password authentication failed|no password supplied|authentication failed for user|"
    r"FATAL:\s+role \"[^\"]*\" does not exist|FATAL:\s+role \"[^\"]*\" is not permitted to log in|"
    r"FATAL:\s+permission denied for database|no pg_hba\.conf entry for host|pg_hba\.conf rejects connection|"
    r"SCRAM (?:authentication|message|response|exchange)|invalid SCRAM|malformed SCRAM|server signature|"
    r"channel binding (?:is )?required|authentication method \S+ not supported")
_DATABASE_MISSING = re.compile(r"FATAL:\s+database \"(?P<name>[^\"]*)\" does not exist|"
                               r"no such database: (?P<other>\S+)")
_UNKNOWN_HOST = re.compile(r"could not translate host name|failed to resolve host|Name or service not known|"
                           r"nodename nor servname|No address associated with hostname|"
                           r"Temporary failure in name resolution")
_DNS_TEMPORARY = re.compile(r"Temporary failure in name resolution", re.IGNORECASE)
_BAD_SETTING = re.compile(r"invalid connection option|invalid integer value|invalid \S+ value: |"
                          r"invalid port number|invalid URI|invalid percent-encoded token|missing \"=\" after|"
                          r"could not match \d+ host names")
_TLS_SETUP = re.compile(r"does not support SSL, but SSL was required|certificate verify failed|"
                        r"root certificate file|server certificate for|certificate present, but not private key|"
                        r"private key file")
_BUSY = re.compile(
    r"the database system is (?:starting up|shutting down|in recovery mode|not yet accepting connections|"
    r"not accepting connections)|too many clients|remaining connection slots are reserved|"
    r"too many connections for role|exceeds max_wal_senders|terminating connection due to")
_UNAVAILABLE = re.compile(
    r"connection refused|could not connect|server closed the connection unexpectedly|timeout expired|"
    r"could not receive data from server|could not send data to server|SSL SYSCALL error|"
    r"SSL connection has been closed unexpectedly|no connection to the server|connection to server was lost|"
    r"connection to server (?:at|on socket) .* failed|^connection failed:",
    re.IGNORECASE | re.MULTILINE)

#: Prefixes that say nothing the message does not already say (the tool, the target, the severity).
_NOISE = re.compile(r"^(?:\S+: (?:error|fatal): |connection failed: |connection is bad: |"
                    r"connection to server (?:at \"[^\"]*\", port \d+|on socket \"[^\"]*\") failed: |"
                    r"query failed: |FATAL:\s+|ERROR:\s+|fe_sendauth: )+")


def classify(text: str, conninfo: ConnInfo, *, tool: str | None = None,
             fallback: Fallback = SourceUnavailable) -> BackupError:
    """The error for what a connection attempt or a PostgreSQL tool reported (``text``: message or stderr).

    ``tool`` (``"pg_dump"``...) is named in the message; ``fallback`` builds the error, from a
    one-line message, for anything that is not a connection problem (``SourceUnavailable`` by
    default: for a plain connection attempt, an unrecognized failure is one to retry).
    """
    where = conninfo.redacted()
    lead = f"{tool}: " if tool else ""
    reason = _reason(text)
    user = conninfo.user or "the user"

    def say(message: str) -> str:
        return _scrub(message, conninfo)

    if _REPLICATION_HBA.search(text):
        return fallback(say(f"{lead}the server of {where} refuses replication connections from this host "
                            f"({reason}); add a `host replication {user} <address> scram-sha-256` line to "
                            f"pg_hba.conf and reload the server"))
    if _REPLICATION_ROLE.search(text):
        return fallback(say(f"{lead}{user} may not take base backups of {where} ({reason}); "
                            f"ALTER ROLE {user} REPLICATION (or use a superuser)"))
    if _NO_WAL_SENDERS.search(text):
        return fallback(say(f"{lead}the server of {where} allows no replication connections ({reason}); "
                            f"set max_wal_senders = 10 and wal_level = replica, then restart it"))
    if _AUTHENTICATION.search(text):
        return AuthenticationFailed(say(f"{lead}authentication failed for {where} ({reason}); check the user and "
                                        f"password in the URL (or ~/.pgpass) and the server's pg_hba.conf"))
    missing = _DATABASE_MISSING.search(text)
    if missing:
        name = missing["name"] or missing["other"] or conninfo.dbname
        return DatabaseMissing(say(f"{lead}database {name!r} does not exist on {conninfo.server_label} "
                                   f"({where}); create it or fix the database name in the URL"))
    if _UNKNOWN_HOST.search(text):
        if _DNS_TEMPORARY.search(text):  # the resolver itself failed: the same name may resolve in a minute
            return SourceUnavailable(say(f"{lead}cannot reach PostgreSQL at {where}: its host name does not "
                                         f"resolve right now ({reason}); a retry may succeed, else check DNS"))
        return ConfigError(say(f"{lead}unknown host in {where} ({reason}); fix the host name in the URL"))
    if _BAD_SETTING.search(text):
        return ConfigError(say(f"{lead}bad connection setting in {where} ({reason}); fix the URL or its ?options"))
    if _TLS_SETUP.search(text):
        return ConfigError(say(f"{lead}TLS setup failed for {where} ({reason}); check sslmode and the "
                               f"certificate options in the URL"))
    if _BUSY.search(text):
        return SourceUnavailable(say(f"{lead}cannot reach PostgreSQL at {where} ({reason}); the server is busy, "
                                     f"starting or stopping: a retry may succeed"))
    if _UNAVAILABLE.search(text):
        return SourceUnavailable(say(f"{lead}cannot reach PostgreSQL at {where} ({reason}); is the server running "
                                     f"and reachable from here? A retry may succeed"))
    failed = f"{tool} failed on {where}" if tool else f"connecting to {where} failed"
    return fallback(say(f"{failed}: {reason or 'no error message'}"))


def _reason(text: str) -> str:
    """The server's or libpq's own words, on one line, without the prefixes the message repeats anyway."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    # Tool stderr: the error lines (pg_dump: error: ...), not the progress chatter; libpq's
    # continuation lines ("Is the server running...?", "This probably means...") add nothing.
    picked = [ln for ln in lines if re.search(r"\b(?:error|fatal)\b", ln, re.IGNORECASE)] or lines[:1]
    parts: list[str] = []
    for line in picked[:3]:
        part = re.sub(r"\s+", " ", _NOISE.sub("", line)).strip()
        if part and part not in parts:
            parts.append(part)
    return "; ".join(parts)


def _scrub(message: str, conninfo: ConnInfo) -> str:
    """Belt and braces: no password survives into a message, even if a tool echoed a URL."""
    message = redact_url(message)
    if conninfo.password:
        message = message.replace(conninfo.password, "***")
    return message


def first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else text.strip()
