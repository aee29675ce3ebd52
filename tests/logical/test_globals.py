"""The roles and database properties travel with every dump: read exactly, stored like the dump, replayed safely.

The source is the shared server (roles are cluster-wide there: every name carries the test's own suffix,
and the database and roles are dropped afterwards); replays go to one throwaway cluster per module, where
each test's names are new too.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest

from backup_tasks.catalog import manifest as catalog
from backup_tasks.catalog.ids import backup_id_of, cluster_objects_key
from backup_tasks.catalog.prune import prune
from backup_tasks.clock import isoformat, parse_time
from backup_tasks.conninfo import ConnInfo
from backup_tasks.errors import BackupCorrupt, IdentityUnusable, RolesMissing, StorageFull
from backup_tasks.logical import dump as dump_module
from backup_tasks.logical.dump import run_dump
from backup_tasks.logical.globals import check_cluster_objects, load_cluster_objects
from backup_tasks.postgres.cluster import ThrowawayCluster
from backup_tasks.postgres.connect import connect
from backup_tasks.postgres.globals import (
    ClusterObjects,
    Membership,
    RoleSetting,
    read_cluster_objects,
)
from backup_tasks.postgres.recreate import (
    apply_database_properties,
    create_missing_roles,
    missing_roles,
    split_list_setting,
)
from backup_tasks.postgres.sampledata import generate
from backup_tasks.postgres.template import default_template_cache
from backup_tasks.settings import Settings
from backup_tasks.storage.locations import open_storage
from backup_tasks.streams.crypto import AGE_MAGIC, load_identities
from tests.support.crypto import write_identity_file

#: What the scene's roles are for (each name gets the test's suffix).
ROLES = ("own", "read", "pol", "grp", "top", "def", "set", "conn", "other")
OWNER_PASSWORD = "Own3r-pw!"


@dataclass
class Scene:
    """A database on the shared server whose objects name roles in every way a database can."""

    admin: ConnInfo
    db: ConnInfo
    suffix: str

    def role(self, short: str) -> str:
        return f"a1{short}_{self.suffix}"

    def roles(self, *shorts: str) -> set[str]:
        return {self.role(s) for s in shorts}


def _scene_sql(scene: Scene) -> tuple[list[str], list[str]]:
    """(statements on the server, statements in the database)."""
    r, db = scene.role, scene.db.dbname
    server = [
        *(f"CREATE ROLE {r(s)}" for s in ROLES),
        f"ALTER ROLE {r('own')} LOGIN PASSWORD '{OWNER_PASSWORD}' CONNECTION LIMIT 7 VALID UNTIL '2040-01-01 00:00+00'",
        f"COMMENT ON ROLE {r('own')} IS 'owns the trading tables'",
        f"GRANT {r('grp')} TO {r('pol')}",  # pol is named by a policy; grp and top only through membership
        f"GRANT {r('top')} TO {r('grp')} WITH ADMIN OPTION",
        f"GRANT {r('top')} TO {r('other')}",  # a member of a needed role, needed by nothing: not saved
        f"GRANT pg_read_all_stats TO {r('read')}",
        f"ALTER ROLE {r('read')} SET statement_timeout = '5s'",
        f"ALTER ROLE {r('other')} SET work_mem = '1MB'",
        f'ALTER ROLE {r("set")} IN DATABASE "{db}" SET work_mem = \'12MB\'',
        f"ALTER DATABASE \"{db}\" SET timezone = 'Asia/Kolkata'",
        f'ALTER DATABASE "{db}" SET search_path = "$user", public, "My Schema"',
        f'ALTER DATABASE "{db}" OWNER TO {r("own")}',
        f'REVOKE ALL ON DATABASE "{db}" FROM PUBLIC',
        f'GRANT CONNECT ON DATABASE "{db}" TO {r("conn")}',
        f'COMMENT ON DATABASE "{db}" IS \'the trading database\'',
        f'ALTER DATABASE "{db}" CONNECTION LIMIT 50',
    ]
    inside = [
        "CREATE TABLE t (a int)",
        f"ALTER TABLE t OWNER TO {r('own')}",
        f"GRANT SELECT ON t TO {r('read')}",
        f"CREATE POLICY p ON t TO {r('pol')} USING (true)",
        f"ALTER DEFAULT PRIVILEGES FOR ROLE {r('own')} GRANT SELECT ON TABLES TO {r('def')}",
    ]
    return server, inside


@pytest.fixture
def scene(pg_admin: ConnInfo) -> Iterator[Scene]:
    suffix = uuid.uuid4().hex[:8]
    made = Scene(admin=pg_admin, db=pg_admin.with_dbname(f"bt_test_globals_{suffix}"), suffix=suffix)
    with connect(pg_admin) as admin:
        admin.execute(f'CREATE DATABASE "{made.db.dbname}"')
    try:
        server, inside = _scene_sql(made)
        with connect(pg_admin) as admin:
            for statement in server:
                admin.execute(statement)
        with connect(made.db) as conn:
            for statement in inside:
                conn.execute(statement)
        yield made
    finally:
        with connect(pg_admin) as admin:  # the database first: its objects depend on the roles
            admin.execute(f'DROP DATABASE IF EXISTS "{made.db.dbname}" WITH (FORCE)')
            for short in ("backup", "reader", *ROLES):
                admin.execute(f"DROP ROLE IF EXISTS {made.role(short)}")


@pytest.fixture(scope="module")
def target() -> Iterator[ConnInfo]:
    """A fresh server with only its bootstrap superuser ``postgres``, shared by this module's tests."""
    with ThrowawayCluster(template_cache=default_template_cache()) as cluster:
        yield cluster.conninfo("postgres")


def read(conninfo: ConnInfo) -> ClusterObjects:
    with connect(conninfo) as conn:
        return read_cluster_objects(conn, conninfo.dbname)


# --- reading ---------------------------------------------------------------------------------------------

def test_every_role_the_database_names_is_saved_with_its_memberships_and_settings(scene: Scene) -> None:
    objects = read(scene.db)
    r = scene.role
    # owner, grantee, policy role, default ACL grantee, per-database setting, database ACL; grp and top because
    # pol is their member; never "other" (only a member of a needed role), PUBLIC, pg_* or the bootstrap superuser.
    assert set(objects.role_names()) == scene.roles("own", "read", "pol", "grp", "top", "def", "set", "conn")
    assert set(objects.needed) == scene.roles("own", "read", "pol", "def", "set", "conn") | {"postgres"}
    assert objects.bootstrap_superuser == "postgres"
    assert set(objects.memberships) == {
        Membership(r("grp"), r("pol"), False, "postgres"), Membership(r("top"), r("grp"), True, "postgres"),
        Membership("pg_read_all_stats", r("read"), False, "postgres")}
    assert objects.role_settings == [RoleSetting(r("read"), None, "statement_timeout", "5s")]
    owner = {role.name: role for role in objects.roles}[r("own")]
    assert (owner.login, owner.connection_limit, owner.comment) == (True, 7, "owns the trading tables")
    assert parse_time(owner.valid_until or "") == parse_time("2040-01-01T00:00:00Z")
    assert owner.password is not None and owner.password.startswith("SCRAM-SHA-256$")
    assert objects.passwords == "included"
    database = objects.database
    assert (database.name, database.owner, database.comment, database.connection_limit) == (
        scene.db.dbname, r("own"), "the trading database", 50)
    assert {(s.role, s.name, s.value) for s in database.settings} == {
        (None, "TimeZone", "Asia/Kolkata"), (None, "search_path", '"$user", public, "My Schema"'),
        (r("set"), "work_mem", "12MB")}
    assert {(g.grantee, g.privilege) for g in database.grants} == {
        (r("own"), "CREATE"), (r("own"), "TEMPORARY"), (r("own"), "CONNECT"), (r("conn"), "CONNECT")}
    assert database.acl is not None and len(database.acl) == 2 and database.encoding == "UTF8"


def test_the_document_round_trips_through_json(scene: Scene) -> None:
    objects = read(scene.db)
    raw = objects.to_json()
    assert ClusterObjects.from_json(raw) == objects
    document = json.loads(raw)
    document["added_by_a_newer_version"] = 1
    document["roles"][0]["also_new"] = True
    assert ClusterObjects.from_json(json.dumps(document).encode()) == objects
    with pytest.raises(ValueError, match="not a cluster-objects document"):
        ClusterObjects.from_json(b'{"roles": []}')


def test_password_verifiers_are_left_out_when_the_backup_role_may_not_read_them(scene: Scene) -> None:
    with connect(scene.admin) as admin:
        admin.execute(f"CREATE ROLE {scene.role('backup')} LOGIN")
        admin.execute(f'GRANT CONNECT ON DATABASE "{scene.db.dbname}" TO {scene.role("backup")}')
        admin.execute(f"CREATE ROLE {scene.role('reader')} LOGIN IN ROLE pg_read_all_data")
        admin.execute(f'GRANT CONNECT ON DATABASE "{scene.db.dbname}" TO {scene.role("reader")}')
        verifier = admin.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s",
                                 (scene.role("own"),)).fetchone()[0]
    as_superuser = read(scene.db)
    plain = read(replace(scene.db, user=scene.role("backup")))
    assert plain.passwords.startswith("left out: ") and "pg_authid" in plain.passwords
    assert all(role.password is None for role in plain.roles)
    # Everything else a plain role reads the same.
    assert [replace(role, password=None) for role in as_superuser.roles] == plain.roles
    assert (plain.memberships, plain.role_settings, plain.database) == (
        as_superuser.memberships, as_superuser.role_settings, as_superuser.database)
    reader = read(replace(scene.db, user=scene.role("reader")))
    assert reader.passwords == "included"
    assert {role.name: role.password for role in reader.roles}[scene.role("own")] == verifier


def test_list_settings_are_split_as_pg_dump_splits_them() -> None:
    assert split_list_setting('"$user", public, "My ""Quoted"" Schema"') == ["$user", "public", 'My "Quoted" Schema']
    assert split_list_setting("a,b") == ["a", "b"]
    assert split_list_setting("") == []


# --- replaying -------------------------------------------------------------------------------------------

def _roles_on(conn: psycopg.Connection, names: set[str]) -> dict[str, tuple[object, ...]]:
    rows = conn.execute(
        """SELECT a.rolname, a.rolcreatedb, a.rolcanlogin, a.rolconnlimit, a.rolpassword, a.rolvaliduntil,
                  shobj_description(a.oid, 'pg_authid'), r.rolconfig
             FROM pg_authid a JOIN pg_roles r ON r.oid = a.oid
            WHERE a.rolname = ANY(%s)""", (sorted(names),)).fetchall()
    return {row[0]: tuple(row[1:]) for row in rows}


def _memberships_on(conn: psycopg.Connection, names: set[str]) -> set[tuple[str, str, bool]]:
    rows = conn.execute(
        """SELECT pg_get_userbyid(roleid), pg_get_userbyid(member), admin_option FROM pg_auth_members
            WHERE pg_get_userbyid(member) = ANY(%s)""", (sorted(names),)).fetchall()
    return {(str(a), str(b), bool(c)) for a, b, c in rows}


@pytest.mark.slow
def test_missing_roles_are_created_with_memberships_and_existing_ones_never_altered(
        scene: Scene, target: ConnInfo) -> None:
    objects = read(scene.db)
    r = scene.role
    with connect(target) as conn:
        conn.execute(f"CREATE ROLE {r('grp')} CREATEDB")  # exists here, unlike the source's: left exactly as it is
        conn.execute(f"COMMENT ON ROLE {r('grp')} IS 'the target''s own'")
        before = _roles_on(conn, {r("grp")})
        assert missing_roles(conn, objects) == sorted(scene.roles("own", "read", "pol", "top", "def", "set", "conn"))
        notes: list[str] = []
        created = create_missing_roles(conn, objects, notes)
        assert sorted(created) == sorted(scene.roles("own", "read", "pol", "top", "def", "set", "conn"))
        assert missing_roles(conn, objects) == [] and create_missing_roles(conn, objects) == []
        assert _roles_on(conn, {r("grp")}) == before  # not altered
        # A new role joins its groups (even an existing one); an existing role is not put into a new one.
        assert _memberships_on(conn, scene.roles(*ROLES)) == {
            (r("grp"), r("pol"), False), ("pg_read_all_stats", r("read"), False)}
        assert notes == [f"membership of existing role {r('grp')} in new role {r('top')} not granted: existing "
                         f"roles are never altered"]
    with connect(scene.admin) as source_conn:
        source = _roles_on(source_conn, scene.roles("own", "read", "pol", "top", "def", "set", "conn"))
    with connect(target) as conn:
        assert _roles_on(conn, set(source)) == source  # attributes, verifier, valid until, comment, settings
    # The saved verifier logs in on the new server with the source's password.
    with psycopg.connect(**{**target.kwargs(), "user": r("own"), "password": OWNER_PASSWORD}) as owner:
        assert owner.execute("SELECT current_user").fetchone()[0] == r("own")


def test_database_properties_are_applied_to_the_staging_database(scene: Scene, target: ConnInfo) -> None:
    objects = read(scene.db)
    staging = f"staging_{scene.suffix}"
    with connect(target) as conn:
        conn.execute(f'CREATE DATABASE "{staging}"')
        # Without the roles: one error naming them all, and nothing applied.
        with pytest.raises(RolesMissing) as refused:
            apply_database_properties(conn, staging, objects)
        assert refused.value.roles == sorted(scene.roles("own", "conn", "set"))
        assert all(name in str(refused.value) for name in refused.value.roles)
        assert conn.execute("SELECT count(*) FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase "
                            "WHERE d.datname = %s", (staging,)).fetchone()[0] == 0
        create_missing_roles(conn, objects)
        lines = apply_database_properties(conn, staging, objects)
    assert f"owner: {scene.role('own')}" in lines and "comment set" in lines
    applied = read(replace(target, dbname=staging))
    source = objects.database
    got = applied.database
    assert (got.owner, got.comment, got.connection_limit) == (source.owner, source.comment, 50)
    assert {(s.role, s.name, s.value) for s in got.settings} == {(s.role, s.name, s.value) for s in source.settings}
    assert set(got.grants) == set(source.grants) and got.acl == source.acl
    with psycopg.connect(**{**target.kwargs(), "dbname": staging, "user": scene.role("own"),
                            "password": OWNER_PASSWORD}) as conn:
        assert conn.execute("SHOW TimeZone").fetchone()[0] == "Asia/Kolkata"
        assert conn.execute("SHOW search_path").fetchone()[0] == '"$user", public, "My Schema"'


def test_without_owners_and_privileges_absent_roles_are_skipped_with_a_line(scene: Scene, target: ConnInfo) -> None:
    objects = read(scene.db)
    staging = f"plain_{scene.suffix}"
    with connect(target) as conn:
        conn.execute(f'CREATE DATABASE "{staging}"')
        lines = apply_database_properties(conn, staging, objects, owner=False, privileges=False)
    assert f"setting work_mem for role {scene.role('set')} not applied: the role does not exist on this server" \
        in lines
    applied = read(replace(target, dbname=staging)).database
    assert applied.owner == "postgres" and applied.acl is None and applied.comment == "the trading database"
    assert {(s.role, s.name, s.value) for s in applied.settings} == {
        (None, "TimeZone", "Asia/Kolkata"), (None, "search_path", '"$user", public, "My Schema"')}


# --- stored with the dump --------------------------------------------------------------------------------

@pytest.fixture
def trading_scene(scene: Scene) -> Scene:
    generate(scene.db, signals=300)
    with connect(scene.db) as conn:
        conn.execute(f"CREATE POLICY recent ON trades TO {scene.role('pol')} USING (true)")
    return scene


def test_a_dump_stores_the_cluster_objects_beside_it_and_lists_them(
        trading_scene: Scene, settings_for: Callable[..., Settings]) -> None:
    settings = settings_for(trading_scene.db)
    manifest, _ = run_dump(settings)
    storage = open_storage(settings.backup_dir)
    entry = manifest.cluster_objects
    assert entry is not None and entry["key"] == cluster_objects_key(manifest.id, "zstd")
    assert sorted(entry["roles"]) == sorted(trading_scene.roles("own", "read", "pol", "grp", "top", "def", "set",
                                                                "conn"))
    assert entry["passwords"] == "included" and storage.size(entry["key"]) == entry["size_bytes"]
    assert manifest.files == {
        manifest.path: {"size": manifest.size_bytes, "sha256": manifest.sha256, "role": "dump"},
        entry["key"]: {"size": entry["size_bytes"], "sha256": entry["sha256"], "role": "cluster-objects"}}
    assert catalog.load(storage, manifest.id).cluster_objects == entry  # as published
    loaded = load_cluster_objects(storage, manifest, None)
    assert loaded is not None and loaded == read(trading_scene.db)
    assert [c.state for c in check_cluster_objects(storage, manifest)] == ["ok"]
    # Damaged: found by its checksum before anything reads it.
    path = Path(settings.backup_dir) / entry["key"]
    path.write_bytes(path.read_bytes()[:-1] + bytes([path.read_bytes()[-1] ^ 1]))
    assert [c.state for c in check_cluster_objects(storage, manifest)] == ["damaged"]
    with pytest.raises(BackupCorrupt, match="fails its checksum"):
        load_cluster_objects(storage, manifest, None)
    # A dump taken before this change has none.
    assert load_cluster_objects(storage, replace(manifest, cluster_objects=None), None) is None


def test_an_encrypted_dump_stores_them_encrypted(
        trading_scene: Scene, settings_for: Callable[..., Settings], tmp_path: Path) -> None:
    identity = tmp_path / "identity.txt"
    public = write_identity_file(identity)
    settings = settings_for(trading_scene.db, encrypt_recipients=(public,), decrypt_identity_file=identity)
    manifest, _ = run_dump(settings)
    entry = manifest.cluster_objects
    assert entry is not None and entry["key"].endswith(".globals.json.zst.age")
    raw = (Path(settings.backup_dir) / entry["key"]).read_bytes()
    assert raw.startswith(AGE_MAGIC) and b"SCRAM-SHA-256" not in raw
    storage = open_storage(settings.backup_dir)
    loaded = load_cluster_objects(storage, manifest, load_identities(identity))
    assert loaded is not None and trading_scene.role("own") in loaded.role_names()
    with pytest.raises(IdentityUnusable):
        load_cluster_objects(storage, manifest, None)


def test_a_dump_whose_roles_cannot_be_stored_is_not_kept(
        trading_scene: Scene, settings_for: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_for(trading_scene.db)

    def full(*_args: object) -> dict[str, object]:
        raise StorageFull("no space left on device")

    monkeypatch.setattr(dump_module, "store_cluster_objects", full)
    with pytest.raises(StorageFull):
        run_dump(settings)
    assert [obj.key for obj in open_storage(settings.backup_dir).list(recursive=False)] == []


def test_prune_removes_the_cluster_objects_with_their_dump(
        trading_scene: Scene, settings_for: Callable[..., Settings]) -> None:
    settings = settings_for(trading_scene.db, keep_daily_days=1)
    old, _ = run_dump(settings)
    new, _ = run_dump(settings)
    storage = open_storage(settings.backup_dir)
    aged = catalog.Manifest.from_dict(old.to_dict())  # a month old: expired (rewritten in place, as tests may)
    aged.started_at = aged.finished_at = isoformat(parse_time(old.started_at) - timedelta(days=30))
    storage.put_bytes(aged.key, aged.to_json().encode())
    assert old.cluster_objects and new.cluster_objects
    report = prune(settings)
    assert report.deleted == [old.id]
    keys = {obj.key for obj in storage.list(recursive=False)}
    assert old.cluster_objects["key"] not in keys and old.path not in keys
    assert {new.cluster_objects["key"], new.path, new.key} <= keys


def test_an_orphaned_cluster_objects_object_is_cleared_by_the_next_dump(
        trading_scene: Scene, settings_for: Callable[..., Settings]) -> None:
    settings = settings_for(trading_scene.db)
    storage = open_storage(settings.backup_dir)
    orphan_id = f"{trading_scene.db.dbname}-dump-20260101T000000Z"
    orphan = cluster_objects_key(orphan_id, "zstd")
    assert backup_id_of(orphan, "dump", database=trading_scene.db.dbname) == orphan_id
    storage.put_bytes(orphan, b"left by a killed run")  # no manifest names it
    manifest, _ = run_dump(settings)
    keys = {obj.key for obj in storage.list(recursive=False)}
    assert orphan not in keys and manifest.cluster_objects and manifest.cluster_objects["key"] in keys


def test_prune_of_a_manifest_copied_from_another_backup_leaves_that_backups_objects(
        trading_scene: Scene, settings_for: Callable[..., Settings]) -> None:
    settings = settings_for(trading_scene.db, keep_daily_days=1)
    real, _ = run_dump(settings)
    storage = open_storage(settings.backup_dir)
    copy = catalog.Manifest.from_dict(real.to_dict())  # as tests age a dump: its files still name the real one's
    started = parse_time(real.started_at) - timedelta(days=30)
    copy.id = f"{real.database}-dump-{started.strftime('%Y%m%dT%H%M%SZ')}"
    copy.started_at = copy.finished_at = isoformat(started)
    copy.path = real.path.replace(real.id, copy.id)
    storage.put_bytes(copy.path, storage.read_bytes(real.path))
    catalog.save_new(storage, copy)
    assert prune(settings).deleted == [copy.id]
    keys = {obj.key for obj in storage.list(recursive=False)}
    assert real.cluster_objects and {real.path, real.cluster_objects["key"], real.key} <= keys
    assert not any(key.startswith(f"{copy.id}.") for key in keys)
