"""Restoring without the backup's owners (``--no-owner``) when policies name roles the target lacks.

``pg_restore --no-owner --no-privileges`` still runs ``CREATE POLICY ... TO role``, which fails where
the role does not exist. Such a policy is restored for the roles that do exist on the target (its
``TO`` list cut to them) and left out when it names none of them (it applied to no role there);
row-level security stays enabled on its table. So for every role that exists on the target, the
policies allow exactly what they allowed in the backup; each change is listed (``policies_changed``).
A role created later under one of those names is not covered by them: ``--with-roles`` keeps
policies whole. Failing instead would make ``--no-owner`` useless where it is needed (a new host);
rewriting ``TO role`` to PUBLIC would widen a permissive policy to everyone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import psycopg

from backup_tasks.catalog.manifest import Manifest
from backup_tasks.conninfo import ConnInfo
from backup_tasks.errors import (
    RestoreFailed,
)
from backup_tasks.logical.pgrestore import archive_listing, list_file
from backup_tasks.postgres.connect import connect
from backup_tasks.postgres.failures import first_line
from backup_tasks.settings import Settings
from backup_tasks.storage.base import Storage
from backup_tasks.streams.crypto import Identities

#: ``pg_policy``'s OID (fixed in every PostgreSQL): the catalog class of a POLICY entry in ``pg_restore -l``.
POLICY_CLASS = 3256
_LIST_LINE = re.compile(r"^(\d+); (\d+) (\d+) (.*)$")
_SCRIPT_ENTRY = re.compile(r"^-- TOC entry (\d+) \(class \d+ OID \d+\)$", re.MULTILINE)
_DEPENDENCIES = re.compile(r"^-- Dependencies: ([\d ]+)$", re.MULTILINE)
#: A quoted identifier, a bare word, or one other character (enough for the head of a CREATE POLICY).
_TOKEN = re.compile(r'"(?:[^"]|"")*"|[A-Za-z_][A-Za-z0-9_$]*|\S')


@dataclass
class NoOwnerPlan:
    """How a restore without owners treats what names roles absent on the target (policies)."""

    use_list: str | None = None  # a ``-L`` listing leaving out the entries below; None: restore everything
    after: list[str] = field(default_factory=list)  # SQL run after pg_restore: policies cut to present roles
    changes: list[str] = field(default_factory=list)  # one line per policy changed or left out


@dataclass
class PolicyHead:
    """What a pg_dump ``CREATE POLICY`` says before its expressions (names as written, quoted where needed)."""

    name: str
    table: str
    roles: list[tuple[str, str]]  # after TO: (name, as written); empty: no TO (the policy applies to PUBLIC)
    start: int = 0  # where the TO clause is in the statement
    end: int = 0


def policy_head(statement: str) -> PolicyHead:
    """Read the head of a pg_dump ``CREATE POLICY``; ``ValueError`` for a statement of another shape.

    pg_dump writes ``CREATE POLICY name ON schema.table [AS RESTRICTIVE] [FOR command] [TO role, ...]
    [USING (...)] [WITH CHECK (...)]``, every name through ``quote_ident`` (keywords are quoted, so a
    bare ``TO`` is the keyword).
    """
    tokens = [(m.group(), m.start(), m.end()) for m in _TOKEN.finditer(statement)]
    words = [t[0] for t in tokens] + [""]
    if words[:2] != ["CREATE", "POLICY"] or words[3] != "ON":
        raise ValueError(f"not a CREATE POLICY statement: {statement[:80]!r}")
    i = 5
    while words[i] == ".":  # schema-qualified table
        i += 2
    head = PolicyHead(name=words[2], table="".join(words[4:i]), roles=[])
    if words[i] == "AS":
        i += 2
    if words[i] == "FOR":
        i += 2
    if words[i] != "TO":
        return head
    head.start = tokens[i][1]
    while True:
        i += 1
        written = words[i]
        head.roles.append((written[1:-1].replace('""', '"') if written.startswith('"') else written, written))
        head.end = tokens[i][2]
        if words[i + 1] != ",":
            return head
        i += 1


def _script_entries(script: str) -> dict[int, tuple[set[int], str]]:
    """``{TOC id: (ids it depends on, its SQL)}`` from ``pg_restore -v -f -`` output."""
    entries: dict[int, tuple[set[int], str]] = {}
    matches = list(_SCRIPT_ENTRY.finditer(script))
    for n, match in enumerate(matches):
        block = script[match.end(): matches[n + 1].start() if n + 1 < len(matches) else len(script)]
        block = block.split("\n--\n-- PostgreSQL database dump complete", 1)[0]
        deps = _DEPENDENCIES.search(block)
        header_end = block.find("\n--\n")  # the header's closing "--" line
        body = block[header_end + 4:] if header_end >= 0 else ""
        body = re.sub(r"\n--\s*$", "", body.rstrip()).strip()
        entries[int(match.group(1))] = ({int(d) for d in deps.group(1).split()} if deps else set(), body)
    return entries


def plan_without_owners(storage: Storage, manifest: Manifest, present: set[str], *, min_major: int,
                        settings: Settings, identities: Identities | None = None) -> NoOwnerPlan:
    """What a restore without owners must change so that policies naming roles absent here do not fail it.

    A policy naming absent roles is left out of ``pg_restore`` with what depends on it (its
    comment); when it names some role that is present, it is recreated afterwards ``TO`` those
    roles only, with its comment. Two reads of the archive's head (its listing, then the SQL of
    the policies and their comments).
    """
    listing = archive_listing(storage, manifest, ["-l"], min_major=min_major, settings=settings,
                              identities=identities)
    policies: list[int] = []
    candidates: list[str] = []  # policies, and what may depend on them (comments, security labels)
    for line in listing.splitlines():
        parsed = _LIST_LINE.match(line)
        if parsed is None:
            continue
        rest = parsed.group(4)
        if int(parsed.group(2)) == POLICY_CLASS:
            policies.append(int(parsed.group(1)))
            candidates.append(line)
        elif rest.startswith(("COMMENT ", "SECURITY LABEL ")) and " POLICY " in rest:
            candidates.append(line)
    if not policies:
        return NoOwnerPlan()
    entries = _script_entries(_policy_script(storage, manifest, candidates, min_major=min_major,
                                             settings=settings, identities=identities))
    plan = NoOwnerPlan()
    left_out: set[int] = set()
    for entry_id in policies:
        if entry_id not in entries:
            continue
        statement = entries[entry_id][1]
        try:
            head = policy_head(statement)
        except ValueError:  # not pg_dump's shape: left to pg_restore as it is (it fails loudly if it must)
            continue
        absent = [name for name, _written in head.roles if name not in present]
        if not absent:
            continue
        dependents = [other for other, (deps, _sql) in entries.items() if entry_id in deps]
        left_out.update([entry_id, *dependents])
        what = f"{head.name} on {head.table}"
        kept = [written for name, written in head.roles if name in present]
        absent_text = ", ".join(absent)
        if kept:
            plan.after.append(statement[:head.start] + "TO " + ", ".join(kept) + statement[head.end:])
            plan.after += [entries[other][1] for other in sorted(dependents)]
            plan.changes.append(f"policy {what}: restored TO {', '.join(kept)} only; the roles it also names are "
                                f"absent on the target: {absent_text}")
        else:
            plan.changes.append(f"policy {what}: left out; it names only roles absent on the target "
                                f"({absent_text}), so it applied to no role here")
    if left_out:
        plan.use_list = "\n".join(
            ";" + line if (m := _LIST_LINE.match(line)) is not None and int(m.group(1)) in left_out else line
            for line in listing.splitlines()) + "\n"
    return plan


def _policy_script(storage: Storage, manifest: Manifest, lines: list[str], *, min_major: int, settings: Settings,
                   identities: Identities | None) -> str:
    with list_file("\n".join(lines) + "\n") as list_args:
        return archive_listing(storage, manifest, ["-s", "-v", "-f", "-", *list_args], min_major=min_major,
                               settings=settings, identities=identities)


def run_after(target: ConnInfo, plan: NoOwnerPlan) -> None:
    """Run a plan's statements in the restored database, in one transaction, as pg_restore would (search_path '')."""
    if not plan.after:
        return
    try:
        with connect(target) as conn, conn.transaction():
            conn.execute("SELECT pg_catalog.set_config('search_path', '', false)")
            for statement in plan.after:
                conn.execute(statement)
    except psycopg.Error as exc:
        if (exc.sqlstate or "08")[:2] in ("08", "57"):
            raise
        raise RestoreFailed(f"recreating the policies cut to the roles present on {target.server_label} "
                            f"failed: {first_line(str(exc))}") from None
