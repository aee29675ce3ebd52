"""Backup ids and the keys of every object a backup stores: the one place that knows the file layout.

An id is ``<database>-<kind>-<UTC stamp>`` (``aitrapp-dump-20261127T100500Z``); a dump is
``<id>.dump.zst[.age]`` with what its database needs from the cluster beside it (roles, database properties:
``<id>.globals.json.zst[.age]``, ``logical.globals``), a snapshot ``<id>.base.tar.zst``, ``<id>.pg_wal.tar.zst``,
``<id>.backup_manifest`` and ``<id>.config.json`` (each ``.age`` when encrypted); the manifest is
``<id>.manifest.json`` (``manifest.manifest_key``). ``backup_id_of`` reads the id back from a data object's key.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta

from backup_tasks.streams.codec import SUFFIX

#: The UTC stamp that ends every id ``backup_id_for`` makes.
_STAMP = re.compile(r"\d{8}T\d{6}Z")


def id_prefix(database: str, kind: str) -> str:
    """What every backup id of this database and kind starts with (file-name safe)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", database).strip("._") or "db"
    return f"{safe}-{kind}-"


def backup_id_for(database: str, kind: str, moment_utc: str) -> str:
    stamp = moment_utc.replace("-", "").replace(":", "")  # 2026-11-27T10:05:00Z -> 20261127T100500Z
    return id_prefix(database, kind) + stamp


def later_backup_id(backup_id: str) -> str | None:
    """The id one second after ``backup_id`` (same prefix), or None for an id that does not end in a stamp.

    Ids have one-second resolution, so two backups of one database can want the same one (two trading
    days signalled at once, a manual dump right after a scheduled one): the later takes the next free second.
    """
    stamp = backup_id[-len("YYYYMMDDTHHMMSSZ"):]
    if not _STAMP.fullmatch(stamp):
        return None
    moment = datetime.strptime(stamp, "%Y%m%dT%H%M%SZ") + timedelta(seconds=1)
    return backup_id[: -len(stamp)] + moment.strftime("%Y%m%dT%H%M%SZ")


def dump_key(backup_id: str, compression: str, *, encrypted: bool = False) -> str:
    return f"{backup_id}.dump{SUFFIX[compression]}" + (".age" if encrypted else "")


def cluster_objects_key(backup_id: str, compression: str, *, encrypted: bool = False) -> str:
    """The roles and database properties saved with dump ``backup_id``: compressed and encrypted like the dump."""
    return f"{backup_id}.globals.json{SUFFIX[compression]}" + (".age" if encrypted else "")


def snapshot_keys(backup_id: str, *, encrypted: bool = False) -> dict[str, str]:
    suffix = ".age" if encrypted else ""
    return {"base": f"{backup_id}.base.tar.zst{suffix}", "wal": f"{backup_id}.pg_wal.tar.zst{suffix}",
            "backup_manifest": f"{backup_id}.backup_manifest{suffix}", "config": f"{backup_id}.config.json{suffix}"}


def stored_suffixes(kind: str) -> tuple[str, ...]:
    """What follows the id in the key of every data object a backup of ``kind`` may store (any compression,
    encrypted or not): the manifest and records aside, everything ``dump_key``, ``cluster_objects_key`` and
    ``snapshot_keys`` name."""
    if kind == "dump":
        return tuple(make("", compression, encrypted=encrypted) for make in (dump_key, cluster_objects_key)
                     for compression in SUFFIX for encrypted in (False, True))
    if kind == "snapshot":
        return tuple(key for encrypted in (False, True) for key in snapshot_keys("", encrypted=encrypted).values())
    raise ValueError(f"no stored objects are known for backups of kind {kind!r}")


def backup_id_of(key: str, kind: str, *, database: str | None = None) -> str | None:
    """The id of the backup of ``kind`` (of ``database``, when given) whose data object ``key`` is, else None.

    Only ids ``backup_id_for`` makes count (prefix, then the stamp and nothing else): with ``database``,
    a database whose name merely starts like this one's id prefix (``db-dump-x`` for ``db``) is not matched.
    """
    for suffix in stored_suffixes(kind):
        if not key.endswith(suffix) or "/" in key:
            continue
        backup_id = key[: -len(suffix)]
        if database is not None:
            prefix = id_prefix(database, kind)
            return backup_id if backup_id.startswith(prefix) and _STAMP.fullmatch(backup_id[len(prefix):]) else None
        return backup_id if re.search(rf".-{kind}-{_STAMP.pattern}$", backup_id) else None
    return None
