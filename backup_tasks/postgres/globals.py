"""The cluster-level objects a database needs, outside it: reading them beside a dump, applying them before a restore.

A dump (``pg_dump``) holds one database; the roles that own its objects, are granted on them or are
named in its policies live in the cluster, and so do the database's own properties (owner, ``ALTER
DATABASE ... SET``, ACL, comment). Without them a restore to a new server cannot keep owners, grants
or policies, and the database loses its settings (``ALTER DATABASE aitrapp SET timezone`` silently gone).

``read_cluster_objects`` collects them in one document (``ClusterObjects``, JSON) from the shared
catalogs; it only reads, so it runs inside the dump's exported snapshot and sees what pg_dump sees.
Which roles: every role ``pg_shdepend`` records for an object of the database (owners ``o``, ACL
grantees and grantors ``a``, including default ACLs, policy roles ``r``, initial privileges ``i``),
the database's owner and the roles in its ACL, roles with settings in it, then every role those are
members of (so ``GRANT role TO member`` can be replayed). Built-in roles (``pg_*``) and the bootstrap
superuser (oid 10: it exists on every server, under whatever name) get no definition; the bootstrap
superuser's name is kept (``bootstrap_superuser``) and always counted as needed, as objects it owns name it
(and pg_shdepend records nothing for it).

Password verifiers (SCRAM or md5 strings, never plaintext) come from ``pg_authid``, which only a
superuser (or ``pg_read_all_data``) may read: otherwise they are left out and ``passwords`` says so.

``create_missing_roles`` and ``apply_database_properties`` replay the document on a server, every
name and value through ``psycopg.sql`` (no string-pasted names), in one transaction each.
``create_missing_roles`` never alters a role that exists: a membership is granted only to a role it
has just created.

Imports: core and psycopg only (like every ``postgres`` module).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import psycopg
from psycopg import sql

from backup_tasks.errors import RestoreFailed, RolesMissing
from backup_tasks.postgres.failures import first_line

log = logging.getLogger(__name__)

#: The document's format; a reader ignores keys it does not know (a newer writer's additions).
FORMAT = 1

#: Roles with an oid below this were made by initdb: the bootstrap superuser (10) and the ``pg_*`` roles.
FIRST_NORMAL_OID = 16384

#: Settings whose value is a list of quoted elements (pg_dump's ``variable_is_guc_list_quote``): each element
#: is replayed as its own literal, or ``search_path = '"$user", public'`` would become a one-element path.
LIST_SETTINGS = frozenset({"local_preload_libraries", "search_path", "session_preload_libraries",
                           "shared_preload_libraries", "temp_tablespaces", "unix_socket_directories"})

#: The privileges a database ACL can hold (``aclexplode``'s names): the only words pasted into SQL.
DATABASE_PRIVILEGES = frozenset({"CREATE", "TEMPORARY", "CONNECT"})


@dataclass(frozen=True)
class RoleDef:
    """One role as ``CREATE ROLE`` makes it."""

    name: str
    superuser: bool = False
    createdb: bool = False
    createrole: bool = False
    inherit: bool = True
    login: bool = False
    replication: bool = False
    bypassrls: bool = False
    connection_limit: int = -1
    valid_until: str | None = None  # ISO 8601 or "infinity"
    password: str | None = None  # the stored verifier ("SCRAM-SHA-256$..." or "md5..."), never plaintext
    comment: str | None = None


@dataclass(frozen=True)
class Membership:
    """``GRANT role TO member``; ``inherit_option``/``set_option`` exist on PostgreSQL 16 and later only."""

    role: str
    member: str
    admin_option: bool = False
    grantor: str | None = None
    inherit_option: bool | None = None
    set_option: bool | None = None


@dataclass(frozen=True)
class RoleSetting:
    """``ALTER ROLE role [IN DATABASE database] SET name = value``; ``role`` None: ``ALTER DATABASE database SET``."""

    role: str | None
    database: str | None
    name: str
    value: str


@dataclass(frozen=True)
class DatabaseGrant:
    """One privilege of the database's ACL (``aclexplode``); ``grantee`` None is PUBLIC."""

    grantee: str | None
    privilege: str
    grantable: bool
    grantor: str


@dataclass(frozen=True)
class DatabaseProps:
    """The database's own properties: what ``pg_dump --create`` would put in its DATABASE PROPERTIES entries."""

    name: str
    owner: str
    encoding: str
    collate: str
    ctype: str
    locale_provider: str | None = None  # "c" (libc) or "i" (ICU); 15 and later
    icu_locale: str | None = None
    #: Settings in this database: ``ALTER DATABASE SET`` (role None) and ``ALTER ROLE r IN DATABASE SET``.
    settings: list[RoleSetting] = field(default_factory=list)
    #: ``datacl`` as aclitem text (None: the default ACL); ``grants`` is the same, exploded (the default spelt out).
    acl: list[str] | None = None
    grants: list[DatabaseGrant] = field(default_factory=list)
    comment: str | None = None
    connection_limit: int = -1
    is_template: bool = False
    allow_connections: bool = True


@dataclass(frozen=True)
class ClusterObjects:
    """What a database needs from its cluster, as saved beside a dump (``to_json``) and replayed before a restore."""

    roles: list[RoleDef]
    memberships: list[Membership]
    #: Settings of the roles above in every database (``ALTER ROLE r SET``); those in this database are in
    #: ``database.settings``.
    role_settings: list[RoleSetting]
    database: DatabaseProps
    passwords: str  # "included", or "left out: <why>"
    #: The name of the source's bootstrap superuser (no definition: it exists everywhere).
    bootstrap_superuser: str = "postgres"
    #: Every role name the database itself names (before the membership closure), built-in ones excluded; always
    #: the bootstrap superuser's.
    needed: list[str] = field(default_factory=list)
    server_version: str | None = None

    def role_names(self) -> list[str]:
        """The roles the document defines (what ``create_missing_roles`` may create), in creation order."""
        return [role.name for role in self.roles]

    def required_names(self) -> list[str]:
        """Every role a restore keeping owners and privileges needs on the target: the defined ones, and the
        bootstrap superuser's name (whatever a superuser created names it as owner)."""
        names = self.role_names()
        if self.bootstrap_superuser in self.needed and self.bootstrap_superuser not in names:
            names.append(self.bootstrap_superuser)
        return names

    def to_json(self) -> bytes:
        return (json.dumps({"format": FORMAT, **asdict(self)}, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ClusterObjects:
        try:
            data = json.loads(raw)
            database = dict(data["database"])
            database["settings"] = [_build(RoleSetting, s) for s in database.get("settings") or []]
            database["grants"] = [_build(DatabaseGrant, g) for g in database.get("grants") or []]
            return _build(cls, {
                **data,
                "roles": [_build(RoleDef, r) for r in data.get("roles") or []],
                "memberships": [_build(Membership, m) for m in data.get("memberships") or []],
                "role_settings": [_build(RoleSetting, s) for s in data.get("role_settings") or []],
                "database": _build(DatabaseProps, database),
            })
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ValueError(f"not a cluster-objects document: {exc}") from None


def _build(cls: Any, data: dict[str, Any]) -> Any:
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in known})


# --- reading ---------------------------------------------------------------------------------------------

#: Oids of the roles the database names: pg_shdepend's entries for its objects and for the database itself,
#: its owner, its ACL (grantees and grantors; the default ACL names only the owner) and its settings' roles.
_NAMED_ROLES = """
WITH db AS (SELECT oid, datdba, datacl FROM pg_catalog.pg_database WHERE datname = %(db)s)
SELECT s.refobjid FROM pg_catalog.pg_shdepend s, db
 WHERE s.refclassid = 'pg_catalog.pg_authid'::regclass AND s.deptype <> 'p'
   AND (s.dbid = db.oid OR (s.dbid = 0 AND s.classid = 'pg_catalog.pg_database'::regclass AND s.objid = db.oid))
UNION SELECT datdba FROM db
UNION SELECT a.grantee FROM db, pg_catalog.aclexplode(db.datacl) a WHERE a.grantee <> 0
UNION SELECT a.grantor FROM db, pg_catalog.aclexplode(db.datacl) a
UNION SELECT setrole FROM pg_catalog.pg_db_role_setting, db WHERE setdatabase = db.oid AND setrole <> 0
"""

#: Those roles and every role they are members of, directly or not.
_CLOSURE = f"""
WITH RECURSIVE named(oid) AS ({_NAMED_ROLES}),
closure(oid) AS (SELECT oid FROM named
                 UNION SELECT m.roleid FROM pg_catalog.pg_auth_members m JOIN closure c ON m.member = c.oid)
SELECT c.oid, r.rolname, c.oid IN (SELECT oid FROM named)
  FROM closure c JOIN pg_catalog.pg_roles r ON r.oid = c.oid
"""


def _settings(config: list[str] | None) -> list[tuple[str, str]]:
    """``setconfig``'s ``name=value`` strings as pairs (a value may hold ``=`` itself)."""
    pairs = []
    for item in config or []:
        name, _, value = item.partition("=")
        pairs.append((name, value))
    return pairs


def passwords_readable(conn: psycopg.Connection) -> bool:
    """Whether this role may read ``pg_authid`` (superuser, ``pg_read_all_data``): asked, never tried, so a
    refusal cannot abort the caller's transaction (the dump's exported snapshot)."""
    row = conn.execute("SELECT pg_catalog.has_table_privilege('pg_catalog.pg_authid', 'SELECT')").fetchone()
    return bool(row and row[0])


def read_cluster_objects(conn: psycopg.Connection, dbname: str) -> ClusterObjects:
    """The roles, memberships, settings and database properties ``dbname`` needs (see the module docstring).

    Read-only, a handful of catalog queries (milliseconds): safe inside the dump's snapshot transaction.
    """
    row = conn.execute(
        """SELECT pg_catalog.to_jsonb(d), pg_catalog.pg_get_userbyid(d.datdba),
                  pg_catalog.pg_encoding_to_char(d.encoding), pg_catalog.shobj_description(d.oid, 'pg_database'),
                  (SELECT rolname FROM pg_catalog.pg_roles WHERE oid = 10)
             FROM pg_catalog.pg_database d WHERE d.datname = %s""", (dbname,)).fetchone()
    if row is None:
        raise ValueError(f"database {dbname!r} does not exist")
    # to_jsonb: the columns this server has (datlocprovider from 15, daticulocale until 16, datlocale from 17).
    facts, owner, encoding, comment, bootstrap = row[0], row[1], row[2], row[3], row[4]
    closure = conn.execute(_CLOSURE, {"db": dbname}).fetchall()
    oids = sorted(int(oid) for oid, _name, _named in closure if int(oid) >= FIRST_NORMAL_OID)
    # The bootstrap superuser is always needed: it owns whatever a superuser created, and pg_shdepend records
    # nothing for it (a pinned role), so only its name in the dump's archive would tell.
    needed = sorted({str(bootstrap), *(str(name) for oid, name, named in closure
                                       if named and int(oid) >= FIRST_NORMAL_OID)})
    with_passwords = passwords_readable(conn)
    roles = _roles(conn, oids, with_passwords)
    names = {role.name for role in roles}
    memberships = [m for m in _memberships(conn, oids) if m.member in names]
    role_settings = [RoleSetting(str(role), None, name, value) for role, config in conn.execute(
        """SELECT pg_catalog.pg_get_userbyid(setrole), setconfig FROM pg_catalog.pg_db_role_setting
            WHERE setdatabase = 0 AND setrole = ANY(%s) ORDER BY 1""", (oids,)).fetchall()
        for name, value in _settings(config)]
    db_settings = [RoleSetting(None if role is None else str(role), dbname, name, value) for role, config in
                   conn.execute(
        """SELECT CASE WHEN s.setrole = 0 THEN NULL ELSE pg_catalog.pg_get_userbyid(s.setrole) END, s.setconfig
             FROM pg_catalog.pg_db_role_setting s JOIN pg_catalog.pg_database d ON d.oid = s.setdatabase
            WHERE d.datname = %s ORDER BY s.setrole <> 0, 1""", (dbname,)).fetchall()
        for name, value in _settings(config)]
    grants = [DatabaseGrant(None if grantee is None else str(grantee), str(privilege), bool(grantable), str(grantor))
              for grantee, privilege, grantable, grantor in conn.execute(
        """SELECT CASE WHEN a.grantee = 0 THEN NULL ELSE pg_catalog.pg_get_userbyid(a.grantee) END,
                  a.privilege_type, a.is_grantable, pg_catalog.pg_get_userbyid(a.grantor)
             FROM pg_catalog.pg_database d,
                  pg_catalog.aclexplode(coalesce(d.datacl, pg_catalog.acldefault('d', d.datdba))) a
            WHERE d.datname = %s ORDER BY a.grantor <> d.datdba, 1 NULLS FIRST, 2""", (dbname,)).fetchall()]
    database = DatabaseProps(
        name=dbname, owner=str(owner), encoding=str(encoding), collate=str(facts.get("datcollate") or ""),
        ctype=str(facts.get("datctype") or ""), locale_provider=facts.get("datlocprovider"),
        icu_locale=facts.get("daticulocale") or facts.get("datlocale"), settings=db_settings,
        acl=facts.get("datacl"), grants=grants, comment=comment,
        connection_limit=int(facts.get("datconnlimit", -1)), is_template=bool(facts.get("datistemplate")),
        allow_connections=bool(facts.get("datallowconn", True)))
    passwords = "included" if with_passwords else (
        "left out: the backup role may not read pg_authid (connect as a superuser, or grant it pg_read_all_data, "
        "to save password verifiers)")
    version = conn.execute("SHOW server_version").fetchone()
    return ClusterObjects(roles=roles, memberships=memberships, role_settings=role_settings, database=database,
                          passwords=passwords, bootstrap_superuser=str(bootstrap), needed=needed,
                          server_version=str(version[0]).split()[0] if version else None)


def _roles(conn: psycopg.Connection, oids: list[int], with_passwords: bool) -> list[RoleDef]:
    password = "(SELECT a.rolpassword FROM pg_catalog.pg_authid a WHERE a.oid = r.oid)" if with_passwords else "NULL"
    rows = conn.execute(
        f"""SELECT r.rolname, r.rolsuper, r.rolcreatedb, r.rolcreaterole, r.rolinherit, r.rolcanlogin,
                   r.rolreplication, r.rolbypassrls, r.rolconnlimit, pg_catalog.to_json(r.rolvaliduntil) #>> '{{}}',
                   {password}, pg_catalog.shobj_description(r.oid, 'pg_authid')
              FROM pg_catalog.pg_roles r WHERE r.oid = ANY(%s) ORDER BY r.rolname""", (oids,)).fetchall()
    return [RoleDef(name=str(r[0]), superuser=bool(r[1]), createdb=bool(r[2]), createrole=bool(r[3]),
                    inherit=bool(r[4]), login=bool(r[5]), replication=bool(r[6]), bypassrls=bool(r[7]),
                    connection_limit=int(r[8]), valid_until=r[9], password=r[10], comment=r[11]) for r in rows]


def _memberships(conn: psycopg.Connection, oids: list[int]) -> list[Membership]:
    # to_jsonb: inherit_option and set_option exist from 16 on; PostgreSQL 16 also keeps one row per grantor.
    rows = conn.execute(
        """SELECT pg_catalog.pg_get_userbyid(m.roleid), pg_catalog.pg_get_userbyid(m.member),
                  pg_catalog.pg_get_userbyid(m.grantor), pg_catalog.to_jsonb(m)
             FROM pg_catalog.pg_auth_members m WHERE m.member = ANY(%s)
            ORDER BY NOT (pg_catalog.to_jsonb(m) ->> 'admin_option')::bool, 2, 1""", (oids,)).fetchall()
    return [Membership(role=str(role), member=str(member), admin_option=bool(facts.get("admin_option")),
                       grantor=None if grantor is None else str(grantor),
                       inherit_option=facts.get("inherit_option"), set_option=facts.get("set_option"))
            for role, member, grantor, facts in rows]


# --- applying --------------------------------------------------------------------------------------------

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
