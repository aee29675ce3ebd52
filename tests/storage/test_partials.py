"""Cleanup never removes the partial object of a writer that is still alive, whatever the locks say."""

from __future__ import annotations

import gc
import signal
import subprocess
import sys
import time
from pathlib import Path

from backup_tasks.storage.base import PARTIAL_MARK
from backup_tasks.storage.local import LocalStorage
from backup_tasks.storage.memory import MemoryStorage
from tests.support.paths import ROOT

WRITER = """
import sys, time
from pathlib import Path
from backup_tasks.storage.local import LocalStorage
writer = LocalStorage(Path(sys.argv[1])).writer("aitrapp-dump-1.dump.zst")
writer.write(b"x" * 1000)
print("writing", flush=True)
time.sleep(60)
"""


def _partials(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if PARTIAL_MARK in p.name]


def test_local_cleanup_skips_a_live_writer_in_another_process_and_clears_it_once_dead(tmp_path: Path) -> None:
    root = tmp_path / "backups"
    root.mkdir()
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(root)], cwd=ROOT, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == b"writing"
        assert len(_partials(root)) == 1
        # A second run (whose lock says the first one is gone: it stalled past the expiry) cleans up.
        assert LocalStorage(root).clear_partials("aitrapp-dump-") == []
        assert len(_partials(root)) == 1, "the live writer's partial was removed"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    leftover = [p.name for p in _partials(root)]
    assert len(leftover) == 1
    assert LocalStorage(root).clear_partials("aitrapp-dump-") == leftover  # its writer is dead now
    assert _partials(root) == []


def test_memory_cleanup_skips_a_live_writer_and_clears_an_abandoned_one() -> None:
    storage = MemoryStorage()
    live = storage.writer("aitrapp-dump-1.dump.zst")
    live.write(b"data")
    abandoned = storage.writer("aitrapp-dump-2.dump.zst")
    abandoned.write(b"data")
    del abandoned
    gc.collect()
    assert storage.clear_partials("aitrapp-dump-") == ["aitrapp-dump-2.dump.zst"]
    live.commit()  # its partial was still there
    assert storage.read_bytes("aitrapp-dump-1.dump.zst") == b"data"


def test_a_local_writer_that_committed_leaves_nothing_to_clear(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    writer = storage.writer("a.dump.zst")
    writer.write(b"abc")
    writer.commit()
    started = time.monotonic()
    assert storage.clear_partials() == []
    assert time.monotonic() - started < 1
