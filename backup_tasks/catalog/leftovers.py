"""What killed backup runs leave in the catalog, cleared by the next run of the same kind (under its lock).

A run killed outright cleans up nothing: it may leave the partial object it was writing and, killed
between committing its data and writing its manifest, data objects no manifest names (which list,
restore and prune never see, so they would stay forever). The keys of both come from ``ids``.
"""

from __future__ import annotations

import logging

from backup_tasks.catalog.ids import backup_id_of, id_prefix
from backup_tasks.catalog.manifest import manifest_key
from backup_tasks.errors import ObjectLocked, StorageError
from backup_tasks.storage.base import Storage, members

log = logging.getLogger(__name__)


def clear_interrupted(storage: Storage, database: str, kind: str) -> None:
    """Remove what killed ``kind`` runs (``dump``, ``snapshot``) of ``database`` left: partial objects, and
    data objects stored without their manifest (a run killed between its data commit and its manifest).

    Call it under the lock of that kind and database, so no live run stores such a backup now (and a
    partial whose writer still lives is never touched anyway: ``Storage.clear_partials``). Only objects
    in BACKUP_DIR are judged: a copy shared with another deployment may hold one of its backups in
    progress. A location that refuses (a worker without delete rights, an Object Lock) keeps them:
    logged, the run goes on.
    """
    prefix = id_prefix(database, kind)
    try:
        partials = storage.clear_partials(prefix=prefix)
        stored = {obj.key for obj in storage.list(prefix, recursive=False)}
        stored_here = members(storage)[0].list(prefix, recursive=False)
    except StorageError as exc:
        log.warning("could not look for what interrupted %ss left in %s: %s", kind, storage.location, exc)
        return
    if partials:
        log.info("removed %d partial file(s) left by an interrupted run (%s)", len(partials), kind)  # wording as before
    orphans = [obj.key for obj in stored_here if (backup_id := backup_id_of(obj.key, kind, database=database))
               and manifest_key(backup_id) not in stored]
    if not orphans:
        return
    failures = storage.delete_many(orphans)
    if len(failures) < len(orphans):
        log.info("removed %d object(s) an interrupted %s stored without a manifest", len(orphans) - len(failures), kind)
    for key, exc in failures.items():
        (log.info if isinstance(exc, ObjectLocked) else log.warning)(
            "could not remove %s, stored by an interrupted %s without a manifest: %s", key, kind, exc)
