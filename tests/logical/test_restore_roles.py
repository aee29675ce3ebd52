"""Issue 19: a restore recreates the database as it was: roles, owners, grants, policies and its own properties.

The source database lives on the shared server with roles of unique names (dropped afterwards); a
restore "to a new host" goes into a throwaway cluster that has only the ``postgres`` role.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from backup_tasks.conninfo import ConnInfo
from backup_tasks.errors import ConfigError, RolesMissing
from backup_tasks.logical.dump import run_dump
from backup_tasks.logical.noowner import policy_head
from backup_tasks.logical.restore import restore_backup
from backup_tasks.logical.swap import marked_comment, marker_for, parse_marker
from backup_tasks.postgres.cluster import ThrowawayCluster
from backup_tasks.postgres.connect import connect
from backup_tasks.postgres.tools import find_tool, tool_env
from backup_tasks.settings import Settings
from tests.support.paths import BACKUP_TASKS
from tests.support.postgres import url_of
from tests.support.processes import worker_env
from tests.support.roles import Roles


def database_properties(conninfo: ConnInfo) -> dict[str, object]:
    """The database's own properties as the server holds them: owner, ACL, comment, settings (by role name)."""
    with connect(conninfo.with_dbname("postgres")) as conn:
        owner, acl, comment, limit = conn.execute(
            "SELECT pg_get_userbyid(datdba), datacl::text[], shobj_description(oid, 'pg_database'), datconnlimit "
            "FROM pg_database WHERE datname = %s", (conninfo.dbname,)).fetchone()
        settings = conn.execute(
            "SELECT CASE WHEN s.setrole = 0 THEN '' ELSE pg_get_userbyid(s.setrole) END, s.setconfig "
            "FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase WHERE d.datname = %s "
            "ORDER BY 1", (conninfo.dbname,)).fetchall()
    return {"owner": owner, "acl": sorted(acl or []), "comment": comment, "connection_limit": limit,
            "settings": [(role, sorted(config)) for role, config in settings]}


def schema_of(conninfo: ConnInfo) -> str:
    """``pg_dump --schema-only``, without the lines that differ between any two runs (header, restrict key)."""
    pg_dump = find_tool("pg_dump")
    text = subprocess.run([str(pg_dump.path), "--schema-only", "--no-password"], env=tool_env(conninfo),
                          capture_output=True, text=True, check=True).stdout
    return "\n".join(line for line in text.splitlines()
                     if not line.startswith(("\\restrict", "\\unrestrict", "-- Dumped", "-- Started", "-- Completed")))


def policies_of(conninfo: ConnInfo) -> dict[str, tuple[list[str], str | None]]:
    """``{policy: (its roles, its comment)}`` on table signals."""
    with connect(conninfo) as conn:
        rows = conn.execute(
            "SELECT polname, ARRAY(SELECT CASE WHEN r = 0 THEN 'public' ELSE pg_get_userbyid(r) END "
            "FROM unnest(polroles) r ORDER BY 1), obj_description(p.oid, 'pg_policy') "
            "FROM pg_policy p WHERE polrelid = 'signals'::regclass").fetchall()
    return {name: (list(names), comment) for name, names, comment in rows}


def role_facts(admin: ConnInfo, names: list[str]) -> dict[str, object]:
    """The roles' attributes, memberships and own settings, by name."""
    with connect(admin) as conn:
        attributes = conn.execute("SELECT rolname, rolcanlogin, rolsuper, rolinherit FROM pg_roles "
                                  "WHERE rolname = ANY(%s) ORDER BY 1", (names,)).fetchall()
        members = conn.execute("SELECT pg_get_userbyid(roleid), pg_get_userbyid(member) FROM pg_auth_members "
                               "WHERE pg_get_userbyid(member) = ANY(%s) ORDER BY 1, 2", (names,)).fetchall()
        settings = conn.execute("SELECT pg_get_userbyid(setrole), setconfig FROM pg_db_role_setting "
                                "WHERE setdatabase = 0 AND pg_get_userbyid(setrole) = ANY(%s) ORDER BY 1",
                                (names,)).fetchall()
    return {"attributes": attributes, "members": members, "settings": settings}


@pytest.mark.slow
def test_the_trading_schema_with_a_role_named_policy_restores_with_its_database_properties(
        roles_db: ConnInfo, roles: Roles, settings_for: Callable[..., Settings],
        make_database: Callable[..., ConnInfo]) -> None:
    """Issue 19 in the quick suite (with test_verify_roles' first test): restore on the same server, then replace."""
    started = time.monotonic()
    settings = settings_for(roles_db)
    manifest, _ = run_dump(settings)
    assert manifest.cluster_objects is not None and set(roles.names) <= set(manifest.cluster_objects["roles"])
    target = make_database()
    result = restore_backup(settings, manifest.id, url_of(target))
    assert result.ok and result.roles_created == [] and result.policies_changed == []
    assert {f"owner: {roles.owner}", "setting: TimeZone = Asia/Kolkata", "comment set",
            f"setting: work_mem = 8MB for role {roles.reader}"} <= set(result.database_properties)
    assert database_properties(target) == database_properties(roles_db)
    assert database_properties(target)["comment"] == "trading, restored whole"
    assert database_properties(target)["settings"] == [("", ["TimeZone=Asia/Kolkata"]),
                                                       (roles.reader, ["work_mem=8MB"])]
    assert schema_of(target) == schema_of(roles_db)
    with connect(target) as conn:  # the setting is live for a new session: naive timestamps read as before
        assert conn.execute("SHOW timezone").fetchone()[0] == "Asia/Kolkata"
        assert conn.execute("SELECT count(*) FROM quote_cache").fetchone()[0] == 2

    # Replacing a database keeps the restored properties too (the swap renames: they follow the OID).
    with connect(target.with_dbname("postgres")) as conn:
        conn.execute(f'ALTER DATABASE "{target.dbname}" RESET ALL')
        conn.execute(f'COMMENT ON DATABASE "{target.dbname}" IS NULL')
    replaced = restore_backup(settings, manifest.id, url_of(target), replace=True)
    assert replaced.replaced and replaced.ok
    assert database_properties(target) == database_properties(roles_db)
    assert time.monotonic() - started < 10  # ~0.6-1 s on the 2-core test machine (CREATE DATABASE dominates)


@pytest.fixture(scope="module")
def fresh_server() -> Iterator[ThrowawayCluster]:
    """A new host: a throwaway cluster with no role but ``postgres`` (the roles it gets die with it)."""
    with ThrowawayCluster() as cluster:
        yield cluster


def cluster_state(server: ConnInfo) -> tuple[list[str], list[str]]:
    with connect(server) as conn:
        return ([r[0] for r in conn.execute("SELECT datname FROM pg_database ORDER BY 1")],
                [r[0] for r in conn.execute("SELECT rolname FROM pg_roles ORDER BY 1")])


def cli_restore(env: dict[str, str], backup_id: str, target: str, *flags: str) -> tuple[int, dict, str]:
    done = subprocess.run([BACKUP_TASKS, "restore", backup_id, "--target-database-url", target, "--json", *flags],
                          env=env, capture_output=True, text=True, check=False)
    return done.returncode, json.loads(done.stdout), done.stderr


@pytest.mark.slow
def test_a_new_host_without_the_roles_refuses_then_with_roles_gets_the_database_whole(
        roles_db: ConnInfo, roles: Roles, fresh_server: ThrowawayCluster, tmp_path: Path) -> None:
    env = worker_env(DATABASE_URL=url_of(roles_db), BACKUP_DIR=str(tmp_path), BACKUP_LOCK_URL="")
    dumped = json.loads(subprocess.run([BACKUP_TASKS, "dump", "--json"], env=env, check=True, capture_output=True,
                                       text=True).stdout)
    server = fresh_server.conninfo("postgres")
    before = cluster_state(server)

    code, document, stderr = cli_restore(env, dumped["id"], fresh_server.url("aitrapp"))
    assert code == 1 and document["error_type"] == "RolesMissing" and "Traceback" not in stderr
    assert document["error"].startswith(f"the backup needs roles that do not exist on 127.0.0.1:{fresh_server.port}: "
                                        f"{roles.group}, {roles.owner}, {roles.reader}; pass --with-roles")
    assert "--no-owner" in document["error"] and "nothing was restored" in document["error"]
    assert cluster_state(server) == before  # no database (not even a staging one), no role
    code, document, stderr = cli_restore(env, dumped["id"], fresh_server.url("aitrapp"), "--with-roles", "--no-owner")
    assert code == 2 and "not allowed with argument" in document["error"] and cluster_state(server) == before

    code, document, stderr = cli_restore(env, dumped["id"], fresh_server.url("aitrapp"), "--with-roles")
    assert code == 0, stderr
    assert sorted(document["roles_created"]) == roles.names and document["policies_changed"] == []
    assert any(line.startswith("setting: TimeZone = Asia/Kolkata") for line in document["database_properties"])
    target = fresh_server.conninfo("aitrapp")
    assert schema_of(target) == schema_of(roles_db)  # owners, grants, policies (and their comment)
    assert database_properties(target) == database_properties(roles_db)
    assert role_facts(server, roles.names) == role_facts(roles_db, roles.names)


@pytest.mark.slow
def test_no_owner_restores_on_a_host_without_the_roles_cutting_policies_to_the_roles_present(
        roles_db: ConnInfo, roles: Roles, fresh_server: ThrowawayCluster,
        settings_for: Callable[..., Settings]) -> None:
    settings = settings_for(roles_db)
    manifest, _ = run_dump(settings)
    server = fresh_server.conninfo("postgres")
    _databases, roles_before = cluster_state(server)
    assert not set(roles.names) & set(roles_before)  # new names per test: another test's --with-roles is no help
    dbname = f"plain_{uuid.uuid4().hex[:6]}"
    with pytest.raises(RolesMissing) as refused:
        restore_backup(settings, manifest.id, fresh_server.url(dbname))
    assert refused.value.roles == roles.names

    result = restore_backup(settings, manifest.id, fresh_server.url(dbname), no_owner=True)
    assert result.ok and result.roles_created == []
    target = fresh_server.conninfo(dbname)
    # What --no-owner does with policies: cut to the roles that exist here, left out when none does.
    assert policies_of(target) == {"signals_mixed": (["postgres"], "for the reader and the superuser")}
    assert policies_of(roles_db)["signals_mixed"] == (sorted([roles.reader, "postgres"]),
                                                      "for the reader and the superuser")
    assert sorted(result.policies_changed) == [
        f"policy signals_mixed on public.signals: restored TO postgres only; the roles it also names are absent on "
        f"the target: {roles.reader}",
        f"policy signals_reader on public.signals: left out; it names only roles absent on the target "
        f"({roles.reader}), so it applied to no role here"]
    with connect(target) as conn:
        assert conn.execute("SELECT relrowsecurity FROM pg_class WHERE oid = 'signals'::regclass").fetchone()[0]
        owners = {r[0] for r in conn.execute("SELECT DISTINCT pg_get_userbyid(relowner) FROM pg_class c JOIN "
                                             "pg_namespace n ON n.oid = relnamespace WHERE nspname = 'public'")}
        assert owners == {"postgres"}
        assert conn.execute("SELECT count(*) FROM owned_elsewhere").fetchone()[0] == 1
        assert conn.execute("SHOW timezone").fetchone()[0] == "Asia/Kolkata"
    properties = database_properties(target)
    assert properties["owner"] == "postgres" and properties["comment"] == "trading, restored whole"
    assert properties["settings"] == [("", ["TimeZone=Asia/Kolkata"])]  # the reader's work_mem: no reader here
    assert cluster_state(server)[1] == roles_before  # no role created


def test_with_roles_and_no_owner_exclude_each_other(settings_for: Callable[..., Settings], pg_admin: ConnInfo) -> None:
    with pytest.raises(ConfigError, match="exclude each other"):
        restore_backup(settings_for(pg_admin), "any", url_of(pg_admin), no_owner=True, with_roles=True)


def test_a_staging_marker_carries_the_backups_database_comment_for_a_dead_runs_successor() -> None:
    marker = marker_for("0a1b2c3d", "aitrapp", "aitrapp-dump-x", "trading, restored whole")
    assert parse_marker(marker) == ("0a1b2c3d", "aitrapp") and marked_comment(marker) == "trading, restored whole"
    assert marked_comment(marker_for("0a1b2c3d", "aitrapp", "aitrapp-dump-x")) is None
    assert marked_comment("a comment of the user's") is None


def test_policy_head_reads_pg_dumps_create_policy() -> None:
    statement = ('CREATE POLICY "p "" TO x" ON "S TO"."t TO" AS RESTRICTIVE FOR SELECT TO postgres, "Odd ""Role""", '
                 'app_reader USING ((a > 1)) WITH CHECK (true);')
    head = policy_head(statement)
    assert (head.name, head.table) == ('"p "" TO x"', '"S TO"."t TO"')
    assert head.roles == [("postgres", "postgres"), ('Odd "Role"', '"Odd ""Role"""'), ("app_reader", "app_reader")]
    assert statement[head.start:head.end] == 'TO postgres, "Odd ""Role""", app_reader'
    assert policy_head("CREATE POLICY p ON public.t FOR INSERT WITH CHECK ((a > 0));").roles == []
    with pytest.raises(ValueError):
        policy_head("COMMENT ON POLICY p ON public.t IS 'x';")
