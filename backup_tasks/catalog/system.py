"""One PostgreSQL system per catalog, generation by generation: recorded by the first backup, checked before every
backup, honoured by prune.

Every location of the catalog (BACKUP_DIR and, through the mirrored storage, BACKUP_COPY_TO) records
the system identifier of the cluster it holds backups of (``wal.system.IDENTITY_KEY``, create-only,
written when the first dump or snapshot of this version is published: ``manifest.publish``). Each
location is asked on its own: a copy prefix another deployment shares says so even where BACKUP_DIR
does not. A backup of another system is refused (``SystemMismatch``, exit 2) before it starts
(``claim_catalog(..., record=False)``) and again at its publication, before its manifest is written.

A major upgrade makes a new system: it is the catalog's too once it opens a *generation*
(``wal.system``: ``generations/<system>.json`` beside the identity object; ``catalog.generations``).
``claim_catalog`` opens one for a backup of a system with a higher major than the newest generation's
while ``backup-tasks upgrade --begin`` is open, or when the new server has every database the catalog
holds (a ``pg_upgrade``'d cluster); the same major stays a mismatch (another deployment).

Manifests carry ``system_identifier`` (snapshots always did; dumps since this version). A manifest
without one is a legacy backup and counts as this catalog's. Readers of the catalog see only this
catalog's backups, of every generation (``manifest.catalog``: list, health, verify, restore planning),
and prune plans and deletes only those: another system's, found through a shared copy prefix, are left
alone and reported. Which systems the catalog is: what BACKUP_DIR records, else the copy; a catalog no
backup of this version was written into records none, and everything in it counts as its own.
"""

from __future__ import annotations

import json
from collections.abc import Collection

from backup_tasks.errors import StorageError
from backup_tasks.storage.base import Storage, members
from backup_tasks.wal.system import claim, read_records, recorded_system, where

#: ``manifest.MANIFEST_SUFFIX`` (``manifest`` imports this module).
MANIFEST_SUFFIX = ".manifest.json"


class CatalogSystems(str):
    """The systems of a catalog's generations. As text, the first generation's identifier (what messages and older
    callers name); ``systems``: every generation's, which ``is_foreign`` reads."""

    systems: frozenset[str]

    def __new__(cls, first: str, systems: Collection[str] = ()) -> CatalogSystems:
        value = super().__new__(cls, first)
        value.systems = frozenset({first, *systems})
        return value


def claim_catalog(storage: Storage, system: str, *, backup: str, record: bool = True, major: int | None = None,
                  databases: Collection[str] | None = None) -> None:
    """Every location of the catalog ``storage`` records ``system`` (create-only: the first backup's publication records
    it) or holds it as a generation, else ``SystemMismatch`` and nothing is written. ``backup``: what is written.

    ``record=False``: the check a backup makes before it starts (so a refusal costs no dump), recording
    no first system (so a failed first backup leaves nothing behind); ``manifest.publish`` records.
    ``major`` (the server's) and ``databases`` (every database of the server): a new system opens a
    generation as ``wal.system.admission`` allows; ``databases`` covering every database the catalog
    backs up counts as a ``pg_upgrade`` of this server. Given by the checks that hold a connection.
    """
    upgraded = False
    if databases is not None and major is not None:
        held = backed_up_databases(storage)
        upgraded = bool(held) and held <= set(databases)
    for member in members(storage):
        claim(member, system, incoming=backup, what=f"the backup catalog {member.location}", record=record,
              major=major, upgraded=upgraded,
              remedy=f"Back this server up into a location of its own (another BACKUP_DIR, and another "
                     f"BACKUP_COPY_TO prefix: deployments must not share one); remove {where(member)} only if the "
                     f"system it records is gone for good (its backups stay there, and prune leaves them alone). "
                     f"Upgrading this server? `backup-tasks upgrade --begin` against it first.")


def backed_up_databases(storage: Storage) -> set[str]:
    """The databases the catalog holds backups of (a pg_upgrade'd server has them all): read from the manifests' own
    JSON (``manifest`` imports this module), one top-level listing and the manifests, only when a new system asks."""
    held = set()
    for obj in storage.list(recursive=False):
        if obj.key.endswith(MANIFEST_SUFFIX):
            try:
                database = json.loads(storage.read_bytes(obj.key)).get("database")
            except (ValueError, AttributeError, StorageError):
                continue
            if isinstance(database, str):
                held.add(database)
    return held


def catalog_system(storage: Storage) -> CatalogSystems | None:
    """The systems the catalog belongs to: what its first location (BACKUP_DIR) records, else the copy; None when no
    location records one (a catalog no backup of this version was written into)."""
    for member in members(storage):
        system = recorded_system(member)
        if system is not None:
            generations, _upgrades, _released = read_records(member)
            return CatalogSystems(system, [g.system for g in generations])
    return None


def is_foreign(system_identifier: str | None, system: str | None) -> bool:
    """Whether something carrying ``system_identifier`` belongs to another system than the catalog's ``system`` (every
    generation's, when it is ``catalog_system``'s answer); legacy objects without one, and a catalog that records
    none, count as the catalog's own."""
    if system is None or system_identifier is None:
        return False
    systems = system.systems if isinstance(system, CatalogSystems) else {system}
    return system_identifier not in systems
