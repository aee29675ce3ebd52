"""The initdb template cache's housekeeping: entries of old binaries do not pile up."""

from __future__ import annotations

import os
import time
from pathlib import Path

from backup_tasks.postgres.template import MAX_ENTRIES, UNUSED_SECONDS, TemplateCache


def data_dir(tmp_path: Path) -> Path:
    data = tmp_path / "initdb-output"
    (data / "global").mkdir(parents=True)
    (data / "PG_VERSION").write_text("15\n")
    (data / "global" / "pg_control").write_bytes(os.urandom(512))
    return data


def test_storing_an_entry_expires_unused_and_least_recently_used_ones(tmp_path: Path) -> None:
    cache = TemplateCache(tmp_path / "cache")
    assert cache.usable_root()
    data = data_dir(tmp_path)
    now = time.time()
    for index, key in enumerate(["old-binaries", "a", "b", "c", "d"]):
        cache.store(key, data)
        used = now - UNUSED_SECONDS - 60 if key == "old-binaries" else now - 3600 + index
        os.utime(cache.root / key, (used, used))
    cache.store("new", data)
    kept = sorted(p.name for p in cache.root.iterdir())
    assert kept == ["b", "c", "d", "new"] and len(kept) == MAX_ENTRIES
    # A good copy marks the entry used: it is then kept over a more recently stored one.
    cache.fill("b", tmp_path / "copy")
    assert (tmp_path / "copy" / "PG_VERSION").read_text() == "15\n"
    cache.store("newer", data)
    assert sorted(p.name for p in cache.root.iterdir()) == ["b", "d", "new", "newer"]
