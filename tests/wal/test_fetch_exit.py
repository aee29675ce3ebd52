"""wal-fetch's exit code (issue 18, item 4): 1 only when a file is provably not archived, else 200.

Exit 1 ends recovery (for a segment) or answers a probe (a history file); 200 stops recovery with an
error. The incidents: the copy (``BACKUP_COPY_TO``) unreachable while the local archive lost a segment
(a real moto server, stopped), and a segment missing before a timeline switch. And the other side:
the files PostgreSQL asks for that never exist keep their prompt exit 1, copy or no copy.
"""

from __future__ import annotations

import os
import struct
import subprocess
import time
from pathlib import Path

import pytest

from backup_tasks.wal import state
from backup_tasks.wal.absence import ABSENT, GAP, UNPROVEN, Known, judge
from backup_tasks.wal.archive import WalArchive
from backup_tasks.wal.layout import object_key
from backup_tasks.wal.names import segment_name
from tests.support.paths import BACKUP_TASKS
from tests.support.processes import worker_env
from tests.support.s3 import start_moto
from tests.support.wal import fake_segment

MIB = 1 << 20
RECOVERY_FATAL = 200


def seg(timeline: int, number: int) -> str:
    return segment_name(timeline, number, MIB)


def history_text(*entries: tuple[int, int]) -> str:
    return "".join(f"{parent}\t{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}\tno recovery target specified\n"
                   for parent, lsn in entries)


def wal_fetch(archive: Path, name: str, destination: Path, env: dict[str, str], *extra: str) -> tuple[int, str, float]:
    """``backup-tasks wal-fetch`` as restore_command runs it: its exit code, stderr and duration."""
    began = time.monotonic()
    result = subprocess.run([BACKUP_TASKS, "wal-fetch", "--archive-dir", str(archive), *extra, name, str(destination)],
                            env=env, capture_output=True, text=True, timeout=120, check=False)
    return result.returncode, result.stderr, time.monotonic() - began


# --- the rule, file by file ------------------------------------------------------------------------------

TL2_AT_5 = {2: [(1, 5 * MIB)]}  # timeline 2 left timeline 1 in segment 5


@pytest.mark.parametrize(("name", "known", "outcome"), [
    # PostgreSQL's probes: the next timeline's history, timeline 1's (which never has one).
    ("00000002.history", Known({1: [(0, 1, 9)]}, {}), ABSENT),
    ("00000001.history", Known({1: [(0, 1, 9)]}, {}, complete=False), ABSENT),
    ("00000003.history", Known({1: [(0, 1, 9)], 2: [(0, 5, 9)]}, TL2_AT_5, complete=False), ABSENT),
    # A lost history file: WAL of its timeline (or a later one) is known.
    ("00000002.history", Known({1: [(0, 1, 9)], 2: [(0, 5, 9)]}, {}), GAP),
    ("00000002.history", Known({1: [(0, 1, 9)]}, {3: [(1, 5 * MIB)]}), GAP),
    ("00000002.history", Known({1: [(0, 1, 9)]}, {}, (seg(2, 6),), complete=False), UNPROVEN),
    # The end of the archived WAL, and a timeline never used.
    (seg(1, 10), Known({1: [(0, 1, 9)]}, {}), ABSENT),
    (seg(1, 10), Known({1: [(0, 1, 9)]}, {}, (seg(1, 9),), complete=False), ABSENT),
    (seg(3, 7), Known({1: [(0, 1, 9)], 2: [(0, 5, 9)]}, TL2_AT_5, complete=False), ABSENT),
    # A gap on the timeline itself.
    (seg(1, 4), Known({1: [(0, 1, 3), (0, 5, 9)]}, {}), GAP),
    (seg(1, 4), Known({1: [(0, 1, 3), (0, 5, 9)]}, {}, complete=False), UNPROVEN),
    # wal-push recorded it (or later WAL of its timeline) as archived: lost, or only in an unreadable copy.
    (seg(1, 9), Known({1: [(0, 1, 8)]}, {}, (seg(1, 9),), complete=False), UNPROVEN),
    (seg(1, 9), Known({1: [(0, 1, 8)]}, {}, (seg(1, 12),)), GAP),
    # A gap before a timeline switch: timeline 2 left timeline 1 after segment 4, so 4 existed.
    (seg(1, 4), Known({1: [(0, 1, 3)], 2: [(0, 5, 9)]}, TL2_AT_5), GAP),
    (seg(1, 4), Known({1: [(0, 1, 3)], 2: [(0, 5, 9)]}, TL2_AT_5, complete=False), UNPROVEN),
    (seg(1, 4), Known({1: [(0, 1, 3)]}, TL2_AT_5, (seg(2, 7),)), GAP),
    # ... but its own switch segment (only a .partial at a promotion), and a branch with nothing archived, are not.
    (seg(1, 5), Known({1: [(0, 1, 4)], 2: [(0, 5, 9)]}, TL2_AT_5), ABSENT),
    (seg(1, 4), Known({1: [(0, 1, 3)], 2: []}, TL2_AT_5), ABSENT),
    # WAL of an ancestor or a sibling that went on after a branch says nothing about this timeline.
    (seg(2, 10), Known({1: [(0, 1, 20)], 2: [(0, 5, 9)]}, TL2_AT_5, (seg(1, 20),), complete=False), ABSENT),
    (seg(3, 8), Known({2: [(0, 5, 9)], 3: [(0, 6, 7)]}, {**TL2_AT_5, 3: [(1, 5 * MIB), (2, 6 * MIB)]}), ABSENT),
    # A major upgrade: the old system archived 1-9, the new one (pg_upgrade) from 14 on. The names between are
    # provably absent (the old server's last segment is never archived), a loss inside the old WAL still a gap,
    # and the new system's state record, WAL and branches say nothing about the old system's.
    (seg(1, 10), Known({1: [(0, 1, 9), (0, 14, 20)]}, {}, boundaries=(seg(1, 14),)), ABSENT),
    (seg(1, 13), Known({1: [(0, 1, 9), (0, 14, 20)]}, {}, (seg(1, 20),), boundaries=(seg(1, 14),)), ABSENT),
    (seg(1, 12), Known({1: [(0, 1, 9), (0, 14, 20)], 2: [(0, 16, 18)]}, {2: [(1, 16 * MIB)]},
                       boundaries=(seg(1, 14),)), ABSENT),
    (seg(1, 5), Known({1: [(0, 1, 4), (0, 6, 9), (0, 14, 20)]}, {}, boundaries=(seg(1, 14),)), GAP),
    (seg(1, 16), Known({1: [(0, 1, 9), (0, 14, 15), (0, 17, 20)]}, {}, boundaries=(seg(1, 14),)), GAP),
    (seg(1, 10), Known({1: [(0, 1, 9), (0, 14, 20)]}, {}), GAP),  # without the generation records: a gap
    (seg(1, 10), Known({1: [(0, 1, 9), (0, 14, 20)]}, {}, (seg(1, 10),), boundaries=(seg(1, 14),)), GAP),
    # Files PostgreSQL does not need to recover: absent only when every location answered.
    (f"{seg(1, 3)}.partial", Known({1: [(0, 1, 3)]}, {}), ABSENT),
    (f"{seg(1, 3)}.00000028.backup", Known({1: [(0, 1, 3)]}, {}, complete=False), UNPROVEN),
])
def test_the_absence_rule(name: str, known: Known, outcome: str) -> None:
    assert judge(name, known, lambda: MIB).outcome == outcome


# --- the incidents ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_gap_before_a_timeline_switch_stops_recovery(tmp_path: Path) -> None:
    """Timeline 1 lost segments 4 and 5 (the old primary died before archiving them); timeline 2 branched from
    it in segment 5 and is archived. Recovery along 1 -> 2 asks for 1/4: exiting 1 would end it at 1/3 and
    promote, short of everything on timeline 2. It also holds when timeline 2 is only in the copy."""
    archive = WalArchive.in_directory(tmp_path / "wal", str(tmp_path / "copy"))
    archive.ensure()
    pg_wal = tmp_path / "pg_wal"
    for timeline, numbers in ((1, (1, 2, 3)), (2, (5, 6, 7))):
        for number in numbers:
            archive.push(fake_segment(pg_wal, seg(timeline, number), seed=timeline * 100 + number))
    (pg_wal / "00000002.history").write_text(history_text((1, 5 * MIB + 0x28)))
    archive.push(pg_wal / "00000002.history")
    env, out = worker_env(), tmp_path / "RECOVERYXLOG"

    code, stderr, _ = wal_fetch(archive.root, seg(1, 4), out, env)
    assert code == RECOVERY_FATAL and "timeline switch" in stderr and seg(1, 4) in stderr, stderr
    assert not out.exists()
    # What PostgreSQL legitimately asks for and never finds: still exit 1.
    for never in (seg(1, 5), seg(2, 8), "00000003.history", seg(3, 7)):
        code, stderr, _ = wal_fetch(archive.root, never, out, env)
        assert code == 1, (never, stderr)
    # Timeline 2 (history and segments) only in the copy: the local archive alone cannot tell, the union can.
    for name in (seg(2, 5), seg(2, 6), seg(2, 7), "00000002.history"):
        os.unlink(archive.root / object_key(name))
    code, stderr, _ = wal_fetch(archive.root, seg(1, 4), out, env, "--copy-to", str(tmp_path / "copy"))
    assert code == RECOVERY_FATAL and "timeline switch" in stderr, stderr
    code, stderr, _ = wal_fetch(archive.root, seg(2, 6), out, env, "--copy-to", str(tmp_path / "copy"))
    assert code == 0 and out.read_bytes() == (pg_wal / seg(2, 6)).read_bytes(), stderr


@pytest.mark.slow
def test_an_unreachable_copy_is_fatal_unless_the_file_provably_never_existed(tmp_path: Path) -> None:
    """Segments archived by wal-push in the local archive and a bucket copy; the endpoint then goes away (moto
    stopped) and the local archive has lost its newest segment. Exiting 1 for it would end recovery early:
    200. The files that never exist (the next timeline's history, the segment after the end, a timeline never
    used) still exit 1, quickly."""
    proc, server = start_moto(tmp_path / "moto.log")
    try:
        copy_to = f"s3://{server.new_bucket()}/prod"
        env = worker_env(**server.env())
        archive_dir, pg_wal = tmp_path / "wal", tmp_path / "pg_wal"
        names = [seg(1, number) for number in range(1, 6)]
        for number, name in enumerate(names, start=1):
            fake_segment(pg_wal, name, seed=number)
            pushed = subprocess.run([BACKUP_TASKS, "wal-push", "--archive-dir", str(archive_dir), "--copy-to", copy_to,
                                     str(pg_wal / name)], env=env, capture_output=True, text=True, timeout=120,
                                    check=False)
            assert pushed.returncode == 0, pushed.stderr
        assert state.read(archive_dir)["copy"].segment == names[-1]  # how far the copy got, recorded locally
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    os.unlink(archive_dir / object_key(names[-1]))  # the local archive lost it; the copy cannot be asked
    out = tmp_path / "RECOVERYXLOG"
    fetch = ["--copy-to", copy_to]

    code, stderr, _ = wal_fetch(archive_dir, names[-1], out, env, *fetch)
    assert code == RECOVERY_FATAL, stderr
    assert "cannot be read to make sure" in stderr and names[-1] in stderr and "Traceback" not in stderr
    assert not out.exists()
    code, stderr, _ = wal_fetch(archive_dir, names[1], out, env, *fetch)  # still local: never asks the copy
    assert code == 0 and out.read_bytes() == (pg_wal / names[1]).read_bytes(), stderr
    for never in ("00000002.history", seg(1, 6), seg(2, 3)):
        code, stderr, took = wal_fetch(archive_dir, never, out, env, *fetch)
        assert code == 1, (never, stderr)
        assert took < 15, f"{never}: {took:.1f}s"
        print(f"wal-fetch {never} with the copy down: exit 1 in {took:.2f}s")


def upgraded_segment(directory: Path, name: str, system: int, magic: int) -> Path:
    """A 1 MiB segment of ``system`` whose first page carries a real long header (the page magic of a major)."""
    path = fake_segment(directory, name, seed=int(name[16:], 16))
    number = int(name[8:16], 16) * 4096 + int(name[16:24], 16)
    header = struct.pack("=HHIQI4xQII", magic, 0x0002, int(name[:8], 16), number * MIB, 0, system, MIB, 8192)
    with path.open("r+b") as fh:
        fh.write(header)
    return path


def test_the_names_a_major_upgrade_skipped_end_the_old_generations_recovery(tmp_path: Path) -> None:
    """PostgreSQL 15 archived segments 1-4 (its last one, 5, cut short by the shutdown, never was); pg_upgrade's
    18 archives from 8 on, into the same archive, which records where its generation begins. Recovery of the
    old generation asks for 5: exit 1 (the end of its WAL), not 200 (a gap, which failed every restore to the
    moment before the upgrade). A segment lost inside the old WAL stays a gap."""
    archive = WalArchive.in_directory(tmp_path / "wal")
    archive.ensure()
    pg_wal = tmp_path / "pg_wal"
    for number in (1, 2, 3, 4):
        archive.push(upgraded_segment(pg_wal, seg(1, number), 7000000000000000015, 0xD110))
    for number in (8, 9):
        archive.push(upgraded_segment(pg_wal, seg(1, number), 7400000000000000018, 0xD118))
    env, out = worker_env(), tmp_path / "RECOVERYXLOG"
    for skipped in (seg(1, 5), seg(1, 7)):
        code, stderr, _ = wal_fetch(archive.root, skipped, out, env)
        assert code == 1, (skipped, stderr)
    os.unlink(archive.root / object_key(seg(1, 3)))
    code, stderr, _ = wal_fetch(archive.root, seg(1, 3), out, env)
    assert code == RECOVERY_FATAL and seg(1, 3) in stderr and "up to 0000000100000000" + "00000004" in stderr, stderr


def test_the_generation_records_are_read_from_the_copy_when_the_primary_has_none(tmp_path: Path) -> None:
    """A restore from the copy alone (the local archive lost, or a new host): ``upgrade --finish`` copied the new
    generation's record there, so the names the upgrade skipped are absent there too."""
    from backup_tasks.wal.fetch import generation_boundaries
    from backup_tasks.wal.system import generation_key, put_record

    archive = WalArchive.in_directory(tmp_path / "wal", str(tmp_path / "copy"))
    archive.ensure()
    assert generation_boundaries(archive) == ()
    assert archive.copy is not None
    put_record(archive.copy, generation_key("7400000000000000018"),
               {"system_identifier": "7400000000000000018", "major": 18, "first_segment": seg(1, 8)})
    assert generation_boundaries(archive) == (seg(1, 8),)
    put_record(archive.primary, generation_key("7500000000000000019"),
               {"system_identifier": "7500000000000000019", "major": 19, "first_segment": seg(1, 30)})
    assert generation_boundaries(archive) == (seg(1, 30),), "the primary's records first"
