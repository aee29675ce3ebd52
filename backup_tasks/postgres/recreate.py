"""Recreating the cluster-level objects a dump saved (``postgres.globals``) on a server, before a restore.

``missing_roles`` says which roles the backup needs that the server lacks; ``create_missing_roles``
and ``apply_database_properties`` replay the document, every name and value through ``psycopg.sql``
(no string-pasted names), in one transaction each. ``create_missing_roles`` never alters a role that
exists: a membership is granted only to a role it has just created.

Imports: core and psycopg only (like every ``postgres`` module).
"""

from __future__ import annotations

import logging

import psycopg
from psycopg import sql

from backup_tasks.errors import RestoreFailed, RolesMissing
from backup_tasks.postgres.failures import first_line
from backup_tasks.postgres.globals import (
    ClusterObjects,
    DatabaseGrant,
    Membership,
    RoleDef,
    RoleSetting,
)

log = logging.getLogger(__name__)

#: Settings whose value is a list of quoted elements (pg_dump's ``variable_is_guc_list_quote``): each element
#: is replayed as its own literal, or ``search_path = '"$user", public'`` would become a one-element path.
LIST_SETTINGS = frozenset({"local_preload_libraries", "search_path", "session_preload_libraries",
                           "shared_preload_libraries", "temp_tablespaces", "unix_socket_directories"})

#: The privileges a database ACL can hold (``aclexplode``'s names): the only words pasted into SQL.
DATABASE_PRIVILEGES = frozenset({"CREATE", "TEMPORARY", "CONNECT"})


def existing_roles(conn: psycopg.Connection) -> set[str]:
    return {str(row[0]) for row in conn.execute("SELECT rolname FROM pg_catalog.pg_roles").fetchall()}


def missing_roles(conn: psycopg.Connection, objects: ClusterObjects) -> list[str]:
    """The roles the backup needs (``required_names``) that this server lacks, in creation order."""
    present = existing_roles(conn)
    return [name for name in objects.required_names() if name not in present]


def split_list_setting(value: str) -> list[str]:
    """A list setting's stored value as its elements (pg_dump's ``SplitGUCList``): comma-separated, each
    element double-quoted (``""`` inside is a quote) or bare (kept as written, surrounding blanks dropped)."""
    elements: list[str] = []
    at, end = 0, len(value)
    while True:
        while at < end and value[at].isspace():
            at += 1
        if at >= end:
            return elements
        if value[at] == '"':
            at += 1
            parts: list[str] = []
            while at < end:
                close = value.find('"', at)
                if close < 0:
                    parts.append(value[at:])
                    at = end
                elif value[close + 1:close + 2] == '"':
                    parts.append(value[at:close + 1])
                    at = close + 2
                else:
                    parts.append(value[at:close])
                    at = close + 1
                    break
            elements.append("".join(parts))
        else:
            comma = value.find(",", at)
            comma = end if comma < 0 else comma
            elements.append(value[at:comma].rstrip())
            at = comma
        while at < end and value[at].isspace():
            at += 1
        if at >= end or value[at] != ",":
            return elements
        at += 1


def setting_value(name: str, value: str) -> sql.Composable:
    """The right-hand side of ``SET name = ...`` as pg_dump writes it: one literal, or one per list element."""
    if name.lower() in LIST_SETTINGS:
        elements = split_list_setting(value)
        if elements:
            return sql.SQL(", ").join(sql.Literal(element) for element in elements)
    return sql.Literal(value)


def _set_statement(setting: RoleSetting, dbname: str | None) -> sql.Composed:
    assignment = sql.SQL("SET {} = {}").format(sql.Identifier(setting.name), setting_value(setting.name,
                                                                                          setting.value))
    if setting.role is None:
        assert dbname is not None
        return sql.SQL("ALTER DATABASE {} ").format(sql.Identifier(dbname)) + assignment
    if dbname is None:
        return sql.SQL("ALTER ROLE {} ").format(sql.Identifier(setting.role)) + assignment
    return sql.SQL("ALTER ROLE {} IN DATABASE {} ").format(sql.Identifier(setting.role),
                                                           sql.Identifier(dbname)) + assignment


def _create_role(role: RoleDef) -> sql.Composed:
    def flag(on: bool, word: str) -> sql.SQL:
        return sql.SQL(word if on else "NO" + word)

    parts: list[sql.Composable] = [flag(role.superuser, "SUPERUSER"), flag(role.createdb, "CREATEDB"),
                                   flag(role.createrole, "CREATEROLE"), flag(role.inherit, "INHERIT"),
                                   flag(role.login, "LOGIN"), flag(role.replication, "REPLICATION"),
                                   flag(role.bypassrls, "BYPASSRLS")]
    if role.connection_limit != -1:
        parts.append(sql.SQL("CONNECTION LIMIT {}").format(sql.Literal(int(role.connection_limit))))
    if role.password is not None:
        parts.append(sql.SQL("PASSWORD {}").format(sql.Literal(role.password)))  # a verifier: stored as it is
    if role.valid_until is not None:
        parts.append(sql.SQL("VALID UNTIL {}").format(sql.Literal(role.valid_until)))
    return sql.SQL("CREATE ROLE {} WITH ").format(sql.Identifier(role.name)) + sql.SQL(" ").join(parts)


def _grant_membership(membership: Membership, *, major: int, grantor: bool) -> sql.Composed:
    options: list[sql.Composable] = []
    if membership.admin_option:
        options.append(sql.SQL("ADMIN TRUE") if major >= 16 else sql.SQL("ADMIN OPTION"))
    if major >= 16:
        if membership.inherit_option is not None:
            options.append(sql.SQL("INHERIT {}").format(sql.SQL("TRUE" if membership.inherit_option else "FALSE")))
        if membership.set_option is not None:
            options.append(sql.SQL("SET {}").format(sql.SQL("TRUE" if membership.set_option else "FALSE")))
    statement = sql.SQL("GRANT {} TO {}").format(sql.Identifier(membership.role), sql.Identifier(membership.member))
    if options:
        statement += sql.SQL(" WITH ") + sql.SQL(", ").join(options)
    if grantor and membership.grantor:
        statement += sql.SQL(" GRANTED BY {}").format(sql.Identifier(membership.grantor))
    return statement


def _failed(what: str, exc: psycopg.Error) -> RestoreFailed:
    # The server's reason only (never the statement: a CREATE ROLE carries a password verifier).
    return RestoreFailed(f"{what} failed: {first_line(str(exc))}; nothing was changed: connect to the target as a "
                         f"superuser (creating roles with their attributes, and some settings, need one) and try again")


def create_missing_roles(conn: psycopg.Connection, objects: ClusterObjects,
                         notes: list[str] | None = None) -> list[str]:
    """Create every role the backup needs that this server lacks, with its attributes, password verifier and
    comment, then its memberships and settings; the names created. All or nothing (one transaction).

    Never alters a role that exists: a membership is granted only when its member was created here (a
    new role joining an existing group changes only the new role); one that would add an existing role to a
    new group is skipped, with a line in ``notes``. The source's bootstrap superuser, when this server
    has no role of that name, is created as a plain role without login (it only owns objects here).
    """
    notes = notes if notes is not None else []
    missing = missing_roles(conn, objects)
    if not missing:
        return []
    created = set(missing)
    major = conn.info.server_version // 10000
    present = existing_roles(conn)
    by_name = {role.name: role for role in objects.roles}
    try:
        with conn.transaction():
            for name in missing:
                role = by_name.get(name)
                if role is None:  # the bootstrap superuser of the source: an owner's name, nothing more
                    conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(name)))
                    notes.append(f"role {name} (the source's bootstrap superuser) created without login or "
                                 f"attributes: it owns objects here only")
                    continue
                conn.execute(_create_role(role))
                if role.comment is not None:
                    conn.execute(sql.SQL("COMMENT ON ROLE {} IS {}").format(sql.Identifier(name),
                                                                           sql.Literal(role.comment)))
            available = present | created
            for membership in objects.memberships:
                if membership.member not in created:
                    if membership.role in created:
                        notes.append(f"membership of existing role {membership.member} in new role "
                                     f"{membership.role} not granted: existing roles are never altered")
                    continue
                if membership.role not in available:
                    notes.append(f"membership of {membership.member} in {membership.role} not granted: "
                                 f"{membership.role} does not exist here")
                    continue
                _grant(conn, membership, major=major, grantor_known=membership.grantor in available)
            for setting in objects.role_settings:
                if setting.role in created:
                    conn.execute(_set_statement(setting, None))
    except psycopg.Error as exc:
        raise _failed(f"creating the roles {', '.join(missing)}", exc) from None
    log.info("created %d role(s): %s", len(missing), ", ".join(missing))
    return missing


def _grant(conn: psycopg.Connection, membership: Membership, *, major: int, grantor_known: bool) -> None:
    """Grant one membership, recording its grantor where this server accepts it (15: superusers may name any
    role; 16: only one holding ADMIN OPTION on the role), else as granted by the current user."""
    if grantor_known and membership.grantor:
        try:
            with conn.transaction():  # a savepoint: a refused GRANTED BY leaves the outer transaction usable
                conn.execute(_grant_membership(membership, major=major, grantor=True))
            return
        except psycopg.Error as exc:
            log.info("granting %s to %s as granted by %s was refused (%s): granted without it", membership.role,
                     membership.member, membership.grantor, first_line(str(exc)))
    conn.execute(_grant_membership(membership, major=major, grantor=False))


def _grant_key(grant: DatabaseGrant) -> tuple[str | None, str]:
    return grant.grantee, grant.privilege


def _current_grants(conn: psycopg.Connection, dbname: str) -> tuple[str, list[DatabaseGrant]]:
    """The database's owner and ACL, exploded (the default ACL spelt out: never empty for a database that exists)."""
    rows = conn.execute(
        """SELECT pg_catalog.pg_get_userbyid(d.datdba),
                  CASE WHEN a.grantee = 0 THEN NULL ELSE pg_catalog.pg_get_userbyid(a.grantee) END,
                  a.privilege_type, a.is_grantable, pg_catalog.pg_get_userbyid(a.grantor)
             FROM pg_catalog.pg_database d,
                  pg_catalog.aclexplode(coalesce(d.datacl, pg_catalog.acldefault('d', d.datdba))) a
            WHERE d.datname = %s""", (dbname,)).fetchall()
    if not rows:
        raise RestoreFailed(f"database {dbname} does not exist on this server")
    return str(rows[0][0]), [DatabaseGrant(grantee, str(privilege), bool(grantable), str(grantor))
                             for _owner, grantee, privilege, grantable, grantor in rows]


def _privilege(grant: DatabaseGrant) -> sql.SQL:
    if grant.privilege not in DATABASE_PRIVILEGES:
        raise RestoreFailed(f"unknown database privilege {grant.privilege!r} in the backup's ACL")
    return sql.SQL(grant.privilege)


def _grantee(name: str | None) -> sql.Composable:
    return sql.SQL("PUBLIC") if name is None else sql.Identifier(name)


#: One step of an ACL change: the statement, the role to run it as (None: as the owner), a line for the notes.
_Step = tuple[sql.Composed, str | None, str]


def _acl_statements(conn: psycopg.Connection, dbname: str, wanted: list[DatabaseGrant]) -> list[_Step]:
    """(statement, role to run it as or None, note) turning the database's ACL into ``wanted``: revokes first,
    then grants by the owner, then grants by others (who hold the grant option by then)."""
    owner, current = _current_grants(conn, dbname)
    have = {_grant_key(g): g for g in current}
    want = {_grant_key(g): g for g in wanted}
    database = sql.Identifier(dbname)
    steps: list[_Step] = []
    for key, grant in have.items():
        target = want.get(key)
        if target is None:
            steps.append((sql.SQL("REVOKE {} ON DATABASE {} FROM {}").format(_privilege(grant), database,
                                                                             _grantee(grant.grantee)),
                          None, f"revoked {grant.privilege} from {grant.grantee or 'PUBLIC'}"))
        elif grant.grantable and not target.grantable:
            steps.append((sql.SQL("REVOKE GRANT OPTION FOR {} ON DATABASE {} FROM {}").format(
                _privilege(grant), database, _grantee(grant.grantee)), None,
                f"revoked the grant option for {grant.privilege} from {grant.grantee or 'PUBLIC'}"))
    grants = [g for key, g in want.items() if key not in have or (g.grantable and not have[key].grantable)]
    for grant in sorted(grants, key=lambda g: g.grantor != owner):
        statement = sql.SQL("GRANT {} ON DATABASE {} TO {}").format(_privilege(grant), database,
                                                                    _grantee(grant.grantee))
        if grant.grantable:
            statement += sql.SQL(" WITH GRANT OPTION")
        steps.append((statement, None if grant.grantor == owner else grant.grantor,
                      f"granted {grant.privilege} to {grant.grantee or 'PUBLIC'}"
                      + (" with grant option" if grant.grantable else "")
                      + ("" if grant.grantor == owner else f" (as {grant.grantor})")))
    return steps


def apply_database_properties(conn: psycopg.Connection, dbname: str, objects: ClusterObjects, *,
                              owner: bool = True, privileges: bool = True) -> list[str]:
    """Give database ``dbname`` (the staging copy) the source database's properties; one line per thing applied.

    Its owner (``owner``), its ``ALTER DATABASE SET`` and ``ALTER ROLE r IN DATABASE SET`` settings, its
    ACL (``privileges``), comment and connection limit, in one transaction. With ``owner`` and ``privileges``
    both on, a role the properties name that this server lacks raises ``RolesMissing`` naming them all,
    before anything is applied; with either off, a setting of an absent role is skipped, with a line saying so
    (the owner, with ``owner`` on, and the ACL's roles, with ``privileges`` on, must exist all the same).
    With ``owner`` off, the ACL's entries for the source's owner are given to this database's owner.
    ``is_template`` and ``allow_connections`` are recorded, never applied (the copy must stay connectable).
    """
    props = objects.database
    present = existing_roles(conn)
    lines: list[str] = []
    settings = [s for s in props.settings if s.role is None or s.role in present]
    skipped = [s for s in props.settings if s.role is not None and s.role not in present]
    target_owner = props.owner if owner else _current_grants(conn, dbname)[0]
    wanted = [DatabaseGrant(target_owner if g.grantee == props.owner else g.grantee, g.privilege, g.grantable,
                            target_owner if g.grantor == props.owner else g.grantor) for g in props.grants]
    absent = {props.owner} - present if owner else set()
    if privileges:
        absent |= {name for g in wanted for name in (g.grantee, g.grantor) if name is not None} - present
    if owner and privileges:  # nothing may be left out: a role-in-database setting's role is needed too
        absent |= {s.role for s in skipped if s.role is not None}
    if absent:
        raise RolesMissing(f"the backup's database properties name role(s) this server lacks: "
                           f"{', '.join(sorted(absent))}; create them first (restore --with-roles), or restore "
                           f"without owners and privileges (--no-owner)", sorted(absent))
    database = sql.Identifier(dbname)
    try:
        with conn.transaction():
            if owner:
                conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(database, sql.Identifier(props.owner)))
                lines.append(f"owner: {props.owner}")
            for setting in settings:
                conn.execute(_set_statement(setting, dbname))
                lines.append(f"setting: {setting.name} = {setting.value}"
                             + (f" for role {setting.role}" if setting.role else ""))
            for setting in skipped:
                lines.append(f"setting {setting.name} for role {setting.role} not applied: the role does not exist "
                             f"on this server")
            if privileges:
                for statement, as_role, note in _acl_statements(conn, dbname, wanted):
                    if as_role is not None:
                        conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(as_role)))
                    conn.execute(statement)
                    if as_role is not None:
                        conn.execute("RESET ROLE")
                    lines.append(f"privileges: {note}")
            if props.comment is not None:
                conn.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(database, sql.Literal(props.comment)))
                lines.append("comment set")
            if props.connection_limit != -1:
                conn.execute(sql.SQL("ALTER DATABASE {} CONNECTION LIMIT {}").format(
                    database, sql.Literal(int(props.connection_limit))))
                lines.append(f"connection limit: {props.connection_limit}")
    except psycopg.Error as exc:
        raise _failed(f"applying the properties of database {props.name} to {dbname}", exc) from None
    return lines
