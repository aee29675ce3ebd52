"""The archive's index (``wal.index``): never a wrong answer, whatever the cache file says or whoever reads.

Segments here are tiny objects with valid names and checksum trailers (all the index and coverage
read of them); history files are real archived objects (coverage decompresses them to follow
timelines). The property test compares coverage from the index, and from a list of names, with a
plain walk over the names, segment by segment, on random archives with gaps and timeline switches.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backup_tasks.postgres.servercmd import portable_tool
from backup_tasks.wal import index as index_module
from backup_tasks.wal.archive import WalArchive
from backup_tasks.wal.coverage import Coverage, coverages, timeline_for, timeline_path
from backup_tasks.wal.index import INDEX_FILE, RACY_SECONDS, read_index
from backup_tasks.wal.layout import object_key
from backup_tasks.wal.names import position, segment_name, segment_number, segments_per_xlogid, timeline_of
from tests.support.pitr import reachable_dir
from tests.support.wal import put_history, put_segment

MIB = 1 << 20
SIZE = 16 * MIB
IS_ROOT = os.geteuid() == 0


def age(root: Path, seconds: float = 3600) -> None:
    """Set every directory's mtime back, as for a directory nobody wrote to lately (ctime stays: it cannot be set)."""
    past = time.time() - seconds
    for directory in [p for p in root.iterdir() if p.is_dir()]:
        os.utime(directory, (past, past))


def cached_dirs(root: Path) -> dict[str, list[object]]:
    body = (root / INDEX_FILE).read_bytes().partition(b"\n")[2]
    return json.loads(body)["directories"]


def names_on(root: Path) -> list[str]:
    """What is archived, by walking the tree (the truth the index must match), in WAL order then timeline."""
    found = [p.name[:-4] for p in root.glob("[0-9A-F]*/*.zst") if len(p.name) == 28 and p.parent.name == p.name[:16]]
    return sorted(found, key=lambda n: (position(n), n[:8]))


def walked(archive: WalArchive, names: list[str], start: str, segment_size: int) -> Coverage:
    """The coverage of ``start`` by a plain walk, one segment name at a time (the reference)."""
    present = set(names)
    steps = timeline_path(archive, timeline_of(start), segment_size, start_segno=segment_number(start, segment_size))
    # A segment is on the path when the path reads its timeline at its number (not another branch's).
    on_path = [n for n in names if int(n[16:24], 16) < segments_per_xlogid(segment_size)
               and timeline_for(steps, segment_number(n, segment_size)) == timeline_of(n)]
    last = max(on_path, key=lambda n: segment_number(n, segment_size)) if on_path else None
    last_segno = segment_number(last, segment_size) if last else -1
    segno, end, count, gap = segment_number(start, segment_size), None, 0, None
    while True:
        name = segment_name(timeline_for(steps, segno), segno, segment_size)
        if name not in present:
            gap = name if segno <= last_segno else None
            break
        end, count, segno = name, count + 1, segno + 1
    completed = archive.trailer(end).completed_at if end else None
    return Coverage(start, end, completed, count, gap, last, [s.timeline for s in steps])


@pytest.fixture
def archive(tmp_path: Path) -> WalArchive:
    result = WalArchive.in_directory(tmp_path / "wal")
    result.ensure()
    return result


def test_a_changed_directory_is_listed_again_and_an_unchanged_one_is_not(
        archive: WalArchive, monkeypatch: pytest.MonkeyPatch) -> None:
    root = archive.root
    for n in [*range(0, 10), *range(256, 266)]:
        put_segment(root, segment_name(1, n, SIZE))
    age(root)
    assert archive.segment_names() == names_on(root)
    assert set(cached_dirs(root)) == {"0000000100000000", "0000000100000001"}

    listed: list[str] = []
    real_listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda path: listed.append(Path(path).name) or real_listdir(path))
    assert archive.segment_names() == names_on(root) and listed == [], "nothing changed: nothing listed"

    put_segment(root, segment_name(1, 12, SIZE))  # a gap at 10-11, then 12
    (root / object_key(segment_name(1, 260, SIZE))).unlink()
    assert archive.segment_names() == names_on(root)
    assert sorted(listed) == ["0000000100000000", "0000000100000001"]
    cov = coverages(archive, [(segment_name(1, 0, SIZE), SIZE), (segment_name(1, 256, SIZE), SIZE)])
    assert (cov[0].end_segment, cov[0].gap) == (segment_name(1, 9, SIZE), segment_name(1, 10, SIZE))
    assert (cov[1].segments, cov[1].gap) == (4, segment_name(1, 260, SIZE))


def test_a_change_hidden_from_the_mtime_is_still_seen(archive: WalArchive) -> None:
    """Someone adds a file and sets the directory's mtime back exactly: its ctime still moved."""
    root = archive.root
    for n in range(5):
        put_segment(root, segment_name(1, n, SIZE))
    age(root)
    directory = root / "0000000100000000"
    before = directory.stat()
    assert len(archive.segment_names()) == 5 and "0000000100000000" in cached_dirs(root)
    time.sleep(0.01)
    put_segment(root, segment_name(1, 5, SIZE))
    os.utime(directory, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert directory.stat().st_mtime_ns == before.st_mtime_ns
    assert archive.segment_names() == names_on(root) and len(names_on(root)) == 6


def test_a_directory_written_just_now_is_not_cached(archive: WalArchive) -> None:
    """A second change in the same timestamp tick as the listing would not move the mtime: not trusted."""
    root = archive.root
    put_segment(root, segment_name(1, 0, SIZE))
    put_segment(root, segment_name(1, 300, SIZE))
    os.utime(root / "0000000100000000", (time.time() - 3600,) * 2)
    assert len(archive.segment_names()) == 2
    assert set(cached_dirs(root)) == {"0000000100000000"}, f"written within {RACY_SECONDS} s: listed every time"


@pytest.mark.parametrize("damage", ["garbage", "truncated", "bad checksum", "checksum of a lie", "other format"])
def test_a_damaged_cache_file_is_ignored_and_replaced(archive: WalArchive, damage: str) -> None:
    root = archive.root
    for n in [*range(0, 7), *range(9, 20)]:
        put_segment(root, segment_name(1, n, SIZE))
    age(root)
    archive.segment_names()
    raw = (root / INDEX_FILE).read_bytes()
    digest, _, body = raw.partition(b"\n")
    document = json.loads(body)
    entry = document["directories"]["0000000100000000"]
    if damage == "garbage":
        raw = os.urandom(200)
    elif damage == "truncated":
        raw = raw[:len(raw) // 2]
    elif damage == "bad checksum":  # the body says every segment 0-19 is there, the checksum is the old one
        entry[4] = [[0, 19]]
        raw = digest + b"\n" + json.dumps(document).encode()
    elif damage == "checksum of a lie":  # well-formed, checksummed, but the runs overlap: not an index we wrote
        entry[4] = [[0, 6], [5, 19]]
        body = json.dumps(document).encode()
        raw = index_module.hashlib.sha256(body).hexdigest().encode() + b"\n" + body
    else:
        document["format"] = 99
        body = json.dumps(document).encode()
        raw = index_module.hashlib.sha256(body).hexdigest().encode() + b"\n" + body
    (root / INDEX_FILE).write_bytes(raw)
    assert archive.segment_names() == names_on(root)
    cov = coverages(archive, [(segment_name(1, 0, SIZE), SIZE)])[0]
    assert (cov.segments, cov.gap) == (7, segment_name(1, 7, SIZE))
    assert cached_dirs(root)["0000000100000000"][4] == [[0, 6], [9, 19]], "rewritten from the directory"


def test_no_archive_is_an_empty_index_and_wal_push_writes_no_index(tmp_path: Path) -> None:
    missing = WalArchive.in_directory(tmp_path / "nowhere")
    assert missing.segment_names() == [] and missing.names() == [] and missing.segment_runs() == {}
    assert not (tmp_path / "nowhere").exists(), "reading creates nothing"
    archive = WalArchive.in_directory(tmp_path / "wal")
    source = tmp_path / "pg_wal" / segment_name(1, 3, SIZE)
    source.parent.mkdir()
    source.write_bytes(b"\1" * MIB)
    archive.push(source)
    assert not (archive.root / INDEX_FILE).exists(), "wal-push never maintains the index"
    assert archive.names() == [source.name]


def test_other_files_and_sizes_are_summarized(archive: WalArchive, tmp_path: Path) -> None:
    root = archive.root
    put_segment(root, segment_name(1, 1, SIZE))
    put_segment(root, segment_name(1, 2, SIZE))
    backup = f"{segment_name(1, 2, SIZE)}.00000028.backup"
    (root / object_key(backup)).write_bytes(b"b" * 10)
    (root / "0000000100000000" / f".{segment_name(1, 3, SIZE)}.zst.incoming-abc").write_bytes(b"partial")
    (root / "0000000100000000" / "notes.txt").write_text("not archived")
    put_history(archive, tmp_path, 2, [(1, 3 * SIZE)])
    age(root)
    assert archive.names() == sorted([segment_name(1, 1, SIZE), segment_name(1, 2, SIZE), backup, "00000002.history"])
    index = read_index(root, count_bytes=lambda directory: True)
    expected = sum(os.stat(root / object_key(n)).st_size for n in archive.names() if not n.endswith(".history"))
    assert index.wal_bytes(["0000000100000000"]) == expected
    assert cached_dirs(root)["0000000100000000"][3] == expected, "the size is cached with the summary"


def _as_other_user_code(lib: Path, root: Path, starts: list[tuple[str, int]]) -> str:
    return (f"import sys, json\nsys.path.insert(0, {str(lib)!r})\n"
            "from backup_tasks.wal.archive import WalArchive\nfrom backup_tasks.wal.coverage import coverages\n"
            f"a = WalArchive.in_directory({str(root)!r})\n"
            f"print(json.dumps([a.segment_names(), [c.to_dict() for c in coverages(a, {starts!r})]]))\n")


@pytest.mark.slow
def test_a_reader_who_cannot_write_the_archive_root_still_answers_correctly(tmp_path: Path) -> None:
    """The archive belongs to one user (here root, or this user with the root read-only); another only reads it."""
    base = reachable_dir("bt-test-index-")
    try:
        root = base / "wal"
        archive = WalArchive.in_directory(root)
        for n in [*range(0, 300), *range(310, 600)]:
            put_segment(root, segment_name(1, n, SIZE))
        age(root)
        starts = [(segment_name(1, 0, SIZE), SIZE), (segment_name(1, 320, SIZE), SIZE)]
        expected = [archive.segment_names(), [c.to_dict() for c in coverages(archive, starts)]]
        put_segment(root, segment_name(1, 305, SIZE))  # the cached summary of its directory is stale now
        expected[0] = names_on(root)
        for path in [root, *root.rglob("*")]:
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        os.chmod(root / INDEX_FILE, 0o640)  # as the index writes it: another user may not even read it
        cache = (root / INDEX_FILE).read_bytes()
        if IS_ROOT:
            tool = reachable_dir("bt-test-index-tool-")
            try:
                portable_tool(tool)
                interpreter = os.path.realpath(sys.executable)
                result = subprocess.run(["runuser", "-u", "postgres", "--", interpreter, "-I", "-S", "-c",
                                         _as_other_user_code(next(tool.glob("lib-*")), root, starts)],
                                        capture_output=True, text=True, check=False, cwd="/")
            finally:
                shutil.rmtree(tool, ignore_errors=True)
            assert result.returncode == 0, result.stderr
            answer = json.loads(result.stdout)
        else:
            os.chmod(root, 0o555)
            answer = [archive.segment_names(), [c.to_dict() for c in coverages(archive, starts)]]
        assert answer == json.loads(json.dumps(expected))
        assert (root / INDEX_FILE).read_bytes() == cache and len(list(root.glob(f"{INDEX_FILE}*"))) == 1, \
            "nothing written, no temporary file left"
    finally:
        if (base / "wal").is_dir():
            os.chmod(base / "wal", 0o755)
        shutil.rmtree(base, ignore_errors=True)


def random_archive(rng: random.Random, archive: WalArchive, tmp: Path) -> tuple[int, list[tuple[str, int]]]:
    """Timelines 1-3 (2 and 3 branch off with history files), runs with gaps; the segment size and some starts."""
    segment_size = rng.choice([SIZE, MIB])
    # 16 MiB: 256 segments a directory; 1 MiB: 4096, so only the segments around the first boundary (fewer files).
    low, span = (0, rng.randint(2, 5) * 256) if segment_size == SIZE else (3700, rng.randint(4100, 4600))
    switch2 = rng.randint((low + span) // 2 - span // 4, (low + span) // 2)
    switch3 = rng.randint(switch2 + 1, span - 1)
    if rng.random() < 0.8:
        put_history(archive, tmp, 2, [(1, switch2 * segment_size + 40)])
    if rng.random() < 0.5:
        put_history(archive, tmp, 3, [(1, switch2 * segment_size + 40), (2, switch3 * segment_size + 40)])
    for timeline, first in ((1, low), (2, switch2), (3, switch3)):
        segno = first + rng.randint(0, 3)
        while segno < span:
            run = rng.choice([1, 2, 7, 40, 255, 256, 600])
            for n in range(segno, min(segno + run, span)):
                put_segment(archive.root, segment_name(timeline, n, segment_size))
            segno += run + rng.choice([0, 0, 1, 1, 3, 50])
    starts = []
    for _ in range(rng.randint(1, 6)):
        timeline = rng.choice([1, 1, 2, 3])
        # Now and then a start of the other size: names past its log id's last segment must never match.
        size = segment_size if rng.random() < 0.8 else SIZE + MIB - segment_size
        segno = rng.randint(max(0, low - 5), span + 2) * segment_size // size
        starts.append((segment_name(timeline, segno, size), size))
    return segment_size, starts


@pytest.mark.slow
def test_coverage_from_the_index_equals_a_walk_over_the_names(tmp_path: Path) -> None:
    """Random archives with gaps and timelines: from the index (cold, cached, after changes) and from names."""
    for seed in range(20):
        rng = random.Random(seed)
        base = tmp_path / f"case{seed}"
        archive = WalArchive.in_directory(base / "wal")
        archive.ensure()
        _segment_size, starts = random_archive(rng, archive, base)
        for phase in ("cold", "cached", "changed"):
            if phase == "cached":
                age(archive.root)
            if phase == "changed":
                present = names_on(archive.root)
                for name in rng.sample(present, min(len(present), rng.randint(1, 20))):
                    (archive.root / object_key(name)).unlink()
                put_segment(archive.root, segment_name(1, rng.randint(0, 3000), starts[0][1]))
            names = names_on(archive.root)
            assert archive.segment_names() == names, (seed, phase)
            expected = [walked(archive, names, start, size) for start, size in starts]
            assert coverages(archive, starts) == expected, (seed, phase)
            assert coverages(archive, starts, names) == expected, (seed, phase)
            assert coverages(archive, starts, list(reversed(names))) == expected, (seed, phase, "any order")
