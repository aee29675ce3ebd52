"""PostgreSQL 15's regression database for the tests (a pytest plugin: ``regression_source`` by name).

``scripts/regression-db.sh`` fetches PostgreSQL's sources (Debian's source package), builds
``pg_regress`` and ``regress.so`` once (cached across runs) and runs the regression schedule against a
server, which leaves the database ``regression`` behind: hundreds of tables, partitions and
inheritance children, unlogged tables, materialized views, row-level security policies naming roles,
large objects, per-database settings, all written by people who never saw this project.

``regression_source`` (session scope) is a throwaway cluster holding it, archiving its WAL through
``backup-tasks wal-push`` into a ``PitrEnv``, so dumps, snapshots and PITR all run against it. Without
the sources (no network, no deb-src list) the tests skip on a developer's machine and fail under CI.

The comparison helpers read a database the way the tests compare copies: ``schema_lines`` (``pg_dump
--schema-only`` as a multiset of lines), ``data_fingerprint`` (every table's, materialized view's and
sequence's column order, row count and content hash, and the large objects), ``database_properties``
(owner, ACL, comment, ``ALTER DATABASE ... SET``), and ``differences`` between two of them.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from backup_tasks.conninfo import ConnInfo
from backup_tasks.errors import ClusterError
from backup_tasks.postgres.cluster import ThrowawayCluster
from backup_tasks.postgres.connect import connect
from backup_tasks.settings import Settings
from tests.support.paths import ROOT
from tests.support.pitr import PitrEnv, reachable_dir
from tests.support.require import unavailable

SCRIPT = ROOT / "scripts" / "regression-db.sh"
BIN_DIR = Path("/usr/lib/postgresql/15/bin")
#: scripts/regression-db.sh's exit code when the sources cannot be had (no deb-src, no network).
NO_SOURCES = 3
#: The schedule opens up to 20 sessions at once, each with a few connections of its own.
BUILD_SETTINGS = {"max_connections": "100"}


@dataclass
class RegressionSource:
    env: PitrEnv            # backup directory and WAL archive, reachable by the postgres OS user
    cluster: ThrowawayCluster
    settings: Settings      # DATABASE_URL = the regression database
    conninfo: ConnInfo
    failed_tests: int       # of the schedule, against this server (a few fail on a newer minor: fine)

    @property
    def admin(self) -> ConnInfo:
        return self.cluster.conninfo("postgres")


def build_tools() -> Path:
    """The cached build (pg_regress, regress.so) of scripts/regression-db.sh; skip or fail without sources."""
    result = subprocess.run(["bash", str(SCRIPT), "build"], capture_output=True, text=True, check=False,
                            stdin=subprocess.DEVNULL, timeout=1800)
    if result.returncode == NO_SOURCES:
        unavailable(f"PostgreSQL 15's sources cannot be fetched: {result.stderr.strip().splitlines()[-1]}",
                    "scripts/regression-db.sh needs a deb-src list of bookworm main and the network (as root)")
    if result.returncode != 0:
        pytest.fail(f"scripts/regression-db.sh build failed: {result.stderr[-3000:]}", pytrace=False)
    return Path(result.stdout.strip().splitlines()[-1])


def make_regression_database(cluster: ThrowawayCluster) -> int:
    """Run the regression schedule against ``cluster``; the number of tests that failed."""
    result = subprocess.run(["bash", str(SCRIPT), "make-db", "127.0.0.1", str(cluster.port)], capture_output=True,
                            text=True, check=False, stdin=subprocess.DEVNULL, timeout=1800)
    if result.returncode != 0:
        pytest.fail(f"the regression schedule did not run: {result.stderr[-3000:]}", pytrace=False)
    shutil.rmtree(result.stdout.strip().splitlines()[-1], ignore_errors=True)  # its results and diffs
    found = re.search(r"regression tests: (\d+) of \d+ failed", result.stderr)
    assert found, result.stderr
    return int(found.group(1))


@pytest.fixture(scope="session")
def regression_source() -> Iterator[RegressionSource]:
    """A throwaway cluster with the regression database, archiving its WAL: built once per session, from a copy of
    the cluster the schedule left when one is cached (``cached_cluster``)."""
    cache = cached_cluster(build_tools())
    env = PitrEnv(reachable_dir("bt-test-regress-"))
    try:
        # Built with wal_level minimal (the schedule writes a lot of WAL no snapshot will need), then
        # restarted as an archiving server: every backup the tests take starts after that.
        archiving = env.archiving_cluster().settings
        with regression_cluster(cache) as (cluster, failed):
            cluster.settings.update({k: archiving[k] for k in
                                     ("wal_level", "max_wal_senders", "archive_mode", "archive_command",
                                      "archive_timeout")})
            cluster.restart()
            settings = env.for_cluster(cluster, "regression")
            yield RegressionSource(env, cluster, settings, cluster.conninfo("regression"), failed)
    finally:
        shutil.rmtree(env.base, ignore_errors=True)


def cached_cluster(tools: Path) -> Path:
    """Where the cluster the schedule left is kept, stopped, beside the cached build: the schedule takes a minute,
    a copy of its data directory a second. Named by what made it: the server's version, the script, the build
    settings and the throwaway cluster's code (its initdb options)."""
    version = subprocess.run([str(BIN_DIR / "postgres"), "--version"], capture_output=True, text=True,
                             check=True).stdout
    made_of = [version, SCRIPT.read_text(), repr(sorted(BUILD_SETTINGS.items())),
               (ROOT / "backup_tasks" / "postgres" / "cluster.py").read_text()]
    return tools.parent / f"regression-cluster-{hashlib.sha256(repr(made_of).encode()).hexdigest()[:16]}"


@contextmanager
def regression_cluster(cache: Path) -> Iterator[tuple[ThrowawayCluster, int]]:
    """The cluster with the regression database and the schedule's failed count: a copy of the cached one, or built
    by the schedule and kept (a cached copy that will not start is dropped and built again)."""
    if (cache / "data" / "PG_VERSION").is_file() and (cache / "failed").is_file():
        try:
            cluster = ThrowawayCluster(settings=BUILD_SETTINGS,
                                       prepare=lambda data_dir: shutil.copytree(cache / "data", data_dir,
                                                                                symlinks=True)).start()
        except ClusterError:
            shutil.rmtree(cache, ignore_errors=True)
        else:
            try:
                yield cluster, int((cache / "failed").read_text())
            finally:
                cluster.cleanup()
            return
    with ThrowawayCluster(settings=BUILD_SETTINGS) as cluster:
        failed = make_regression_database(cluster)
        with cluster.stopped() as data_dir:
            keep_cluster(data_dir, cache, failed)
        yield cluster, failed


def keep_cluster(data_dir: Path, cache: Path, failed: int) -> None:
    """A stopped cluster's data directory into ``cache`` (published with one rename); older entries go."""
    staging = cache.with_name(f"{cache.name}.tmp.{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        shutil.copytree(data_dir, staging / "data", symlinks=True)
        (staging / "failed").write_text(f"{failed}\n")
        staging.rename(cache)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another session kept one first, or no room: built next time
        return
    for old in cache.parent.glob("regression-cluster-*"):
        if old != cache and ".tmp." not in old.name:
            shutil.rmtree(old, ignore_errors=True)


# --- reading a database for comparison -----------------------------------------------------------------

def pg_tool(name: str) -> str:
    return str(BIN_DIR / name) if (BIN_DIR / name).exists() else name


def tool_env(conninfo: ConnInfo) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update({"PGHOST": conninfo.host or "127.0.0.1", "PGPORT": str(conninfo.port or 5432),
                "PGUSER": conninfo.user or "postgres", "PGDATABASE": conninfo.dbname})
    if conninfo.password:
        env["PGPASSWORD"] = conninfo.password
    return env


#: Left out of a comparison: pg_dump 15.14+ fences a plain dump with a random key (``\restrict``), and its
#: comments only repeat what the statements say (``-- Name: ...; Type: ...; Owner: ...``, TOC numbers).
_NOT_COMPARED = re.compile(r"^(\\(un)?restrict |--)")


def schema_lines(conninfo: ConnInfo, *flags: str) -> Counter[str]:
    """``pg_dump --schema-only`` as a multiset of statement lines: objects of equal rank come in any order."""
    result = subprocess.run([pg_tool("pg_dump"), "--schema-only", *flags], env=tool_env(conninfo),
                            capture_output=True, text=True, check=False, timeout=300)
    assert result.returncode == 0, result.stderr
    return Counter(line for line in result.stdout.splitlines() if line.strip() and not _NOT_COMPARED.match(line))


#: Fixed output settings, so rows compare as values whatever the database's own settings (compared apart).
_SESSION = ("SET TimeZone = 'UTC'; SET DateStyle = 'ISO, MDY'; SET IntervalStyle = 'postgres';"
            "SET extra_float_digits = 1; SET bytea_output = 'hex'; SET lc_monetary = 'C'; SET lc_numeric = 'C'")

_RELATIONS = """
SELECT c.oid, quote_ident(n.nspname) || '.' || quote_ident(c.relname), c.relkind, c.relispopulated,
       array(SELECT quote_ident(attname) FROM pg_attribute WHERE attrelid = c.oid AND attnum > 0
             AND NOT attisdropped ORDER BY attnum)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'm', 'S') AND c.relpersistence <> 't'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_(toast|temp)'
ORDER BY 2
"""


def data_fingerprint(conninfo: ConnInfo) -> dict[str, str]:
    """``{"<table> columns": ..., "<table> rows": "<count> <sha256>", ...}`` for every user relation.

    Rows are hashed with their columns in name order and the lines sorted, so a different column order
    (reported on its own line) or physical row order does not hide or fake a difference in values.
    """
    found: dict[str, str] = {}
    with connect(conninfo) as conn:
        conn.execute(_SESSION)
        for _oid, name, kind, populated, columns in conn.execute(_RELATIONS).fetchall():
            if kind == "S":
                last, called = conn.execute(f"SELECT last_value, is_called FROM {name}").fetchone()
                found[f"{name} sequence"] = f"{last} {called}"
                continue
            found[f"{name} columns"] = ",".join(columns)
            if not populated:
                found[f"{name} rows"] = "not populated"
                continue
            query = f"SELECT {', '.join(sorted(columns)) or 'NULL'} FROM ONLY {name}"
            buffer = bytearray()
            with conn.cursor().copy(f"COPY ({query}) TO STDOUT") as copy:
                for chunk in copy:
                    buffer += chunk
            lines = sorted(bytes(buffer).split(b"\n")[:-1])
            digest = hashlib.sha256(b"\n".join(lines)).hexdigest()[:16]
            found[f"{name} rows"] = f"{len(lines)} {digest}"
        for oid, owner, acl, digest in conn.execute(
                "SELECT l.oid, pg_get_userbyid(l.lomowner), l.lomacl::text, md5(lo_get(l.oid))"
                " FROM pg_largeobject_metadata l ORDER BY 1").fetchall():
            found[f"large object {oid}"] = digest
            found[f"large object {oid} owner"] = f"{owner} {acl}"
    return found


def database_properties(conninfo: ConnInfo) -> dict[str, object]:
    """What ``ALTER DATABASE`` and ``COMMENT ON DATABASE`` set: owner, ACL, comment, settings.

    A NULL ACL is the default one written out: pg_dump leaves an ACL equal to the default out, so a
    source that spelled the default out and its copy with NULL grant the same.
    """
    with connect(conninfo) as conn:
        owner, acl, comment = conn.execute(
            "SELECT pg_get_userbyid(datdba), coalesce(datacl, acldefault('d', datdba))::text,"
            "       shobj_description(oid, 'pg_database')"
            " FROM pg_database WHERE datname = current_database()").fetchone()
        settings = conn.execute(
            "SELECT coalesce(pg_get_userbyid(nullif(setrole, 0)), ''), unnest(setconfig) FROM pg_db_role_setting"
            " WHERE setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " ORDER BY 1, 2").fetchall()
    return {"owner": owner, "acl": acl, "comment": comment, "settings": [f"{role}:{value}" for role, value in settings]}


def differences(source: Mapping[str, object] | Counter[str], copy: Mapping[str, object] | Counter[str]) -> set[str]:
    """What differs between two fingerprints (or two ``schema_lines``), one named item each."""
    if isinstance(source, Counter) and isinstance(copy, Counter):
        return {f"-{line}" for line in (source - copy)} | {f"+{line}" for line in (copy - source)}
    return {key for key in source.keys() | copy.keys() if source.get(key) != copy.get(key)}
