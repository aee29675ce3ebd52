"""One PostgreSQL system per catalog: recorded by the first backup, checked before every backup, honoured by prune.

Every location of the catalog (BACKUP_DIR and, through the mirrored storage, BACKUP_COPY_TO) records
the system identifier of the cluster it holds backups of (``wal.system.IDENTITY_KEY``, create-only,
written when the first dump or snapshot of this version is published: ``manifest.publish``). Each
location is asked on its own: a copy prefix another deployment shares says so even where BACKUP_DIR
does not. A backup of another system is refused (``SystemMismatch``, exit 2) before it starts
(``claim_catalog(..., record=False)``) and again at its publication, before its manifest is written.

Manifests carry ``system_identifier`` (snapshots always did; dumps since this version). A manifest
without one is a legacy backup and counts as this catalog's. Readers of the catalog see only this
catalog's backups (``manifest.catalog``: list, health, verify, restore planning), and prune plans and
deletes only those: another system's, found through a shared copy prefix, are left alone and
reported. Which system the catalog is: what BACKUP_DIR records, else the copy; a catalog no backup
of this version was written into records none, and everything in it counts as its own.
"""

from __future__ import annotations

from backup_tasks.storage.base import Storage, members
from backup_tasks.wal.system import claim, recorded_system, where


def claim_catalog(storage: Storage, system: str, *, backup: str, record: bool = True) -> None:
    """Every location of the catalog ``storage`` records ``system`` (create-only: the first backup's publication records
    it), else ``SystemMismatch`` and nothing is written. ``backup``: what is written, for messages.

    ``record=False``: the check a backup makes before it starts (so a refusal costs no dump), recording
    nothing (so a failed first backup leaves nothing behind); ``manifest.publish`` records.
    """
    for member in members(storage):
        claim(member, system, incoming=backup, what=f"the backup catalog {member.location}", record=record,
              remedy=f"Back this server up into a location of its own (another BACKUP_DIR, and another "
                     f"BACKUP_COPY_TO prefix: deployments must not share one); remove {where(member)} only if the "
                     f"system it records is gone for good (its backups stay there, and prune leaves them alone).")


def catalog_system(storage: Storage) -> str | None:
    """The system the catalog belongs to: what its first location (BACKUP_DIR) records, else the copy; None when no
    location records one (a catalog no backup of this version was written into)."""
    for member in members(storage):
        system = recorded_system(member)
        if system is not None:
            return system
    return None


def is_foreign(system_identifier: str | None, system: str | None) -> bool:
    """Whether something carrying ``system_identifier`` belongs to another system than the catalog's ``system``
    (legacy objects without one, and a catalog that records none, count as the catalog's own)."""
    return system is not None and system_identifier is not None and system_identifier != system
