"""A chain of incremental backups combined in place: the root full's files, where they already lie, brought to the
newest member's state by writing only the blocks that changed.

``pg_combinebackup`` writes a new data directory: every file with one changed block is written whole (on 1 GB with
2 % of the pages changed a day, every relation file: a restore from a full and six incrementals wrote the cluster
twice and took 2.1-2.4x a full's). A restore has the full's files on disk anyway, so this module writes into them
what the newest member says each file is, as pgBackRest's delta restore does: the cost of a chain is the changed
blocks, not a second copy. The result is, file for file, what ``pg_combinebackup`` writes (the tests compare them
byte for byte on chains with updates, extensions, truncations, dropped and new relations and databases):

* every file of the newest member; an ``INCREMENTAL.<name>`` in ``base/``, ``global/`` or ``pg_tblspc/``
  reconstructed: its blocks from the newest member that has them, the others (below its truncation length) from
  the nearest older member holding the file whole, zero where none has them; its length the truncation length or
  past its last block; any other file as the newest member has it;
* nothing else (a file of an older member that the newest one lacks was dropped), and ``backup_label`` without the
  ``INCREMENTAL FROM`` lines (the server refuses to start from a label that has them).

``pg_combinebackup --dry-run`` (``dry_run``) is run first over the same directories: the reference tool checks the
chain's links (each member's ``INCREMENTAL FROM`` is its parent's start, one system identifier, every incremental
file it reads well formed and long enough for the blocks it names; a whole file shorter than the blocks needed from
it passes, as pg_combinebackup fills those blocks with zeros), and only then is anything written. The formats read
here are PostgreSQL's ``INCREMENTAL.`` header (basebackup_incremental.h) and ``backup_label``.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from backup_tasks.errors import BackupCorrupt, StorageError
from backup_tasks.physical.unpack import local_error, local_os_error

BLCKSZ = 8192
#: Blocks in one relation segment file (1 GB): no header may claim more.
RELSEG_SIZE = 131072
INCREMENTAL_MAGIC = 0xD3AE1F0D
#: The size of an incremental file that holds no block: its magic, block count and truncation length.
EMPTY_HEADER = 12
PREFIX = "INCREMENTAL."
#: Written by each backup's own process, never combined: pg_combinebackup skips them at the top level too.
LABEL, MANIFEST = "backup_label", "backup_manifest"
#: Lines of an incremental's backup_label that name its parent; a combined directory has none.
INCREMENTAL_LINE = re.compile(rb"^INCREMENTAL FROM (LSN|TLI): ")


@dataclass(frozen=True)
class IncrementalFile:
    """The header of one ``INCREMENTAL.`` file: the blocks it holds (in file order) and the truncation length."""

    path: Path
    blocks: array  # uint32 block numbers, the i-th stored at header_length + i * BLCKSZ
    truncation_blocks: int
    header_length: int

    @property
    def reconstructed_blocks(self) -> int:
        """The combined file's length in blocks: the truncation length, or past the highest block held."""
        return max(self.truncation_blocks, max(self.blocks) + 1 if self.blocks else 0)


def read_incremental(path: Path) -> IncrementalFile:
    """Parse and check an ``INCREMENTAL.`` file's header (``BackupCorrupt`` naming the file when it is not one)."""
    with open(path, "rb") as source:
        head = source.read(12)
        if len(head) < 12:
            raise BackupCorrupt(f"{path} is too short to be an incremental file ({len(head)} bytes)")
        words = array("I", head)
        if sys.byteorder != "little":
            words.byteswap()
        magic, count, truncation = words
        if magic != INCREMENTAL_MAGIC:
            raise BackupCorrupt(f"{path} has a bad incremental magic number (0x{magic:x}, not 0x{INCREMENTAL_MAGIC:x})")
        if count > RELSEG_SIZE or truncation > RELSEG_SIZE:
            raise BackupCorrupt(f"{path} claims {count} blocks and a truncation length of {truncation} blocks "
                                f"(a segment holds {RELSEG_SIZE})")
        blocks = array("I")
        blocks.frombytes(source.read(4 * count))
        if len(blocks) != count:
            raise BackupCorrupt(f"{path} ends inside its list of {count} block numbers")
        if sys.byteorder != "little":
            blocks.byteswap()
        size = os.fstat(source.fileno()).st_size
    header = 12 + 4 * count
    if count:
        header += -header % BLCKSZ  # the blocks are aligned to BLCKSZ
    if size != header + count * BLCKSZ:
        raise BackupCorrupt(f"{path} is {size} bytes; its header says {header + count * BLCKSZ}")
    return IncrementalFile(path, blocks, truncation, header)


@dataclass(frozen=True)
class Combined:
    """What a combination wrote: files reconstructed, blocks written from the incrementals, files removed."""

    reconstructed: int
    blocks_written: int
    replaced: int
    removed: int


def combine_in_place(target: Path, incrementals: Sequence[Path], *, data: bool = True) -> Combined:
    """Bring ``target`` (the root full's files) to the state of the newest of ``incrementals`` (oldest first).

    Consumes the newest member's whole files (moved into ``target``). ``data=False`` sets every reconstructed
    file's length but writes no block: the chain cache's skeleton (``sparse_skeleton``), for ``dry_run`` only.
    A failure leaves ``target`` partly combined: callers empty it (a restore) or drop it (the cache).
    """
    newest = incrementals[-1]
    members = [str(member) for member in [target, *incrementals]]  # paths as text: ~25 joins a file, in a hot loop
    wanted_files: set[str] = set()
    wanted_dirs: set[str] = set()
    reconstructed = blocks_written = replaced = 0
    try:
        for relative, is_dir in _walk(newest):
            if is_dir:
                wanted_dirs.add(relative)
                (target / relative).mkdir(mode=0o700, exist_ok=True)
                continue
            folder, _, name = relative.rpartition("/")
            if name.startswith(PREFIX) and _holds_relations(folder):
                output = f"{folder}/{name[len(PREFIX):]}"
                wanted_files.add(output)
                blocks_written += _reconstruct(members, folder, name[len(PREFIX):], data=data)
                reconstructed += 1
            elif relative not in (LABEL, MANIFEST):
                wanted_files.add(relative)
                _move(newest / relative, target / relative)
                replaced += 1
        _write_label(newest / LABEL, target / LABEL)
        removed = _remove_others(target, wanted_files | {LABEL}, wanted_dirs)
    except OSError as exc:
        raise local_os_error(exc, doing=f"combining the chain into {target}") from exc
    return Combined(reconstructed, blocks_written, replaced, removed)


def _holds_relations(folder: str) -> bool:
    """Where incremental files can be (pg_combinebackup's rule): base/<db>, global, in-place tablespaces."""
    return folder.startswith("base/") or folder == "global" or folder.startswith("pg_tblspc/")


def _walk(root: Path, relative: str = "") -> Iterator[tuple[str, bool]]:
    """Every directory and regular file under ``root``, as (path relative to root, is a directory); parents first."""
    with os.scandir(root / relative if relative else root) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            path = f"{relative}/{entry.name}" if relative else entry.name
            if entry.is_dir(follow_symlinks=False):
                yield path, True
                yield from _walk(root, path)
            elif entry.is_file(follow_symlinks=False):
                yield path, False


def _reconstruct(members: Sequence[str], folder: str, name: str, *, data: bool) -> int:
    """One file reconstructed in ``members[0]`` (the target; then the incrementals, oldest first); the number of
    blocks written from incremental files."""
    target, newest = members[0], members[-1]
    latest = read_incremental(Path(f"{newest}/{folder}/{PREFIX}{name}"))
    truncation = latest.truncation_blocks
    # block -> (incremental file, offset of the block in it); the newest member's blocks first.
    sources: dict[int, tuple[IncrementalFile, int]] = {
        block: (latest, latest.header_length + i * BLCKSZ) for i, block in enumerate(latest.blocks)}
    base: str | None = None
    for member in [*reversed(members[1:-1]), target]:
        whole = f"{member}/{folder}/{name}"
        if os.path.isfile(whole):
            base = whole
            break
        older_path = f"{member}/{folder}/{PREFIX}{name}"
        try:
            older_size = os.stat(older_path).st_size if member != target else -1
        except FileNotFoundError:
            older_size = -1
        if older_size < 0:
            raise BackupCorrupt(f"{folder}/{name} of {os.path.basename(newest)} needs blocks from "
                                f"{os.path.basename(member)}, which has neither that file nor an incremental of it: "
                                f"the chain is broken")
        if older_size == EMPTY_HEADER:
            continue  # no blocks (most files on most days): nothing to read (the dry run checked its magic)
        older = read_incremental(Path(older_path))
        for i, block in enumerate(older.blocks):
            if block < truncation and block not in sources:
                sources[block] = (older, older.header_length + i * BLCKSZ)
    assert base is not None
    output = f"{target}/{folder}/{name}"
    length = latest.reconstructed_blocks
    if base == output and not sources:
        size = os.stat(output).st_size
        if size == length * BLCKSZ and truncation * BLCKSZ >= size:
            return 0  # unchanged since the full: nothing to cut, extend or write
    if base != output:  # an older member holds the file whole: that copy is the base, not the root's
        Path(output).unlink(missing_ok=True)
        _copy_private(Path(base), Path(output))
    with open(output, "r+b") as out:
        fd = out.fileno()
        base_blocks = os.fstat(fd).st_size // BLCKSZ
        # Blocks at or past the truncation length come only from the newest member (else zero): cut the base there,
        # then extend to the combined length (a hole reads as zeros, as pg_combinebackup's written zeros).
        os.ftruncate(fd, min(truncation, base_blocks) * BLCKSZ)
        os.ftruncate(fd, length * BLCKSZ)
        if not data:
            return 0
        return _write_blocks(fd, sources)


def _write_blocks(fd: int, sources: dict[int, tuple[IncrementalFile, int]]) -> int:
    """Copy each block from its source into ``fd``; runs of consecutive blocks stored consecutively in one read."""
    handles: dict[Path, int] = {}
    try:
        run_start = run_offset = -1
        run_file: IncrementalFile | None = None
        run_length = 0
        for block in sorted(sources):
            source, offset = sources[block]
            if source is run_file and block == run_start + run_length and offset == run_offset + run_length * BLCKSZ:
                run_length += 1
                continue
            if run_file is not None:
                _copy_run(handles, run_file, run_offset, fd, run_start, run_length)
            run_file, run_start, run_offset, run_length = source, block, offset, 1
        if run_file is not None:
            _copy_run(handles, run_file, run_offset, fd, run_start, run_length)
    finally:
        for handle in handles.values():
            os.close(handle)
    return len(sources)


def _copy_run(handles: dict[Path, int], source: IncrementalFile, offset: int, fd: int, block: int, count: int) -> None:
    handle = handles.get(source.path)
    if handle is None:
        handle = handles[source.path] = os.open(source.path, os.O_RDONLY)
    data = os.pread(handle, count * BLCKSZ, offset)
    if len(data) != count * BLCKSZ:
        raise BackupCorrupt(f"{source.path} ends before block {block + len(data) // BLCKSZ} it holds")
    view = memoryview(data)
    written = 0
    while written < len(data):
        written += os.pwrite(fd, view[written:], block * BLCKSZ + written)


def _copy_private(source: Path, output: Path) -> None:
    """A copy only its owner may read (a data file of the database)."""
    with open(source, "rb") as reader, open(os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as w:
        shutil.copyfileobj(reader, w, 1 << 20)


def _move(source: Path, output: Path) -> None:
    """The newest member's own file into place (a rename: its directory is scratch, consumed)."""
    try:
        os.replace(source, output)
    except OSError as exc:
        if exc.errno != errno.EXDEV:  # another filesystem: copied instead
            raise
        output.unlink(missing_ok=True)
        _copy_private(source, output)


def _write_label(source: Path, output: Path) -> None:
    """The newest member's backup_label without its INCREMENTAL FROM lines."""
    lines = source.read_bytes().splitlines(keepends=True)
    if not lines:
        raise BackupCorrupt(f"{source} is empty")
    output.unlink(missing_ok=True)
    with open(os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as label:
        label.write(b"".join(line for line in lines if not INCREMENTAL_LINE.match(line)))


def _remove_others(target: Path, files: set[str], dirs: set[str]) -> int:
    """Remove from ``target`` what the newest member does not have (dropped relations, older WAL); a count."""
    removed = 0
    for relative, is_dir in sorted(_walk(target), key=lambda item: item[0].count("/"), reverse=True):
        if relative in (files if not is_dir else dirs):
            continue
        path = target / relative
        if is_dir:
            shutil.rmtree(path)
        else:
            path.unlink()
        removed += 1
    return removed


#: What a skeleton keeps besides the relation directories: what pg_combinebackup reads of every member.
SKELETON_FILES = (LABEL, "global/pg_control")


def sparse_skeleton(directory: Path) -> None:
    """Make a combined directory the chain cache's skeleton: each file under ``base/``, ``global/`` and
    ``pg_tblspc/`` kept at its length with no data (a hole), ``backup_label`` and ``global/pg_control`` kept whole,
    everything else removed. ``dry_run`` reads no more of an older member (lengths, incremental headers, the label,
    the control file's system identifier), so the skeleton serves it as the whole directory would, taking no space
    and keeping none of the database's contents."""
    for relative, is_dir in list(_walk(directory)):
        if "/" not in relative and not _holds_relations(f"{relative}/") and relative not in ("global", LABEL):
            path = directory / relative
            shutil.rmtree(path) if is_dir else path.unlink()
        elif not is_dir and relative not in SKELETON_FILES and _holds_relations(relative.rpartition("/")[0]):
            path = directory / relative
            size = path.stat().st_size
            os.truncate(path, 0)
            os.truncate(path, size)


def dry_run(pg_combinebackup: Path, directories: Sequence[Path], scratch: Path) -> str | None:
    """``pg_combinebackup --dry-run`` over ``directories`` (root first): None when it would combine them, else its
    first complaints. Writes nothing (``scratch`` only names an output directory it never creates)."""
    argv = [str(pg_combinebackup), "--dry-run", "--no-manifest", "-o", str(scratch / "dry-run-output"),
            *map(str, directories)]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, check=False, cwd="/")
    except OSError as exc:
        raise StorageError(f"pg_combinebackup could not be run ({exc})") from exc
    if result.returncode == 0:
        return None
    # Warnings about a member without backup_manifest (the cache's skeleton, a restore's root) are not complaints.
    problems = [ln for ln in result.stderr.splitlines() if ln.strip() and "warning" not in ln]
    text = "; ".join(problems[:5]) or f"exit status {result.returncode}"
    if any(marker in text for marker in ("No space left", "Disk quota")):
        raise local_error(text, full=True, doing="checking the chain", intact="the backup is not at fault")
    return text
