"""The cluster-level objects a database needs, outside it: the document, and reading it beside a dump.

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

Replaying the document on a server (creating missing roles, applying the database's properties) is
``postgres.recreate``.

Imports: core and psycopg only (like every ``postgres`` module).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import psycopg

log = logging.getLogger(__name__)

#: The document's format; a reader ignores keys it does not know (a newer writer's additions).
FORMAT = 1

#: Roles with an oid below this were made by initdb: the bootstrap superuser (10) and the ``pg_*`` roles.
FIRST_NORMAL_OID = 16384


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
