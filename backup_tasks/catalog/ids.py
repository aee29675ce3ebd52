"""Backup ids and the keys of every object a backup stores: the one place that knows the file layout.

An id is ``<database>-<kind>-<UTC stamp>`` (``aitrapp-dump-20261127T100500Z``); a dump is
``<id>.dump.zst[.age]``, a snapshot ``<id>.base.tar.zst``, ``<id>.pg_wal.tar.zst``,
``<id>.backup_manifest`` and ``<id>.config.json`` (each ``.age`` when encrypted); the manifest is
``<id>.manifest.json`` (``manifest.manifest_key``).
"""

from __future__ import annotations

import re

from backup_tasks.streams.codec import SUFFIX


def id_prefix(database: str, kind: str) -> str:
    """What every backup id of this database and kind starts with (file-name safe)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", database).strip("._") or "db"
    return f"{safe}-{kind}-"


def backup_id_for(database: str, kind: str, moment_utc: str) -> str:
    stamp = moment_utc.replace("-", "").replace(":", "")  # 2026-11-27T10:05:00Z -> 20261127T100500Z
    return id_prefix(database, kind) + stamp


def dump_key(backup_id: str, compression: str, *, encrypted: bool = False) -> str:
    return f"{backup_id}.dump{SUFFIX[compression]}" + (".age" if encrypted else "")


def snapshot_keys(backup_id: str, *, encrypted: bool = False) -> dict[str, str]:
    suffix = ".age" if encrypted else ""
    return {"base": f"{backup_id}.base.tar.zst{suffix}", "wal": f"{backup_id}.pg_wal.tar.zst{suffix}",
            "backup_manifest": f"{backup_id}.backup_manifest{suffix}", "config": f"{backup_id}.config.json{suffix}"}
