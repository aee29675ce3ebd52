"""A chain of PostgreSQL 18 incremental backups combined in place (``physical.combine``), against the reference.

One chain, built once: a full and three incrementals of a small cluster, each taken after a day that updates rows
scattered over a few-MB table, extends a relation, truncates and refills a table smaller, cuts a table's tail with
VACUUM, drops and creates tables, indexes and databases. ``pg_combinebackup`` writes the reference; the full's copy
combined in place must hold exactly its files, start, and show the data the source had at the last backup.
Broken chains are refused and named (by ``pg_combinebackup --dry-run`` and by ``combine_in_place`` itself), and the
chain cache's sparse skeleton keeps only lengths yet serves the next dry run. One limit is pinned: the dry run cannot
tell a skeleton (or any older member's whole) file cut short, as pg_combinebackup zero-fills what such a file lacks.

Backups are taken by the ``postgres`` OS user (pg_basebackup and pg_combinebackup run as it); ``combine_in_place``
runs as root on copies of the members it changes (the root full, and the newest, whose whole files it moves).
"""

from __future__ import annotations

import dataclasses
import filecmp
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from backup_tasks.conninfo import ConnInfo
from backup_tasks.errors import BackupCorrupt
from backup_tasks.physical.combine import (
    BLCKSZ,
    INCREMENTAL_MAGIC,
    PREFIX,
    RELSEG_SIZE,
    Combined,
    combine_in_place,
    dry_run,
    read_incremental,
    sparse_skeleton,
)
from backup_tasks.postgres.cluster import ThrowawayCluster, as_server_user, server_uid_gid
from backup_tasks.postgres.connect import connect
from tests.support.pitr import reachable_dir

pytestmark = pytest.mark.slow

#: What incremental backups need of the server (a restored copy runs with the same WAL level).
SERVER_SETTINGS = {"wal_level": "replica", "max_wal_senders": "4", "summarize_wal": "on"}
BIG_ROWS = 40_000  # about 6 MB of heap: updates land on blocks all over it
TAIL_ROWS = 20_000
REFILL_ROWS = 20_000


@dataclass(frozen=True)
class Chain:
    bin_dir: Path
    root: Path  # scratch for everything below; removed at the end
    full: Path
    incrementals: list[Path]  # oldest first
    reference: Path  # pg_combinebackup of the whole chain
    at_last_backup: dict[str, str]  # fingerprint of the source when the newest incremental was taken
    doomed_dir: str  # base/<oid> of a database present at the full, dropped on day 1
    #: Tables' files at the full: ``gone`` (dropped on day 1), ``big`` (updated daily: an INCREMENTAL file in every
    #: incremental), ``tail`` (cut by VACUUM daily), ``loaded`` (COPY leaves zero pages no WAL mentions at its end).
    files: dict[str, str]

    @property
    def pg_combinebackup(self) -> Path:
        return self.bin_dir / "pg_combinebackup"

    def copy(self, source: Path, name: str) -> Path:
        """A root-owned copy to consume or damage; the original stays as pg_basebackup wrote it."""
        destination = self.root / "work" / name
        shutil.copytree(source, destination, symlinks=True)
        return destination


def run_as_server_user(*argv: str | Path) -> None:
    result = subprocess.run([*as_server_user(), *map(str, argv)], capture_output=True, text=True, check=False,
                            cwd="/", timeout=300)
    assert result.returncode == 0, f"{argv[0]} failed: {result.stderr}{result.stdout}"


def take_backup(bin_dir: Path, port: int, output: Path, parent: Path | None = None) -> Path:
    argv: list[str | Path] = [bin_dir / "pg_basebackup", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                              "-D", output, "-Fp", "-X", "fetch", "-c", "fast", "--no-sync"]
    if parent is not None:
        argv.append(f"--incremental={parent / 'backup_manifest'}")
    run_as_server_user(*argv)
    return output


def fingerprint(conninfo: ConnInfo) -> dict[str, str]:
    """Every user table of the database (count and a hash of its rows) and the cluster's list of databases."""
    with connect(conninfo) as conn:
        tables = [str(row[0]) for row in conn.execute(
            "SELECT relname FROM pg_class WHERE relkind = 'r' AND relnamespace = 'public'::regnamespace "
            "ORDER BY relname")]
        found = {"databases": str(conn.execute(
            "SELECT string_agg(datname, ',' ORDER BY datname) FROM pg_database").fetchone()[0])}
        for table in tables:
            found[table] = str(conn.execute(
                f"SELECT count(*) || ':' || coalesce(md5(string_agg(t::text, ',' ORDER BY t::text)), '') "
                f"FROM {table} t").fetchone()[0])
        return found


def set_up(admin: ConnInfo, app: ConnInfo, doomed: ConnInfo) -> None:
    with connect(admin) as conn:
        conn.execute("CREATE DATABASE app")
        conn.execute("CREATE DATABASE doomed")
    with connect(doomed) as conn:
        conn.execute("CREATE TABLE keepsake AS SELECT g AS id FROM generate_series(1, 1000) g")
    with connect(app) as conn:
        conn.execute("CREATE TABLE big (id int PRIMARY KEY, payload text)")
        conn.execute(f"INSERT INTO big SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, {BIG_ROWS}) g")
        conn.execute("CREATE TABLE grow (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO grow SELECT g, md5(g::text) FROM generate_series(1, 2000) g")
        conn.execute("CREATE TABLE refill (id int, v text)")
        conn.execute(f"INSERT INTO refill SELECT g, md5(g::text) FROM generate_series(1, {REFILL_ROWS}) g")
        conn.execute("CREATE TABLE tail (id int, v text)")
        conn.execute(f"INSERT INTO tail SELECT g, md5('tail' || g) FROM generate_series(1, {TAIL_ROWS}) g")
        conn.execute("CREATE TABLE gone AS SELECT g AS id FROM generate_series(1, 5000) g")
        conn.execute("CREATE TABLE loaded (id int, v text)")
        conn.execute("VACUUM (FREEZE, ANALYZE)")  # VM and FSM forks; and no hint bit left to set (a page each)


def change_a_day(admin: ConnInfo, app: ConnInfo, day: int) -> None:
    with connect(app) as conn:
        conn.execute(f"UPDATE big SET payload = upper(payload) || '{day}' WHERE id % 97 = {day}")
        conn.execute(f"INSERT INTO grow SELECT g, md5(g::text) FROM generate_series({2000 * day + 1}, "
                     f"{2000 * (day + 1)}) g")
        # COPY extends the table many pages at a time; the pages it does not fill stay zeros no WAL mentions,
        # which the combination must still write (the file's length is what the incremental says).
        with conn.cursor().copy("COPY loaded (id, v) FROM STDIN") as copy:
            for row in range(30_000 * day):
                copy.write_row((row, f"day {day} row {row}"))
        conn.execute("TRUNCATE refill")  # a new relfilenode: the old file is dropped, the new one sent whole
        conn.execute(f"INSERT INTO refill SELECT g, md5(g::text) FROM generate_series(1, {REFILL_ROWS - 5000 * day}) g")
        conn.execute(f"DELETE FROM tail WHERE id > {TAIL_ROWS - 4000 * day}")
        conn.execute("VACUUM tail")  # its emptied tail pages are cut off the file
        conn.execute(f"CREATE TABLE fresh_{day} AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 3000) g")
        conn.execute(f"CREATE INDEX ON fresh_{day} (v)")
        conn.execute(f"CREATE INDEX grow_v_{day} ON grow (v)")
        conn.execute("DROP TABLE gone" if day == 1 else f"DROP TABLE fresh_{day - 1}")
    with connect(admin) as conn:
        conn.execute(f"CREATE DATABASE day_{day}")
        if day == 1:
            conn.execute("DROP DATABASE doomed")
        if day == 3:
            conn.execute("DROP DATABASE day_1")  # born in an incremental, gone by the last
    with connect(dataclasses.replace(app, dbname=f"day_{day}")) as conn:
        conn.execute(f"CREATE TABLE t AS SELECT g AS id FROM generate_series(1, {1000 * day}) g")


@pytest.fixture(scope="module")
def chain(pg18_bin: Path) -> Iterator[Chain]:
    root = reachable_dir("bt-test-combine-")
    try:
        backups = root / "backups"
        backups.mkdir()
        ids = server_uid_gid()
        if ids is not None:
            os.chown(backups, *ids)
        # 1 MB WAL segments: each backup carries its own WAL (-X fetch), and every test copies backups around.
        with ThrowawayCluster(exact_major=18, bin_dir=pg18_bin, settings=SERVER_SETTINGS,
                              initdb_args=("--wal-segsize=1",)) as cluster:
            admin, app, doomed = (cluster.conninfo(name) for name in ("postgres", "app", "doomed"))
            set_up(admin, app, doomed)
            with connect(app) as conn:
                doomed_dir = str(conn.execute("SELECT 'base/' || oid FROM pg_database WHERE datname = 'doomed'")
                                 .fetchone()[0])
                files = {table: str(conn.execute("SELECT pg_relation_filepath(%s)", (table,)).fetchone()[0])
                         for table in ("big", "gone", "tail", "loaded")}
            members = [take_backup(pg18_bin, cluster.port, backups / "full")]
            for day in (1, 2, 3):
                change_a_day(admin, app, day)
                members.append(take_backup(pg18_bin, cluster.port, backups / f"incr{day}", members[-1]))
            # Nothing wrote since the last backup: its state.
            at_last_backup = {**fingerprint(app), **{f"day_3.{key}": value for key, value in
                                                     fingerprint(cluster.conninfo("day_3")).items()}}
        reference = backups / "reference"
        run_as_server_user(pg18_bin / "pg_combinebackup", "--no-sync", "-o", reference, *members)
        yield Chain(pg18_bin, root, members[0], members[1:], reference, at_last_backup, doomed_dir, files)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True)
class Ours:
    directory: Path
    combined: Combined
    older_members_untouched: bool  # incr1 and incr2, used where they lie, are as pg_basebackup wrote them


def listing(member: Path) -> dict[str, tuple[int, int, int]]:
    """Each entry's (size, mtime, mode): what a write into an older member would change."""
    return {str(path.relative_to(member)): (status.st_size, status.st_mtime_ns, status.st_mode)
            for path in member.rglob("*") for status in [path.lstat()]}


def combined_copy(chain: Chain, name: str, members: int, *, data: bool = True) -> tuple[Path, Combined]:
    """A copy of the full combined in place with the first ``members`` incrementals. Only the newest member is
    consumed (its whole files are moved): it is copied; the older ones are only read and are used where they are."""
    target = chain.copy(chain.full, name)
    newest = chain.copy(chain.incrementals[members - 1], f"{name}-{chain.incrementals[members - 1].name}")
    return target, combine_in_place(target, [*chain.incrementals[:members - 1], newest], data=data)


@pytest.fixture(scope="module")
def ours(chain: Chain) -> Ours:
    """The full's copy combined in place with the three incrementals."""
    before = [listing(member) for member in chain.incrementals[:2]]
    directory, combined = combined_copy(chain, "ours", 3)
    return Ours(directory, combined, [listing(member) for member in chain.incrementals[:2]] == before)


def tree(root: Path) -> tuple[set[str], set[str]]:
    """(files, directories) under ``root``, relative; a backup_manifest is not part of the data directory."""
    files: set[str] = set()
    dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        relative = Path(dirpath).relative_to(root)
        dirs.update(str(relative / name) for name in dirnames)
        files.update(str(relative / name) for name in filenames)
    files.discard("backup_manifest")
    return files, dirs


def label_field(member: Path, field: str) -> str:
    """One line's value from a member's backup_label."""
    [value] = [line.partition(": ")[2] for line in (member / "backup_label").read_text().splitlines()
               if line.startswith(f"{field}: ")]
    return value


def incremental_name(relative: str) -> str:
    """base/1/2 -> base/1/INCREMENTAL.2"""
    folder, _, name = relative.rpartition("/")
    return f"{folder}/{PREFIX}{name}"


def incremental_files(member: Path) -> Iterator[tuple[str, Path]]:
    """(the whole file's relative path, the INCREMENTAL file) for each incremental file under base/ of ``member``."""
    for path in sorted((member / "base").rglob(f"{PREFIX}*")):
        yield str(path.parent.relative_to(member) / path.name[len(PREFIX):]), path


def test_combined_in_place_is_byte_identical_to_pg_combinebackup(chain: Chain, ours: Ours) -> None:
    reference_files, reference_dirs = tree(chain.reference)
    our_files, our_dirs = tree(ours.directory)
    assert our_dirs == reference_dirs
    assert our_files == reference_files
    different = [name for name in sorted(our_files)
                 if not filecmp.cmp(ours.directory / name, chain.reference / name, shallow=False)]
    assert different == [], f"{len(different)} files differ from pg_combinebackup's, e.g. {different[:10]}"
    assert ours.older_members_untouched
    assert not (ours.directory / "backup_manifest").exists()
    assert b"INCREMENTAL FROM" not in (ours.directory / "backup_label").read_bytes()
    assert ours.combined.blocks_written > 0 and ours.combined.reconstructed > 0
    assert ours.combined.removed > 0
    # The chain did what the days say (else the comparison above proves less than it claims).
    full_files, full_dirs = tree(chain.full)
    assert chain.doomed_dir in full_dirs and chain.doomed_dir not in our_dirs
    assert chain.files["gone"] in full_files and chain.files["gone"] not in our_files
    newest = chain.incrementals[-1]
    cut = read_incremental(newest / incremental_name(chain.files["tail"]))  # VACUUM cut it that day
    assert (ours.directory / chain.files["tail"]).stat().st_size == cut.reconstructed_blocks * BLCKSZ
    assert cut.reconstructed_blocks * BLCKSZ < (chain.full / chain.files["tail"]).stat().st_size
    loaded = read_incremental(newest / incremental_name(chain.files["loaded"]))  # zero pages past its last block
    assert max(loaded.blocks) + 1 < loaded.truncation_blocks
    assert (ours.directory / chain.files["loaded"]).stat().st_size == loaded.truncation_blocks * BLCKSZ
    assert any(read_incremental(path).blocks for member in chain.incrementals
               for _, path in incremental_files(member))


def test_the_combined_directory_starts_and_shows_the_last_backups_data(chain: Chain, ours: Ours) -> None:
    with ThrowawayCluster(exact_major=18, bin_dir=chain.bin_dir, settings=SERVER_SETTINGS,
                          prepare=lambda data_dir: shutil.copytree(ours.directory, data_dir, symlinks=True)) as server:
        app = server.conninfo("app")
        assert {**fingerprint(app), **{f"day_3.{key}": value for key, value in
                                       fingerprint(server.conninfo("day_3")).items()}} == chain.at_last_backup
        with connect(app) as conn:
            conn.execute("CREATE EXTENSION amcheck")
            indexes = [str(row[0]) for row in conn.execute(
                "SELECT c.oid::regclass FROM pg_class c JOIN pg_am a ON a.oid = c.relam "
                "WHERE c.relkind = 'i' AND a.amname = 'btree' AND c.relnamespace = 'public'::regnamespace")]
            assert len(indexes) >= 4
            for index in indexes:
                conn.execute("SELECT bt_index_check(%s::regclass, true)", (index,))
            for table in ("big", "grow", "tail", "refill", "fresh_3"):
                corruption = conn.execute("SELECT * FROM verify_heapam(%s::regclass)", (table,)).fetchall()
                assert corruption == [], (table, corruption[:5])


def test_a_chain_missing_a_member_is_refused_by_the_dry_run_naming_it(chain: Chain) -> None:
    incr2 = chain.incrementals[1]
    scratch = chain.root / "dry-run-scratch"
    scratch.mkdir(exist_ok=True)
    assert dry_run(chain.pg_combinebackup, [chain.full, *chain.incrementals], scratch) is None
    complaint = dry_run(chain.pg_combinebackup, [chain.full, incr2], scratch)
    # The broken link, named: the parent given starts elsewhere than incr2 says its parent started.
    full_start = label_field(chain.full, "START WAL LOCATION").split()[0]
    incr2_parent = label_field(incr2, "INCREMENTAL FROM LSN")
    assert full_start != incr2_parent
    assert complaint is not None and str(chain.full) in complaint, complaint
    assert f"starts at LSN {full_start}, but expected {incr2_parent}" in complaint
    assert list(scratch.iterdir()) == [], "a dry run writes nothing"


def test_an_incremental_file_with_a_bad_magic_number_is_corrupt_and_named(chain: Chain) -> None:
    damaged = chain.copy(chain.incrementals[0], "bad-magic")
    _, path = next(incremental_files(damaged))
    assert read_incremental(path).path == path
    with open(path, "r+b") as file:
        file.write((INCREMENTAL_MAGIC ^ 0xFF).to_bytes(4, "little"))
    with pytest.raises(BackupCorrupt, match="bad incremental magic number") as raised:
        read_incremental(path)
    assert str(path) in str(raised.value)
    complaint = dry_run(chain.pg_combinebackup, [chain.full, damaged], chain.root)
    assert complaint is not None and str(path) in complaint, complaint


def incremental_file(path: Path, blocks: list[int], truncation: int, *, stored_blocks: int | None = None) -> Path:
    """An INCREMENTAL file as pg_basebackup writes it (little-endian header, blocks aligned to BLCKSZ)."""
    header = struct.pack(f"<3I{len(blocks)}I", INCREMENTAL_MAGIC, len(blocks), truncation, *blocks)
    if blocks:
        header += bytes(-len(header) % BLCKSZ)
    stored = len(blocks) if stored_blocks is None else stored_blocks
    path.write_bytes(header + b"".join(bytes([block % 256]) * BLCKSZ for block in blocks[:stored]))
    return path


def test_an_incremental_header_is_read_as_pg_combinebackup_reads_it(tmp_path: Path) -> None:
    """Lengths PostgreSQL itself never produces on a small table: a block past the truncation length, none at all."""
    past = read_incremental(incremental_file(tmp_path / "INCREMENTAL.1", [3, 9], 5))
    assert (list(past.blocks), past.truncation_blocks, past.header_length) == ([3, 9], 5, BLCKSZ)
    assert past.reconstructed_blocks == 10, "up to and including the highest block held"
    empty = read_incremental(incremental_file(tmp_path / "INCREMENTAL.2", [], 7))
    assert (empty.header_length, empty.reconstructed_blocks) == (12, 7)
    short = incremental_file(tmp_path / "INCREMENTAL.3", [0, 1], 2, stored_blocks=1)
    with pytest.raises(BackupCorrupt, match=f"{short} is {2 * BLCKSZ} bytes; its header says {3 * BLCKSZ}"):
        read_incremental(short)
    huge = tmp_path / "INCREMENTAL.4"
    huge.write_bytes(struct.pack("<3I", INCREMENTAL_MAGIC, 0, RELSEG_SIZE + 1))
    with pytest.raises(BackupCorrupt, match="truncation length of 131073 blocks"):
        read_incremental(huge)


def test_an_ancestor_missing_an_incremental_file_is_corrupt_and_named(chain: Chain) -> None:
    incr1, incr2, _ = chain.incrementals
    big = incremental_name(chain.files["big"])
    assert (incr1 / big).is_file() and (incr2 / big).is_file(), "the chain's premise"
    target = chain.copy(chain.full, "missing-full")
    broken = chain.copy(incr1, "missing-incr1")
    newest = chain.copy(incr2, "missing-incr2")
    (broken / big).unlink()
    complaint = dry_run(chain.pg_combinebackup, [target, broken, newest], chain.root)
    assert complaint is not None and str(broken / big) in complaint, complaint
    with pytest.raises(BackupCorrupt, match=f"{chain.files['big']} of {newest.name} needs blocks from {broken.name}"):
        combine_in_place(target, [broken, newest])


@dataclass(frozen=True)
class Skeleton:
    directory: Path
    sizes: dict[str, int]  # the combined files under base/ and global/, before they became holes


@pytest.fixture(scope="module")
def skeleton(chain: Chain) -> Skeleton:
    """full + incr1 + incr2 combined, then made a skeleton (as the chain cache keeps it for incr3's check)."""
    directory, _ = combined_copy(chain, "skeleton", 2)
    files, _ = tree(directory)
    sizes = {name: (directory / name).stat().st_size for name in files if name.startswith(("base/", "global/"))}
    sparse_skeleton(directory)
    return Skeleton(directory, sizes)


def test_a_sparse_skeleton_keeps_lengths_only_and_serves_the_dry_run(chain: Chain, skeleton: Skeleton) -> None:
    files, dirs = tree(skeleton.directory)
    assert {name for name in files if name.startswith(("base/", "global/"))} == set(skeleton.sizes)
    assert {name for name in files if not name.startswith(("base/", "global/"))} == {"backup_label"}
    assert not {"pg_wal", "pg_xact"} & dirs
    for name, size in skeleton.sizes.items():
        status = (skeleton.directory / name).stat()
        if name == "global/pg_control":
            assert (status.st_size, status.st_blocks > 0) == (size, True)
            continue
        assert (status.st_size, status.st_blocks) == (size, 0), name
    assert any(size > 0 for size in skeleton.sizes.values())
    assert dry_run(chain.pg_combinebackup, [skeleton.directory, chain.incrementals[2]], chain.root) is None
    # The chain cache's way (each length set, no block written) makes the same skeleton.
    cached, _ = combined_copy(chain, "skeleton-cached", 2, data=False)
    sparse_skeleton(cached)
    assert tree(cached) == (files, dirs)
    assert {name: (cached / name).stat().st_size for name in skeleton.sizes} == skeleton.sizes


def test_a_dry_run_cannot_tell_a_skeleton_file_cut_shorter_than_the_next_incremental_needs(
        chain: Chain, skeleton: Skeleton) -> None:
    """pg_combinebackup reads a whole file of an older member only up to its length and zero-fills the rest (its
    reconstruct.c: blocks below the truncation length that no member has are presumed never written), so a skeleton
    file cut short passes its dry run: the dry run checks incremental files' lengths, not a whole file's.
    Pinned here so the chain cache is not trusted for more than it gives."""
    incr3 = chain.incrementals[2]
    big = chain.files["big"]
    header = read_incremental(incr3 / incremental_name(big))
    assert 0 < len(header.blocks) < header.truncation_blocks, "incr3 needs the rest of big's blocks from the skeleton"
    assert skeleton.sizes[big] == header.truncation_blocks * BLCKSZ
    try:
        os.truncate(skeleton.directory / big, 0)
        assert dry_run(chain.pg_combinebackup, [skeleton.directory, incr3], chain.root) is None
    finally:
        os.truncate(skeleton.directory / big, skeleton.sizes[big])  # a hole again: the skeleton is shared
