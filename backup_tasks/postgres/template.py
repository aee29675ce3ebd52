"""A cache of initdb's output, so a throwaway cluster is a verified copy rather than a fresh initdb.

Keyed by the binaries (path, size, mtime), the initdb options and the locale environment; entries
are built privately and published with one rename, every byte is hashed against the entry's
manifest when copied out, and a damaged entry is set aside and rebuilt: a cache problem never
fails the cluster that asked (it runs initdb instead).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import time
import uuid
from pathlib import Path

from backup_tasks.postgres.leftovers import OWNER_FILE, owned_tempdir, sweep

log = logging.getLogger(__name__)


#: Where ``default_template_cache`` puts the initdb template cache; "off" disables it.
TEMPLATE_CACHE_ENV = "BACKUP_TASKS_INITDB_CACHE"
#: Environment that changes what initdb writes (locale, encoding defaults, timezone): part of the key.
INITDB_ENV = ("LANG", "LANGUAGE", "LC_ALL", "LC_COLLATE", "LC_CTYPE", "LC_MESSAGES", "LC_MONETARY",
              "LC_NUMERIC", "LC_TIME", "TZ", "PGTZ")
#: Bumped when the layout of an entry changes, so old entries are simply never looked up again.
TEMPLATE_FORMAT = 1
MANIFEST_NAME = "template.json"
HASH_CHUNK = 1 << 20
#: An entry not copied out for this long is removed when another is stored (binaries were upgraded).
UNUSED_SECONDS = 14 * 86400
#: At most this many entries (about 40 MB each) are kept; the least recently used go first.
MAX_ENTRIES = 4


def default_template_cache() -> Path | None:
    """``$BACKUP_TASKS_INITDB_CACHE``, or a per-user directory under TMPDIR; None when set to "off"."""
    value = os.environ.get(TEMPLATE_CACHE_ENV, "").strip()
    if value.lower() in ("off", "0", "no", "false", "none"):
        return None
    return Path(value) if value else Path(tempfile.gettempdir()) / f"backup-tasks-initdb-cache-{os.geteuid()}"


class TemplateError(Exception):
    """A cache entry that cannot be used (missing, partial, damaged): the caller runs initdb instead."""


class TemplateCache:
    """Fresh initdb output, kept once per (binaries, initdb options, environment) and copied per cluster.

    Layout: ``root/<key>/data`` (the data directory as initdb left it, never started) and
    ``root/<key>/template.json`` (every directory and file with its mode, size and sha256).

    * An entry is built in a private ``root/.build-<random>`` and published with one ``rename``: a
      reader sees a complete entry or none. A build killed half-way leaves only its ``.build-``
      directory (an ``owned_tempdir``), which the next use of the cache removes once its builder
      is dead (``leftovers.sweep``). Two verifies that miss at once both build; the second
      ``rename`` fails and that build is thrown away.
    * A reader copies file by file, hashing what it reads; any difference from ``template.json``
      (a truncated, edited or missing file, an extra one) or any error makes the copy fail with
      ``TemplateError``. The cluster then runs initdb as before and replaces the entry: renamed
      aside first (atomic, so a concurrent reader's copy fails cleanly and falls back too), then
      deleted. An entry is never modified in place.
    * An entry's mtime is its last use (set after each good copy). Storing an entry removes, the same
      way (rename aside, delete), those unused for ``UNUSED_SECONDS`` and the least recently used
      beyond ``MAX_ENTRIES``: upgraded binaries leave their old entries behind only for a while.
    * The root must be a real directory owned by us and closed to group and others, or it is not
      used: a template is the system catalog of every verify's server.

    The key covers the binaries (path, size, mtime: a package upgrade changes them), the initdb
    options and the environment initdb reads (locale, timezone), not files the options name.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def key(self, initdb: Path, argv: list[str]) -> str:
        postgres = initdb.parent / "postgres"
        facts = {"format": TEMPLATE_FORMAT, "initdb": str(initdb.resolve()), "argv": argv, "euid": os.geteuid(),
                 "binaries": [_file_fingerprint(initdb), _file_fingerprint(postgres)],
                 "env": {name: os.environ.get(name) for name in INITDB_ENV}}
        return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:24]

    def usable_root(self) -> bool:
        """Create the root (0700) when missing; refuse one that anybody else could have planted or edit."""
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = os.lstat(self.root)
        except OSError as exc:
            log.warning("initdb template cache %s unusable (%s): running initdb", self.root, exc)
            return False
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
            log.warning("initdb template cache %s is not a private directory of ours: not using it", self.root)
            return False
        return True

    def fill(self, key: str, dest: Path) -> None:
        """Copy entry ``key`` into ``dest`` (must not exist), checking every byte; ``TemplateError`` otherwise."""
        self.clear_abandoned()
        entry = self.root / key
        try:
            manifest = json.loads((entry / MANIFEST_NAME).read_text())
            dirs: dict[str, int] = manifest["dirs"]
            files: dict[str, list] = manifest["files"]
        except FileNotFoundError:
            # A directory without its manifest is a partial entry (a copy someone made by hand, a
            # disk that lost the file): it must go, or no build could ever publish under its name.
            raise TemplateError("partial entry: no manifest" if entry.exists() else "no entry") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise TemplateError(f"unreadable manifest: {exc}") from None
        source = entry / "data"
        try:
            seen = _walk(source)
            if seen != (set(dirs), set(files)):
                raise TemplateError("the entry's files differ from its manifest")
            for rel in sorted(dirs, key=len):  # parents first
                os.mkdir(dest / rel if rel else dest, dirs[rel])
            for rel, (mode, size, digest) in files.items():
                if _copy_hashed(source / rel, dest / rel, mode) != (size, digest):
                    raise TemplateError(f"{rel} differs from the manifest")
        except OSError as exc:  # e.g. the entry renamed aside by a concurrent reader mid-copy
            raise TemplateError(str(exc)) from None
        with contextlib.suppress(OSError):
            os.utime(entry)  # last used now: kept by the expiry in ``store``

    def store(self, key: str, data_dir: Path) -> None:
        """Publish a copy of ``data_dir`` (fresh initdb output, never started) as entry ``key``."""
        self.clear_abandoned()
        build: Path | None = None
        published = False
        try:
            build = owned_tempdir(".build-", self.root)  # 0700, and says whose it is
            dirs, files = _walk(data_dir)
            manifest: dict[str, dict] = {"dirs": {}, "files": {}}
            for rel in sorted(dirs, key=len):
                mode = stat.S_IMODE(os.lstat(data_dir / rel).st_mode)
                os.mkdir(build / "data" / rel if rel else build / "data", mode)
                manifest["dirs"][rel] = mode
            for rel in files:
                mode = stat.S_IMODE(os.lstat(data_dir / rel).st_mode)
                size, digest = _copy_hashed(data_dir / rel, build / "data" / rel, mode)
                manifest["files"][rel] = [mode, size, digest]
            (build / MANIFEST_NAME).write_text(json.dumps(manifest))
            (build / OWNER_FILE).unlink()  # not part of the entry (a build killed from here on: judged by its name)
            os.rename(build, self.root / key)  # atomic; fails when a concurrent build published first
            published = True
        except OSError as exc:
            log.debug("initdb template not stored: %s", exc)
        finally:
            if not published and build is not None:
                shutil.rmtree(build, ignore_errors=True)
        self._expire_entries(keep=key)

    def _expire_entries(self, *, keep: str) -> None:
        try:
            entries = sorted(((path.lstat().st_mtime, path.name) for path in self.root.iterdir()
                              if not path.name.startswith(".") and path.name != keep), reverse=True)
        except OSError:
            return
        now = time.time()
        for rank, (used, name) in enumerate(entries, start=2):  # the kept entry is the first
            if rank > MAX_ENTRIES or now - used > UNUSED_SECONDS:
                self.discard(name)

    def discard(self, key: str) -> None:
        """Take a bad entry out of use: rename it aside (atomic), then delete it."""
        aside = self.root / f".bad-{uuid.uuid4().hex}.{os.getpid()}"  # a discard killed half-way: see clear_abandoned
        try:
            os.rename(self.root / key, aside)
        except OSError:
            return  # already gone (another reader discarded it)
        shutil.rmtree(aside, ignore_errors=True)

    def clear_abandoned(self) -> None:
        """Remove what killed runs left: builds and entries set aside, whose process is gone (``leftovers``)."""
        sweep(self.root, ".build-")
        sweep(self.root, ".bad-")


def _file_fingerprint(path: Path) -> list[object]:
    try:
        info = path.stat()
    except OSError:
        return [str(path), None]
    return [str(path), info.st_size, info.st_mtime_ns]


def _walk(root: Path) -> tuple[set[str], set[str]]:
    """Relative directories ("" is the root) and regular files under ``root``; anything else is an error."""
    dirs, files = {""}, set()
    for top, subdirs, names in os.walk(root, onerror=_raise):
        rel_top = os.path.relpath(top, root)
        for name in [*subdirs, *names]:
            path = os.path.join(top, name)
            rel = name if rel_top == "." else os.path.join(rel_top, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISDIR(mode):
                dirs.add(rel)
            elif stat.S_ISREG(mode):
                files.add(rel)
            else:  # a symlink (initdb -X) or stranger: not something we copy faithfully
                raise OSError(f"{rel} is not a regular file or directory")
    return dirs, files


def _raise(exc: OSError) -> None:
    raise exc


def _copy_hashed(source: Path, dest: Path, mode: int) -> tuple[int, str]:
    """Copy one file (dest created exclusively, with ``mode``); return the size and sha256 of what was read."""
    digest = hashlib.sha256()
    size = 0
    with open(source, "rb") as src, open(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as out:
        while chunk := src.read(HASH_CHUNK):
            digest.update(chunk)
            out.write(chunk)
            size += len(chunk)
    return size, digest.hexdigest()
