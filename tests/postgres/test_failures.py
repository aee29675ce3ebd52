"""One classifier of PostgreSQL failures: the same fault is the same error type whichever path met it.

The texts below were captured from real runs (PostgreSQL 15 client and server): psycopg's
connect and pg_dump / pg_restore / pg_basebackup against the local server with a missing role, a
missing database, an unknown host and a closed port, and against throwaway clusters demanding a
password (wrong password, none given), with peer authentication, with all connection slots taken,
shutting down, and a replication cluster whose role may not replicate. The end-to-end tests make the
same faults happen for real and compare what ``connect`` raises with what the pg_dump, pg_restore
and pg_basebackup paths raise.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from backup_tasks.catalog.manifest import Manifest
from backup_tasks.conninfo import ConnInfo
from backup_tasks.errors import (
    AuthenticationFailed,
    BackupError,
    ConfigError,
    DatabaseMissing,
    DumpFailed,
    RestoreFailed,
    SnapshotFailed,
    SourceUnavailable,
)
from backup_tasks.logical import dump
from backup_tasks.logical.dump import run_dump
from backup_tasks.logical.pgrestore import pg_restore_into
from backup_tasks.postgres.cluster import free_port
from backup_tasks.postgres.connect import connect
from backup_tasks.postgres.failures import Fallback, classify
from backup_tasks.postgres.tools import find_tool, tool_env
from backup_tasks.settings import Settings
from backup_tasks.storage.base import Storage
from backup_tasks.storage.locations import open_locations

SECRET = "Tr4der-S3cret!pw"

#: Where the unit tests pretend the texts came from; its password must never reach a message.
TARGET = ConnInfo(host="db.internal", port=5433, dbname="aitrapp", user="trader", password=SECRET)

FALLBACKS: dict[str | None, Fallback] = {
    None: SourceUnavailable, "pg_dump": DumpFailed, "pg_restore": RestoreFailed, "pg_basebackup": SnapshotFailed,
}

TCP = 'connection to server at "127.0.0.1", port 5432 failed: '
SOCKET = 'connection to server on socket "/tmp/backup-tasks-cluster-8zbb9rry/sock/.s.PGSQL.34765" failed: '
REFUSED = "Connection refused\n\tIs the server running on that host and accepting TCP/IP connections?"
DNS = 'could not translate host name "no-such-host.invalid" to address: Name or service not known'

CAPTURED = [
    # missing role (local server, trust) and a role unknown to a scram-sha-256 server
    pytest.param(None, f'connection failed: {TCP}FATAL:  role "no_such_role_bt" does not exist',
                 AuthenticationFailed, "authentication failed", id="psycopg-missing-role"),
    pytest.param("pg_dump", f'pg_dump: error: {TCP}FATAL:  role "no_such_role_bt" does not exist\n',
                 AuthenticationFailed, "authentication failed", id="pg_dump-missing-role"),
    pytest.param("pg_restore", f'pg_restore: error: {TCP}FATAL:  role "no_such_role_bt" does not exist\n',
                 AuthenticationFailed, "authentication failed", id="pg_restore-missing-role"),
    pytest.param("pg_basebackup", f'pg_basebackup: error: {TCP}FATAL:  password authentication failed for user '
                                  f'"ghost"\n', AuthenticationFailed, "authentication failed",
                 id="pg_basebackup-missing-role-scram"),
    # wrong password, no password (scram-sha-256 cluster)
    pytest.param(None, f'connection failed: {TCP}FATAL:  password authentication failed for user "postgres"',
                 AuthenticationFailed, "~/.pgpass", id="psycopg-wrong-password"),
    pytest.param("pg_dump", f'pg_dump: error: {TCP}FATAL:  password authentication failed for user "postgres"\n',
                 AuthenticationFailed, "~/.pgpass", id="pg_dump-wrong-password"),
    pytest.param("pg_restore", f'pg_restore: error: {TCP}FATAL:  password authentication failed for user '
                               f'"postgres"\n', AuthenticationFailed, "~/.pgpass", id="pg_restore-wrong-password"),
    pytest.param("pg_basebackup", f'pg_basebackup: error: {TCP}FATAL:  password authentication failed for user '
                                  f'"postgres"\n', AuthenticationFailed, "~/.pgpass",
                 id="pg_basebackup-wrong-password"),
    pytest.param(None, f"connection failed: {TCP}fe_sendauth: no password supplied",
                 AuthenticationFailed, "no password supplied", id="psycopg-no-password"),
    pytest.param("pg_dump", f"pg_dump: error: {TCP}fe_sendauth: no password supplied\n",
                 AuthenticationFailed, "no password supplied", id="pg_dump-no-password"),
    # peer authentication over the socket (root asking for role postgres)
    pytest.param(None, f'connection failed: {SOCKET}FATAL:  Peer authentication failed for user "postgres"',
                 AuthenticationFailed, "Peer authentication", id="psycopg-peer"),
    pytest.param("pg_dump", f'pg_dump: error: {SOCKET}FATAL:  Peer authentication failed for user "postgres"\n',
                 AuthenticationFailed, "Peer authentication", id="pg_dump-peer"),
    # missing database
    pytest.param(None, f'connection failed: {TCP}FATAL:  database "no_such_db_bt" does not exist',
                 DatabaseMissing, "'no_such_db_bt' does not exist", id="psycopg-missing-database"),
    pytest.param("pg_dump", f'pg_dump: error: {TCP}FATAL:  database "no_such_db_bt" does not exist\n',
                 DatabaseMissing, "'no_such_db_bt' does not exist", id="pg_dump-missing-database"),
    pytest.param("pg_restore", f'pg_restore: error: {TCP}FATAL:  database "no_such_db_bt" does not exist\n',
                 DatabaseMissing, "'no_such_db_bt' does not exist", id="pg_restore-missing-database"),
    # unknown host: psycopg resolves names itself, the tools through libpq
    pytest.param(None, "failed to resolve host 'no-such-host.invalid': [Errno -2] Name or service not known",
                 ConfigError, "unknown host", id="psycopg-unknown-host"),
    pytest.param("pg_dump", f"pg_dump: error: {DNS}\n", ConfigError, "unknown host", id="pg_dump-unknown-host"),
    pytest.param("pg_restore", f"pg_restore: error: {DNS}\n", ConfigError, "unknown host",
                 id="pg_restore-unknown-host"),
    pytest.param("pg_basebackup", f"pg_basebackup: error: {DNS}\n", ConfigError, "unknown host",
                 id="pg_basebackup-unknown-host"),
    # closed port, server gone, shutting down, no slot left: retryable
    pytest.param(None, f"connection failed: {TCP}{REFUSED}", SourceUnavailable, "cannot reach PostgreSQL",
                 id="psycopg-closed-port"),
    pytest.param("pg_dump", f"pg_dump: error: {TCP}{REFUSED}\n", SourceUnavailable, "cannot reach PostgreSQL",
                 id="pg_dump-closed-port"),
    pytest.param("pg_restore", f"pg_restore: error: {TCP}{REFUSED}\n", SourceUnavailable, "cannot reach PostgreSQL",
                 id="pg_restore-closed-port"),
    pytest.param("pg_basebackup", f"pg_basebackup: error: {TCP}{REFUSED}\n", SourceUnavailable,
                 "cannot reach PostgreSQL", id="pg_basebackup-closed-port"),
    pytest.param(None, f"connection failed: {TCP}FATAL:  the database system is shutting down",
                 SourceUnavailable, "shutting down", id="psycopg-shutting-down"),
    pytest.param("pg_dump", f"pg_dump: error: {TCP}FATAL:  the database system is shutting down\n",
                 SourceUnavailable, "shutting down", id="pg_dump-shutting-down"),
    pytest.param("pg_dump", f"pg_dump: error: {TCP}FATAL:  the database system is starting up\n",
                 SourceUnavailable, "starting up", id="pg_dump-starting-up"),
    pytest.param(None, f"connection failed: {TCP}FATAL:  remaining connection slots are reserved for "
                       f"non-replication superuser connections", SourceUnavailable, "slots", id="psycopg-no-slot"),
    pytest.param("pg_dump", f"pg_dump: error: {TCP}FATAL:  sorry, too many clients already\n",
                 SourceUnavailable, "too many clients", id="pg_dump-too-many-clients"),
    pytest.param("pg_dump", "pg_dump: error: query failed: FATAL:  terminating connection due to administrator "
                            "command\nserver closed the connection unexpectedly\n\tThis probably means the server "
                            "terminated abnormally\n\tbefore or while processing the request.\npg_dump: detail: "
                            "Query was: LOCK TABLE public.t IN ACCESS SHARE MODE\n",
                 SourceUnavailable, "terminating connection", id="pg_dump-terminated-mid-dump"),
    pytest.param(None, "connection failed: connection to server at \"127.0.0.1\", port 5432 failed: timeout "
                       "expired", SourceUnavailable, "timeout expired", id="psycopg-timeout"),
    # malformed settings
    pytest.param(None, 'invalid connection option "foo"\n', ConfigError, "bad connection setting",
                 id="psycopg-invalid-option"),
    pytest.param(None, 'connection is bad: invalid sslmode value: "bogus"', ConfigError, "bad connection setting",
                 id="psycopg-invalid-value"),
    pytest.param("pg_dump", 'pg_dump: error: invalid sslmode value: "bogus"\n', ConfigError,
                 "bad connection setting", id="pg_dump-invalid-value"),
    pytest.param("pg_dump", 'pg_dump: error: invalid integer value "abc" for connection option "port"\n',
                 ConfigError, "bad connection setting", id="pg_dump-invalid-integer"),
    # replication: the snapshot's own hints, as SnapshotFailed
    pytest.param("pg_basebackup", f'pg_basebackup: error: {TCP}FATAL:  no pg_hba.conf entry for replication '
                                  f'connection from host "127.0.0.1", user "postgres", no encryption\n',
                 SnapshotFailed, "host replication", id="pg_basebackup-no-replication-hba"),
    pytest.param("pg_basebackup", f"pg_basebackup: error: {TCP}FATAL:  must be superuser or replication role to "
                                  f"start walsender\n", SnapshotFailed, "REPLICATION",
                 id="pg_basebackup-no-replication-role"),
    pytest.param("pg_basebackup", f"pg_basebackup: error: {TCP}FATAL:  number of requested standby connections "
                                  f"exceeds max_wal_senders (currently 0)\n", SnapshotFailed, "max_wal_senders",
                 id="pg_basebackup-no-wal-senders"),
    # libpq and server messages this machine cannot provoke (no DNS outage, no TLS, one pg_hba.conf)
    pytest.param("pg_dump", 'pg_dump: error: could not translate host name "db" to address: Temporary failure in '
                            'name resolution\n', SourceUnavailable, "does not resolve right now",
                 id="pg_dump-dns-outage"),
    pytest.param(None, f'connection failed: {TCP}FATAL:  no pg_hba.conf entry for host "10.0.0.5", user "trader", '
                       f'database "aitrapp", no encryption', AuthenticationFailed, "pg_hba.conf",
                 id="psycopg-no-hba-entry"),
    pytest.param("pg_restore", f"pg_restore: error: {TCP}server does not support SSL, but SSL was required\n",
                 ConfigError, "sslmode", id="pg_restore-no-tls"),
    pytest.param("pg_dump", f"pg_dump: error: {TCP}SCRAM authentication requires libpq version 10 or above\n",
                 AuthenticationFailed, "SCRAM", id="pg_dump-scram"),
    # not a connection problem: the tool's own failure
    pytest.param("pg_dump", "pg_dump: error: query failed: ERROR:  permission denied for table secrets\n"
                            "pg_dump: detail: Query was: LOCK TABLE public.secrets IN ACCESS SHARE MODE\n",
                 DumpFailed, "permission denied for table secrets", id="pg_dump-permission-denied"),
    pytest.param("pg_restore", 'pg_restore: error: could not execute query: ERROR:  role "bt_cap_owner" does not '
                               'exist\nCommand was: ALTER TABLE public.secrets OWNER TO bt_cap_owner;\n',
                 RestoreFailed, "bt_cap_owner", id="pg_restore-owner-missing-is-not-a-login"),
    pytest.param("pg_dump", "", DumpFailed, "no error message", id="pg_dump-silent"),
]


@pytest.mark.parametrize(("tool", "text", "expected", "fragment"), CAPTURED)
def test_each_real_failure_text_has_one_type_and_a_one_line_message_without_the_password(
        tool: str | None, text: str, expected: type[BackupError], fragment: str) -> None:
    error = classify(text, TARGET, tool=tool, fallback=FALLBACKS[tool])
    assert type(error) is expected, error
    message = str(error)
    assert fragment in message, message
    assert SECRET not in message and "\n" not in message
    assert TARGET.redacted() in message
    if tool:
        assert message.startswith(f"{tool}") or f"{tool}:" in message or f"{tool} " in message, message
    assert error.retryable == (expected is SourceUnavailable)


def test_a_password_echoed_by_a_tool_is_scrubbed() -> None:
    text = f"pg_dump: error: could not connect using postgresql://trader:{SECRET}@db.internal:5433/aitrapp: " \
           f"Connection refused"
    error = classify(text, TARGET, tool="pg_dump", fallback=DumpFailed)
    assert isinstance(error, SourceUnavailable) and SECRET not in str(error)


# --- the same faults for real --------------------------------------------------------------------

FAULTS = {
    "missing role": AuthenticationFailed,
    "missing database": DatabaseMissing,
    "unknown host": ConfigError,
    "closed port": SourceUnavailable,
    "wrong password": AuthenticationFailed,
}


def faulty_target(fault: str, pg_admin: ConnInfo, request: pytest.FixtureRequest) -> ConnInfo:
    """A connection target that has ``fault``, always carrying a password the messages must not show."""
    if fault == "missing role":
        return replace(pg_admin, user="bt_no_such_role", password=SECRET)
    if fault == "missing database":
        return replace(pg_admin.with_dbname("bt_no_such_database"), password=pg_admin.password or SECRET)
    if fault == "unknown host":
        return replace(pg_admin, host="no-such-host.invalid", password=SECRET)
    if fault == "closed port":
        return replace(pg_admin, host="127.0.0.1", port=free_port(), password=SECRET)
    server: ConnInfo = request.getfixturevalue("password_server")
    return replace(server, password=SECRET + "-wrong")


def via_connect(target: ConnInfo) -> BackupError:
    with pytest.raises(BackupError) as raised:
        connect(target).close()
    return raised.value


def url_with_password(conninfo: ConnInfo, password: str | None) -> str:
    auth = f"{conninfo.user or 'postgres'}:{password}" if password else conninfo.user or "postgres"
    return f"postgresql://{auth}@{conninfo.host}:{conninfo.port or 5432}/{conninfo.dbname}"


def settings_in(directory: Path, url: str) -> Settings:
    return Settings(database_url=url, backup_dir=str(directory), lock_url=None, broker_url="memory://")


def test_run_dump_with_a_missing_role_is_authentication_failed(pg_admin: ConnInfo, tmp_path: Path) -> None:
    settings = settings_in(tmp_path / "b", url_with_password(replace(pg_admin, user="bt_no_such_role"), SECRET))
    with pytest.raises(AuthenticationFailed) as raised:
        run_dump(settings)
    assert not raised.value.retryable and SECRET not in str(raised.value)
    assert "bt_no_such_role" in str(raised.value)


def test_run_dump_with_an_unknown_host_is_a_config_error(pg_admin: ConnInfo, tmp_path: Path) -> None:
    settings = settings_in(tmp_path / "b", url_with_password(replace(pg_admin, host="no-such-host.invalid"),
                                                             SECRET))
    with pytest.raises(ConfigError) as raised:
        run_dump(settings)
    assert "unknown host" in str(raised.value) and "no-such-host.invalid" in str(raised.value)
    assert raised.value.exit_code == 2 and SECRET not in str(raised.value)


@pytest.mark.slow
@pytest.mark.parametrize("fault", list(FAULTS))
def test_pg_dump_meeting_a_fault_fails_like_connect(
        fault: str, pg_admin: ConnInfo, make_database: Callable[..., ConnInfo], request: pytest.FixtureRequest,
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The dump's own connection works; pg_dump, started with the faulty target's environment, meets the fault."""
    source = make_database()
    target = faulty_target(fault, pg_admin, request)
    expected = FAULTS[fault]
    connect_error = via_connect(target)
    monkeypatch.setattr(dump, "tool_env", lambda _conninfo: tool_env(target))
    backup_dir = tmp_path / "b"
    with pytest.raises(BackupError) as raised:
        run_dump(settings_in(backup_dir, url_with_password(source, source.password)))
    dump_error = raised.value
    assert type(dump_error) is type(connect_error) is expected, (dump_error, connect_error)
    # (the message names the dump's target: only this test makes pg_dump's differ)
    assert str(dump_error).startswith("pg_dump") and source.redacted() in str(dump_error)
    assert SECRET not in str(dump_error) + str(connect_error)
    assert not [p for p in backup_dir.rglob("*") if p.is_file() and "dump" in p.name], "nothing is kept"


@dataclass
class Dumped:
    storage: Storage
    manifest: Manifest
    settings: Settings


@pytest.fixture(scope="module")
def dumped(pg_admin: ConnInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dumped]:
    """A real (tiny) dump to feed pg_restore."""
    name = f"bt_test_failures_{os.getpid()}"
    with connect(pg_admin) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        with connect(pg_admin.with_dbname(name)) as conn:
            conn.execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 10)")
        settings = settings_in(tmp_path_factory.mktemp("dumped"), url_with_password(
            pg_admin.with_dbname(name), pg_admin.password))
        manifest, _skipped = run_dump(settings)
        yield Dumped(open_locations(settings.backup_dir, settings.copy_to), manifest, settings)
    finally:
        with connect(pg_admin) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.parametrize("fault", list(FAULTS))
def test_pg_restore_meeting_a_fault_fails_like_connect(
        fault: str, pg_admin: ConnInfo, dumped: Dumped, request: pytest.FixtureRequest) -> None:
    target = faulty_target(fault, pg_admin, request)
    connect_error = via_connect(target)
    with pytest.raises(BackupError) as raised:
        pg_restore_into(dumped.storage, dumped.manifest, target, min_major=0, settings=dumped.settings)
    restore_error = raised.value
    assert type(restore_error) is type(connect_error) is FAULTS[fault], (restore_error, connect_error)
    assert "pg_restore" in str(restore_error) and SECRET not in str(restore_error)


@pytest.mark.parametrize("fault", ["unknown host", "closed port"])
def test_pg_basebackup_meeting_a_fault_fails_like_connect(fault: str, pg_admin: ConnInfo,
                                                          request: pytest.FixtureRequest) -> None:
    """(Role, database and password faults depend on the server's replication setup: see CAPTURED.)"""
    target = faulty_target(fault, pg_admin, request)
    pg_basebackup = find_tool("pg_basebackup")
    with tempfile.TemporaryDirectory() as directory:
        result = subprocess.run([str(pg_basebackup.path), "-D", f"{directory}/backup", "--no-password",
                                 "--format=tar"], env=tool_env(target), capture_output=True, text=True,
                                timeout=60, check=False)
    assert result.returncode != 0
    error = classify(result.stderr, target, tool="pg_basebackup", fallback=SnapshotFailed)
    assert type(error) is type(via_connect(target)) is FAULTS[fault], error


def test_connect_rejects_malformed_options_as_config_errors(pg_admin: ConnInfo) -> None:
    for options in ((("foo", "bar"),), (("sslmode", "bogus"),)):
        error = via_connect(replace(pg_admin, options=options, password=SECRET))
        assert isinstance(error, ConfigError) and "bad connection setting" in str(error), error
        assert SECRET not in str(error)
