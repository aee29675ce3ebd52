"""Restoring a dump: stream it decompressed into ``pg_restore``; the user-facing ``restore`` command.

The archive is checked against its manifest's checksum before a single row is written; the restored
copy is compared with the manifest's row counts before it takes the target's name (``logical.swap``).

The database is restored as it was (issue 19): the roles saved with the dump (``logical.globals``)
must exist on the target, or ``--with-roles`` creates the missing ones (never altering an existing
role), or ``--no-owner`` restores without owners and privileges; otherwise one ``RolesMissing``
names them before anything is written. The database's own properties (owner, ``ALTER DATABASE ...
SET``, ACL, comment), which ``pg_restore`` without ``--create`` skips, are applied to the staging
copy before the swap, which keeps them (a rename keeps the OID they hang on).

``pg_restore`` itself runs in ``logical.pgrestore``; ``--no-owner`` with policies naming absent roles
is ``logical.noowner``.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field, replace

import psycopg

from backup_tasks.catalog import manifest as catalog
from backup_tasks.catalog.compare import compare_counts
from backup_tasks.catalog.keys import identities_for
from backup_tasks.catalog.manifest import Manifest
from backup_tasks.conninfo import ConnInfo
from backup_tasks.errors import (
    BackupError,
    ConfigError,
    RestoreFailed,
    RestoreRefused,
    RolesMissing,
)
from backup_tasks.logical.globals import load_cluster_objects
from backup_tasks.logical.noowner import NoOwnerPlan, plan_without_owners, run_after
from backup_tasks.logical.pgrestore import WITHOUT_OWNERS, pg_restore_into
from backup_tasks.logical.swap import Interrupted, SignalGuard, StagingDatabase, refuse_if_in_use
from backup_tasks.postgres.connect import connect
from backup_tasks.postgres.failures import first_line
from backup_tasks.postgres.globals import ClusterObjects
from backup_tasks.postgres.queries import count_rows, database_is_empty
from backup_tasks.postgres.recreate import (
    apply_database_properties,
    create_missing_roles,
    existing_roles,
    missing_roles,
)
from backup_tasks.settings import Settings
from backup_tasks.storage.base import Storage
from backup_tasks.storage.integrity import first_good
from backup_tasks.streams.crypto import Identities, check_identity, manifest_recipients


def check_checksum(storage: Storage, manifest: Manifest) -> Storage:
    """Check the stored object against its manifest's size and sha256 in each location, primary first.

    Returns the first location holding a good copy (restore reads from that one only); raises
    ``BackupCorrupt`` saying what differs where, or ``ObjectMissing`` when no location has it.
    """
    good, _checks = first_good(storage, manifest.path, size=manifest.size_bytes, sha256=manifest.sha256)
    return good


def check_decryptable(storage: Storage, manifest: Manifest, identities: Identities | None) -> None:
    """Fail before the target is touched when the identity cannot open the backup (reads its first chunk)."""
    if identities is None:
        return
    check_identity(storage.open(manifest.path), identities, what=f"backup {manifest.id}",
                   recipients=manifest_recipients(manifest.encryption))


# --- the restore command ------------------------------------------------------------------------------

@dataclass
class RestoreResult:
    backup_id: str
    target: str
    tables: int
    rows: int
    replaced: bool
    ok: bool = True
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: Roles ``--with-roles`` created on the target server (existing roles are never altered).
    roles_created: list[str] = field(default_factory=list)
    #: The database properties applied to the restored database (owner, settings, ACL, comment).
    database_properties: list[str] = field(default_factory=list)
    #: With ``--no-owner``: each policy cut to the roles present on the target, or left out.
    policies_changed: list[str] = field(default_factory=list)


def restore_backup(settings: Settings, backup_id: str, target_url: str | None, *, replace: bool = False,
                   no_owner: bool = False, with_roles: bool = False) -> RestoreResult:
    """Restore dump ``backup_id`` into the database named by ``target_url`` (created when missing).

    The dump goes into a staging database that takes the target's name only once ``pg_restore``
    succeeded and its row counts match the manifest (``logical.swap``). Whatever stops it (an error,
    SIGINT, SIGTERM), the target holds its old or the new data, or the message names the database
    holding the old data; the staging copy never outlives the run.
    """
    if no_owner and with_roles:
        raise ConfigError("--with-roles and --no-owner exclude each other: create the backup's roles and keep "
                          "owners and privileges (--with-roles), or restore without them (--no-owner)")
    url = target_url or settings.restore_database_url
    if not url:
        raise ConfigError("no restore target: pass --target-database-url or set RESTORE_DATABASE_URL")
    target = ConnInfo.from_url(url, setting="the restore target URL")
    guard = SignalGuard()
    staging: StagingDatabase | None = None
    with guard.installed():  # from here SIGTERM, like SIGINT, raises Interrupted (or waits for a safe moment)
        try:
            manifest, storage, identities = _checked_backup(settings, backup_id, target, replace=replace)
            objects = load_cluster_objects(storage, manifest, identities)  # None: a dump from before roles were saved
            comment = objects.database.comment if objects is not None else None
            staging = StagingDatabase(target.with_dbname("postgres"), target.dbname, guard, backup_id=backup_id,
                                      comment=comment)
            with staging.session():
                try:
                    return _restore_staged(staging, settings, manifest, storage, identities, target, objects,
                                           replace=replace, no_owner=no_owner, with_roles=with_roles)
                except BaseException as exc:
                    raise staging.failure(exc, what=f"restore of {backup_id} into {target.redacted()}") from None
        except KeyboardInterrupt as exc:
            if isinstance(exc, Interrupted) and str(exc):
                raise  # it already says what is where
            # Taken outside the session (connecting, closing): the server still says what is where.
            outcome = (staging.settle() if staging is not None
                       else f"{target.dbname!r} was left as it was; nothing was created")
            raise Interrupted(getattr(exc, "signum", signal.SIGINT), outcome) from None


def _checked_backup(settings: Settings, backup_id: str, target: ConnInfo, *,
                    replace: bool) -> tuple[Manifest, Storage, Identities | None]:
    """The manifest, a location with a good copy, and the identities: all checked before the server is touched."""
    storage = settings.locations()
    manifest = catalog.load(storage, backup_id)
    if manifest.kind != "dump":
        raise ConfigError(f"{backup_id} is a {manifest.kind}, not a dump; use restore-pitr for snapshots")
    if settings.database_url:
        source = settings.source()
        if (source.server_label, source.dbname) == (target.server_label, target.dbname) and not replace:
            raise RestoreRefused(f"the target {target.redacted()} is the database being backed up; "
                                 f"pass --replace if you really mean to overwrite it")
    identities = identities_for(settings, manifest)
    storage = check_checksum(storage, manifest)  # the first location with a good copy
    check_decryptable(storage, manifest, identities)
    return manifest, storage, identities


def _refuse_missing_roles(admin: psycopg.Connection, objects: ClusterObjects | None, target: ConnInfo, *,
                          no_owner: bool, with_roles: bool) -> list[str]:
    """The roles the backup needs that the target server lacks; ``RolesMissing`` unless a flag says what to do."""
    missing = missing_roles(admin, objects) if objects is not None else []
    if missing and not (no_owner or with_roles):
        raise RolesMissing(f"the backup needs roles that do not exist on {target.server_label}: "
                           f"{', '.join(missing)}; pass --with-roles to create them (existing roles are not "
                           f"altered), or --no-owner to restore without owners and privileges (nothing was "
                           f"restored)", missing)
    return missing


def _restore_staged(staging: StagingDatabase, settings: Settings, manifest: Manifest, storage: Storage,
                    identities: Identities | None, target: ConnInfo, objects: ClusterObjects | None, *,
                    replace: bool, no_owner: bool, with_roles: bool) -> RestoreResult:
    """Restore into the staging database, compare its row counts, and swap it in only when they match."""
    missing = _refuse_missing_roles(staging.admin, objects, target, no_owner=no_owner, with_roles=with_roles)
    notes = staging.clear_dead_runs()
    major = int(staging.admin.info.server_version) // 10000
    replaced = False  # whether a non-empty target is dropped for the restored copy
    if staging.find_target():
        with connect(target) as conn:
            replaced = not database_is_empty(conn)
        if replaced and not replace:
            raise RestoreRefused(f"database {target.dbname!r} on {target.server_label} is not empty; "
                                 f"restore into a new name, or pass --replace to drop and recreate it")
        refuse_if_in_use(staging.admin, target.dbname, server=target.server_label)
    plan = NoOwnerPlan()
    if no_owner:
        plan = plan_without_owners(storage, manifest, existing_roles(staging.admin), min_major=major,
                                   settings=settings, identities=identities)
    roles_created: list[str] = []
    if with_roles and objects is None:
        notes.append(f"{manifest.id} was taken before roles were saved with dumps: --with-roles had nothing to "
                     f"create from")
    elif with_roles and missing:
        assert objects is not None
        # One transaction; RestoreFailed (nothing created) when this role may not create them.
        roles_created = create_missing_roles(staging.admin, objects, notes)
    try:
        staging.create()
        staged = target.with_dbname(staging.name)
        pg_restore_into(storage, manifest, staged, min_major=major, settings=settings,
                        extra_args=WITHOUT_OWNERS if no_owner else (), identities=identities, use_list=plan.use_list)
        run_after(staged, plan)
        with connect(staged) as conn:
            restored = count_rows(conn)
        problems = compare_counts(manifest.tables, restored)
        properties: list[str] = []
        if problems:  # compared before anything is swapped: the target keeps what it held
            staging.discard()
            kept = "was left as it was" if staging.old_oid is not None else "was not created"
            notes.append(f"nothing was swapped in: {target.dbname!r} {kept}, and the restored copy was removed")
            replaced = False
        else:
            if objects is not None:
                properties = _apply_properties(staging, objects, no_owner=no_owner)
            notes += staging.swap_in()
    except BackupError as exc:
        if roles_created:  # they stay: say so, so that nobody wonders where they came from
            exc.message += f"; the roles created for it are kept: {', '.join(roles_created)}"
        raise
    return RestoreResult(backup_id=manifest.id, target=target.redacted(), tables=len(restored),
                         rows=sum(restored.values()), replaced=replaced, ok=not problems, problems=problems,
                         notes=notes, roles_created=roles_created, database_properties=properties,
                         policies_changed=plan.changes)


def _apply_properties(staging: StagingDatabase, objects: ClusterObjects, *, no_owner: bool) -> list[str]:
    """Owner (unless --no-owner), settings, ACL (unless --no-owner) of the backup's database, on the staging copy."""
    # The comment is set by the swap (the staging copy's comment is its marker until then).
    without_comment = replace(objects, database=replace(objects.database, comment=None))
    try:
        lines = staging.apply_properties(
            lambda conn, name: apply_database_properties(conn, name, without_comment, owner=not no_owner,
                                                         privileges=not no_owner))
    except psycopg.Error as exc:
        if (exc.sqlstate or "08")[:2] in ("08", "57"):
            raise
        raise RestoreFailed(f"applying the database's own properties (owner, settings, ACL) to the restored copy "
                            f"failed: {first_line(str(exc))}; nothing was swapped in") from None
    return lines + (["comment set"] if objects.database.comment is not None else [])
