"""Issue 19: verify proves owners, grants and policies (the roles saved with the dump go into the throwaway cluster)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from backup_tasks.catalog import manifest as catalog
from backup_tasks.catalog.manifest import Manifest
from backup_tasks.conninfo import ConnInfo
from backup_tasks.logical.dump import run_dump
from backup_tasks.logical.verify import verify_backup
from backup_tasks.postgres.cluster import ThrowawayCluster
from backup_tasks.postgres.connect import connect
from backup_tasks.settings import Settings
from backup_tasks.storage.locations import open_storage
from tests.support.postgres import url_of
from tests.support.roles import Roles


def dumped(settings: Settings) -> Manifest:
    manifest, _ = run_dump(settings)
    assert manifest.cluster_objects is not None
    return manifest


def save_manifest(settings: Settings, manifest: Manifest) -> None:
    open_storage(settings.backup_dir).put_bytes(manifest.key, manifest.to_json().encode())  # tampered in place


def rewrite_cluster_objects(settings: Settings, manifest: Manifest, mutate: Callable[[dict], dict]) -> None:
    """Change the saved roles document and re-seal its checksum in the manifest: only the restore can tell."""
    entry = manifest.cluster_objects
    assert entry is not None and manifest.compression == "zstd" and not manifest.encryption
    path = Path(settings.backup_dir) / entry["key"]
    document = mutate(json.loads(zstandard.ZstdDecompressor().stream_reader(path.read_bytes()).read()))
    stored = zstandard.ZstdCompressor().compress(json.dumps(document).encode())
    path.write_bytes(stored)
    entry.update(size_bytes=len(stored), sha256=hashlib.sha256(stored).hexdigest())
    if manifest.files and entry["key"] in manifest.files:
        manifest.files[entry["key"]].update(size=len(stored), sha256=entry["sha256"])
    save_manifest(settings, manifest)


@pytest.mark.slow
def test_the_trading_schema_with_a_role_named_policy_verifies_with_owners_grants_and_policies(
        roles_db: ConnInfo, roles: Roles, settings_for: Callable[..., Settings]) -> None:
    """Issue 19's first bullet (and its quick-suite case): before, this failed with role "..." does not exist."""
    settings = settings_for(roles_db)
    manifest = dumped(settings)
    result = verify_backup(settings, manifest.id)
    assert result.ok, result.problems
    assert result.checked == ["sha256", "roles", "restore", "owners", "privileges", "row-counts", "amcheck",
                              "database-properties"]
    assert result.details is not None
    assert sorted(result.details["roles_created"]) == roles.names
    assert result.details["owners_and_privileges"] == "checked: restored with the backup's roles"
    assert {f"owner: {roles.owner}", "setting: TimeZone = Asia/Kolkata",
            f"setting: work_mem = 8MB for role {roles.reader}"} <= set(result.details["database_properties"])
    assert "policies_changed" not in result.details
    recorded = catalog.load(open_storage(settings.backup_dir), manifest.id).verification
    assert recorded == result


@pytest.mark.slow
def test_a_dump_whose_grants_and_policies_cannot_be_restored_fails_for_that_reason(
        roles_db: ConnInfo, roles: Roles, settings_for: Callable[..., Settings]) -> None:
    settings = settings_for(roles_db)
    manifest = dumped(settings)

    def without_reader(document: dict) -> dict:  # the saved roles no longer cover what the dump names
        document["roles"] = [r for r in document["roles"] if r["name"] != roles.reader]
        document["memberships"] = [m for m in document["memberships"] if m["member"] != roles.reader]
        document["database"]["settings"] = [s for s in document["database"]["settings"] if s["role"] != roles.reader]
        document["database"]["grants"] = [g for g in document["database"]["grants"] if g["grantee"] != roles.reader]
        document["role_settings"] = [s for s in document["role_settings"] if s["role"] != roles.reader]
        return document

    rewrite_cluster_objects(settings, manifest, without_reader)
    result = verify_backup(settings, manifest.id)
    assert not result.ok and result.checked == ["sha256", "roles"]
    assert len(result.problems) == 1 and "pg_restore" in result.problems[0]
    assert f'role "{roles.reader}" does not exist' in result.problems[0]
    assert sorted(result.details["roles_created"]) == sorted([roles.owner, roles.group])  # type: ignore[index]


@pytest.mark.slow
def test_damaged_saved_roles_fail_verification_saying_which_object(
        roles_db: ConnInfo, settings_for: Callable[..., Settings]) -> None:
    settings = settings_for(roles_db)
    manifest = dumped(settings)
    path = Path(settings.backup_dir) / manifest.cluster_objects["key"]  # type: ignore[index]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    result = verify_backup(settings, manifest.id)
    assert not result.ok and result.checked == []
    assert result.problems[0].startswith(f"the saved roles of {manifest.id}: {manifest.cluster_objects['key']}")
    assert "fails its checksum" in result.problems[0]


@pytest.mark.slow
def test_a_dump_from_before_roles_were_saved_verifies_without_owners_saying_so(
        roles_db: ConnInfo, roles: Roles, settings_for: Callable[..., Settings]) -> None:
    settings = settings_for(roles_db)
    manifest = dumped(settings)
    (Path(settings.backup_dir) / manifest.cluster_objects["key"]).unlink()  # type: ignore[index]
    manifest.cluster_objects, manifest.files = None, None  # as a dump taken before issue 19 is recorded
    save_manifest(settings, manifest)
    result = verify_backup(settings, manifest.id)
    assert result.ok, result.problems  # before: role "bt_reader_..." does not exist (its policies)
    assert result.checked == ["sha256", "restore", "row-counts", "amcheck"]
    assert result.details == {
        "owners_and_privileges": "not checked: the dump was taken before roles were saved with dumps; restored "
                                 "without owners and privileges",
        "policies_changed": [  # in the archive's order
            f"policy signals_mixed on public.signals: restored TO postgres only; the roles it also names are absent "
            f"on the target: {roles.reader}",
            f"policy signals_reader on public.signals: left out; it names only roles absent on the target "
            f"({roles.reader}), so it applied to no role here"]}


@pytest.mark.slow
def test_a_verify_server_without_the_roles_gets_none_created_and_says_what_was_not_checked(
        roles_db: ConnInfo, roles: Roles, settings_for: Callable[..., Settings]) -> None:
    with ThrowawayCluster() as elsewhere:  # someone's server: it lacks our roles, and must keep lacking them
        def role_names() -> list[str]:
            with connect(elsewhere.conninfo()) as conn:
                return [r[0] for r in conn.execute("SELECT rolname FROM pg_roles ORDER BY 1")]

        before = role_names()
        settings = settings_for(roles_db, verify_database_url=elsewhere.url())
        result = verify_backup(settings, dumped(settings).id)
        assert result.ok and result.method == "scratch-database", result.problems
        assert role_names() == before
    assert result.checked == ["sha256", "restore", "row-counts", "amcheck", "database-properties"]
    assert result.details is not None
    assert result.details["owners_and_privileges"] == (
        f"not checked: the verify server (VERIFY_DATABASE_URL) lacks roles the backup needs ({', '.join(roles.names)}),"
        f" and verify never creates roles there; restored without owners and privileges")
    assert len(result.details["policies_changed"]) == 2


@pytest.mark.slow
def test_a_verify_server_with_every_role_checks_owners_there(
        roles_db: ConnInfo, settings_for: Callable[..., Settings], pg_admin: ConnInfo) -> None:
    settings = settings_for(roles_db, verify_database_url=url_of(pg_admin))  # the roles live on this server
    result = verify_backup(settings, dumped(settings).id)
    assert result.ok and result.method == "scratch-database", result.problems
    assert {"roles", "owners", "privileges", "database-properties"} <= set(result.checked)
    assert result.details["owners_and_privileges"] == (  # type: ignore[index]
        "checked: every role the backup needs exists on the verify server")
