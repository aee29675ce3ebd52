"""PostgreSQL for the tests (a pytest plugin: its fixtures are available by name everywhere).

The server, in order of preference: ``BACKUP_TASKS_TEST_PG_URL`` (an admin URL to a server the
tests may create databases on); a testcontainers container where a Docker engine answers; the
local server on 127.0.0.1:5432; else a throwaway cluster from the local binaries for the session.
Every database a test creates is named ``bt_test_*`` and dropped afterwards; nothing else is touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest

from backup_tasks.conninfo import ConnInfo
from backup_tasks.postgres.cluster import ThrowawayCluster
from backup_tasks.postgres.connect import connect
from backup_tasks.settings import Settings

TRICKY_SCHEMA = r"""
CREATE TYPE "Mood" AS ENUM ('happy', 'sad', 'ünïcødé');
CREATE SCHEMA "Trading Desk";
CREATE TABLE "Trading Desk"."MixedCase Table" (id serial PRIMARY KEY, "Weird ""Col"" name" text, mood "Mood");
INSERT INTO "Trading Desk"."MixedCase Table" ("Weird ""Col"" name", mood)
  SELECT 'row ' || g || ' — naïve café 取引 📈', (ARRAY['happy','sad','ünïcødé'])[1 + g % 3]::"Mood"
  FROM generate_series(1, 150) g;
CREATE TABLE measurements (id bigserial, ts date NOT NULL, payload jsonb, blob bytea, PRIMARY KEY (id, ts))
  PARTITION BY RANGE (ts);
CREATE TABLE measurements_2025 PARTITION OF measurements FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE measurements_2026 PARTITION OF measurements FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
INSERT INTO measurements (ts, payload, blob)
  SELECT date '2025-06-01' + (g % 400), jsonb_build_object('g', g, 'tags', jsonb_build_array('a', 'ü')),
         decode(md5(g::text), 'hex') || '\x00ff'::bytea
  FROM generate_series(1, 500) g;
CREATE UNLOGGED TABLE scratch_cache (k text PRIMARY KEY, v int);
INSERT INTO scratch_cache SELECT 'k' || g, g FROM generate_series(1, 40) g;
CREATE TABLE empty_table (id int);
CREATE SEQUENCE ticket_seq START 1000;
SELECT setval('ticket_seq', 4242);
CREATE VIEW happy_rows AS SELECT * FROM "Trading Desk"."MixedCase Table" WHERE mood = 'happy';
CREATE MATERIALIZED VIEW measurement_totals AS SELECT ts, count(*) AS n FROM measurements GROUP BY ts;
CREATE INDEX measurements_payload_idx ON measurements USING gin (payload);
"""


def _pg_answers(conninfo: ConnInfo) -> bool:
    try:
        psycopg.connect(**{**conninfo.kwargs(), "connect_timeout": "3"}).close()
        return True
    except psycopg.Error:
        return False


def docker_available() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[ConnInfo]:
    """Connection info of a PostgreSQL superuser on a server where tests may create databases."""
    if os.environ.get("BACKUP_TASKS_TEST_PG_URL"):
        yield ConnInfo.from_url(os.environ["BACKUP_TASKS_TEST_PG_URL"])
        return
    if docker_available():  # the path used where a Docker engine exists (CI elsewhere, laptops)
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:15", driver=None) as container:
            yield ConnInfo.from_url(container.get_connection_url())
        return
    local = ConnInfo(host="127.0.0.1", port=5432, dbname="postgres", user="postgres")
    if _pg_answers(local):
        yield local
        return
    with ThrowawayCluster() as cluster:
        yield cluster.conninfo("postgres")


@pytest.fixture
def make_database(pg_admin: ConnInfo) -> Iterator[Callable[..., ConnInfo]]:
    """Factory: a new empty database ``bt_test_<random>``, dropped after the test."""
    created: list[str] = []

    def make(prefix: str = "bt_test") -> ConnInfo:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        with connect(pg_admin) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return pg_admin.with_dbname(name)

    yield make
    with connect(pg_admin) as admin:
        for name in created:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def url_of(conninfo: ConnInfo, *, scheme: str = "postgresql") -> str:
    user = conninfo.user or "postgres"
    auth = f"{user}:{conninfo.password}" if conninfo.password else user
    return f"{scheme}://{auth}@{conninfo.host}:{conninfo.port or 5432}/{conninfo.dbname}"


@pytest.fixture
def trading_db(make_database: Callable[..., ConnInfo]) -> ConnInfo:
    """A small database with the trading app's six tables and generated rows."""
    from backup_tasks.postgres.sampledata import generate

    conninfo = make_database()
    generate(conninfo, signals=300)
    return conninfo


@pytest.fixture
def tricky_db(make_database: Callable[..., ConnInfo]) -> ConnInfo:
    """A database with every awkward object pg_dump must get right."""
    conninfo = make_database()
    with connect(conninfo) as conn:
        conn.execute(TRICKY_SCHEMA)
    return conninfo


PASSWORD_SERVER_PASSWORD = "Tr4der-S3cret!pw"


@pytest.fixture(scope="session")
def password_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConnInfo]:
    """A throwaway cluster that demands a password over TCP (the local server trusts everyone).

    Superuser ``postgres`` has password ``PASSWORD_SERVER_PASSWORD``; a database ``aitrapp`` exists.
    """
    pwfile = Path(tempfile.mkstemp(prefix="bt-pw-")[1])
    pwfile.write_text(PASSWORD_SERVER_PASSWORD + "\n")
    pwfile.chmod(0o644)  # initdb runs as the postgres OS user
    try:
        with ThrowawayCluster(initdb_args=("--auth-host=scram-sha-256", f"--pwfile={pwfile}")) as cluster:
            admin = replace(cluster.conninfo("postgres"), password=PASSWORD_SERVER_PASSWORD)
            with connect(admin) as conn:
                conn.execute("CREATE DATABASE aitrapp")
            yield admin.with_dbname("aitrapp")
    finally:
        pwfile.unlink()


@pytest.fixture
def settings_for(tmp_path: Path) -> Callable[..., Settings]:
    """Settings for a database, with a fresh backup directory and no Redis (file locks)."""

    def make(conninfo: ConnInfo, **overrides: object) -> Settings:
        values: dict[str, object] = {"database_url": url_of(conninfo), "backup_dir": str(tmp_path / "backups"),
                                     "broker_url": "memory://", "lock_url": None}
        values.update(overrides)
        return Settings(**values)  # type: ignore[arg-type]

    return make
