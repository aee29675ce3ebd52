"""Generations across a major upgrade: which system may open one, what wal-push records, and the pure rules on them."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from backup_tasks.catalog.generations import boundaries, generation_of, merge, read_generations, without_snapshot
from backup_tasks.catalog.manifest import Manifest
from backup_tasks.catalog.retention import RetentionPolicy, plan
from backup_tasks.catalog.system import CatalogSystems, is_foreign
from backup_tasks.errors import SystemMismatch
from backup_tasks.storage.memory import MemoryStorage
from backup_tasks.wal.system import (
    IDENTITY_KEY,
    Upgrade,
    check_push,
    generation_key,
    put_record,
    read_records,
    segment_identity,
)

OLD, NEW, OTHER = "7000000000000000015", "7400000000000000018", "7100000000000000015"
SIZE = 16 << 20


def segment(directory: Path, name: str, system: str, magic: int) -> Path:
    """A file with a real ``XLogLongPageHeaderData`` for ``name`` (segment size 16 MiB) and ``system``."""
    number = int(name[8:16], 16) * 256 + int(name[16:24], 16)
    header = struct.pack("=HHIQI4xQII", magic, 0x0002, int(name[:8], 16), number * SIZE, 0, int(system), SIZE, 8192)
    path = directory / name
    path.write_bytes(header + b"\0" * 8152)
    return path


def test_the_page_magic_names_the_major(tmp_path: Path) -> None:
    assert segment_identity(segment(tmp_path, "000000010000000000000003", OLD, 0xD110)) == (OLD, 15)
    assert segment_identity(segment(tmp_path, "000000010000000000000004", NEW, 0xD118)) == (NEW, 18)
    assert segment_identity(segment(tmp_path, "000000010000000000000005", NEW, 0xD1FF)) == (NEW, None)


def test_wal_of_a_higher_major_opens_a_generation_and_the_same_major_is_refused(tmp_path: Path) -> None:
    archive = MemoryStorage()
    check_push(archive, segment(tmp_path, "000000010000000000000003", OLD, 0xD110))
    assert json.loads(archive.read_bytes(IDENTITY_KEY))["major"] == 15
    check_push(archive, segment(tmp_path, "000000010000000000000009", NEW, 0xD118))
    record = json.loads(archive.read_bytes(generation_key(NEW)))
    assert (record["major"], record["reason"], record["previous"], record["first_segment"]) == \
        (18, "automatic", OLD, "000000010000000000000009")
    check_push(archive, segment(tmp_path, "00000001000000000000000A", NEW, 0xD118))  # its own generation: one read
    with pytest.raises(SystemMismatch, match="not newer than the recorded PostgreSQL 18"):
        check_push(archive, segment(tmp_path, "00000001000000000000000B", OTHER, 0xD118))
    generations, _upgrades, _released = read_records(archive)
    assert [(g.system, g.major) for g in generations] == [(OLD, 15), (NEW, 18)]
    assert IDENTITY_KEY in {o.key for o in archive.list()} and json.loads(archive.read_bytes(IDENTITY_KEY))[
        "system_identifier"] == OLD, "the first identity object is never rewritten"


def test_a_backup_of_a_new_major_needs_an_open_upgrade_or_every_database(tmp_path: Path) -> None:
    from backup_tasks.catalog.system import claim_catalog

    catalog = MemoryStorage()
    claim_catalog(catalog, OLD, backup="first", major=15)
    catalog.put_new("db-dump-1.manifest.json", json.dumps({"database": "trading"}).encode())
    with pytest.raises(SystemMismatch, match="nothing shows it is an upgrade"):
        claim_catalog(catalog, NEW, backup="a dump", major=18, databases=["postgres"], record=False)
    claim_catalog(catalog, NEW, backup="a dump", major=18, databases=["postgres", "trading"], record=False)
    assert json.loads(catalog.read_bytes(generation_key(NEW)))["reason"] == "automatic"
    third = "7500000000000000017"
    with pytest.raises(SystemMismatch):
        claim_catalog(catalog, third, backup="a dump", major=17, databases=["postgres", "trading"])
    put_record(catalog, "generations/upgrade-20270101T000000Z.begin.json",
               {"upgrade_id": "20270101T000000Z", "old_system": NEW, "old_major": 18, "began_at": "2027-01-01"})
    claim_catalog(catalog, "7600000000000000019", backup="a snapshot", major=19)
    assert json.loads(catalog.read_bytes(generation_key("7600000000000000019")))["reason"] == "upgrade"


def manifest(backup_id: str, system: str | None, version: str, started: str, kind: str = "snapshot") -> Manifest:
    return Manifest(id=backup_id, kind=kind, database="postgres", server="h:5432", server_version=version,
                    started_at=started, finished_at=started, path=f"{backup_id}.tar", size_bytes=1, sha256="0",
                    compression="zstd", system_identifier=system, start_segment="000000010000000000000002",
                    wal_segment_size=SIZE)


def test_merge_orders_generations_and_infers_a_legacy_major() -> None:
    archive_storage = MemoryStorage()
    archive_storage.put_new(IDENTITY_KEY, json.dumps({"system_identifier": OLD}).encode())  # before majors
    put_record(archive_storage, generation_key(NEW), {"system_identifier": NEW, "major": 18, "reason": "upgrade",
                                                      "first_segment": "000000010000000000000009"})
    old_snapshot = manifest("s1", OLD, "15.20 (Debian)", "2026-01-01T00:00:00Z")
    known = read_generations(None, archive_storage, [old_snapshot])
    assert [(g.system, g.major) for g in known.generations] == [(OLD, 15), (NEW, 18)]
    assert boundaries(known) == ["000000010000000000000009"]
    assert generation_of(manifest("legacy", None, "15.4", "2025-01-01T00:00:00Z", "dump"), known).system == OLD
    assert without_snapshot(known, [old_snapshot]).system == NEW
    assert without_snapshot(known, [old_snapshot, manifest("s2", NEW, "18.6", "2026-02-01T00:00:00Z")]) is None
    assert merge([], [], []).newest is None


def test_every_generation_is_the_catalogs_own() -> None:
    systems = CatalogSystems(OLD, [OLD, NEW])
    assert systems == OLD and not is_foreign(NEW, systems) and is_foreign(OTHER, systems)
    assert is_foreign(NEW, OLD), "a plain identifier still means one system"


def test_retention_keeps_each_generations_newest_snapshot_until_released() -> None:
    from datetime import UTC, datetime

    old = [manifest(f"old-{i}", OLD, "15.20", f"2026-01-0{i}T00:00:00Z") for i in range(1, 4)]
    new = [manifest(f"new-{i}", NEW, "18.6", f"2026-02-0{i}T00:00:00Z") for i in range(1, 4)]
    policy = RetentionPolicy(keep_weekly=2)
    now = datetime(2026, 3, 1, tzinfo=UTC)
    kept = {d.backup_id for d in plan([*old, *new], now, policy) if d.keep}
    assert kept == {"old-3", "new-2", "new-3"}
    kept = {d.backup_id for d in plan([*old, *new], now, policy, released={OLD}) if d.keep}
    assert kept == {"new-2", "new-3"}


def test_an_upgrade_is_open_until_finished() -> None:
    upgrade = Upgrade("x", OLD, 15, "2026-01-01", None, None)
    assert upgrade.open and not upgrade._replace(finished_at="2026-01-02").open
