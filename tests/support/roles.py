"""Roles of unique names on the shared server and a trading database that names them everywhere (issue 19's case).

A pytest plugin (``tests/conftest.py``): ``roles`` (three roles, dropped with what they own afterwards) and
``roles_db`` (the trading schema with a role-named policy, grants, a table owned by another role, an
unlogged table and the database's own properties: timezone, ACL, comment, owner).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from backup_tasks.conninfo import ConnInfo
from backup_tasks.postgres.connect import connect
from backup_tasks.postgres.sampledata import generate

#: The cluster-level part: a reader (with a login, a setting, a membership), a table owner, a group.
ROLES_SQL = """
CREATE ROLE {reader} LOGIN;
CREATE ROLE {owner} NOLOGIN;
CREATE ROLE {group} NOLOGIN;
GRANT {group} TO {reader};
ALTER ROLE {reader} SET statement_timeout = '5s';
"""

#: On top of the trading schema: a role-named policy (the issue's minimal case), a policy naming a missing
#: and a present role, a table owned by another role, grants, an unlogged table, the database's own properties.
DATABASE_SQL = """
ALTER TABLE signals ENABLE ROW LEVEL SECURITY;
CREATE POLICY signals_reader ON signals TO {reader} USING (true);
CREATE POLICY signals_mixed ON signals AS RESTRICTIVE FOR SELECT TO {reader}, postgres USING (id > 0);
COMMENT ON POLICY signals_mixed ON signals IS 'for the reader and the superuser';
GRANT SELECT ON signals, orders TO {reader};
GRANT SELECT ON orders TO {group};
CREATE TABLE owned_elsewhere (note text);
INSERT INTO owned_elsewhere VALUES ('owned by another role');
ALTER TABLE owned_elsewhere OWNER TO {owner};
CREATE UNLOGGED TABLE quote_cache (symbol text PRIMARY KEY, px numeric);
INSERT INTO quote_cache VALUES ('NIFTY', 24000.5), ('TCS', 4100);
ALTER DATABASE {db} SET timezone = 'Asia/Kolkata';
ALTER ROLE {reader} IN DATABASE {db} SET work_mem = '8MB';
GRANT CONNECT, TEMPORARY ON DATABASE {db} TO {reader};
REVOKE TEMPORARY ON DATABASE {db} FROM PUBLIC;
COMMENT ON DATABASE {db} IS 'trading, restored whole';
ALTER DATABASE {db} OWNER TO {owner};
"""


@dataclass
class Roles:
    reader: str
    owner: str
    group: str

    @property
    def names(self) -> list[str]:
        return sorted([self.reader, self.owner, self.group])


def drop_roles(admin: ConnInfo, names: list[str]) -> None:
    """Drop roles from a server, after taking back what they own or were granted in every database."""
    with connect(admin) as conn:
        oids = [r[0] for r in conn.execute("SELECT oid FROM pg_roles WHERE rolname = ANY(%s)", (names,))]
        if not oids:
            return
        databases = [r[0] for r in conn.execute(
            "SELECT DISTINCT d.datname FROM pg_shdepend s JOIN pg_database d ON d.oid = s.dbid "
            "WHERE s.refobjid = ANY(%s) AND d.datconnlimit <> -2", (oids,))]
        quoted = ", ".join(f'"{name}"' for name in names if name)
        for dbname in {*databases, admin.dbname}:
            with connect(admin.with_dbname(dbname)) as db:
                db.execute(f"REASSIGN OWNED BY {quoted} TO CURRENT_USER")
                db.execute(f"DROP OWNED BY {quoted}")
        for name in names:
            conn.execute(f'DROP ROLE IF EXISTS "{name}"')


@contextmanager
def unique_roles(admin: ConnInfo) -> Iterator[Roles]:
    """Three roles of unique names on the shared server, dropped (with what they own) afterwards."""
    suffix = uuid.uuid4().hex[:8]
    made = Roles(reader=f"bt_reader_{suffix}", owner=f"bt_owner_{suffix}", group=f"bt_group_{suffix}")
    try:
        with connect(admin) as conn:
            conn.execute(ROLES_SQL.format(**vars(made)))
        yield made
    finally:
        drop_roles(admin, made.names)


def fill_roles_db(conninfo: ConnInfo, roles: Roles) -> ConnInfo:
    """The trading schema, with ``roles`` owning, granted on and named in its objects and properties."""
    generate(conninfo, signals=60)
    with connect(conninfo) as conn:
        conn.execute(DATABASE_SQL.format(db=conninfo.dbname, **vars(roles)))
    return conninfo


@pytest.fixture
def roles(pg_admin: ConnInfo) -> Iterator[Roles]:
    with unique_roles(pg_admin) as made:
        yield made


@pytest.fixture
def roles_db(roles: Roles, make_database: Callable[..., ConnInfo]) -> ConnInfo:
    return fill_roles_db(make_database(), roles)
