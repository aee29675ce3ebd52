"""Streaming compression codecs: zstd (default) and gzip, behind one tiny interface."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import BinaryIO, Protocol

import zstandard

from backup_tasks.errors import BackupCorrupt, ConfigError

CHUNK = 1 << 20


SUFFIX = {"zstd": ".zst", "gzip": ".gz"}


#: zstd 2: on a 2-core box the compressor shares the CPU with the server's COPY, so its cost decides
#: the dump time; level 2 costs ~1.8 s of CPU per 866 MiB archive (level 3: 2.7, level 4: 3.3) and is
#: still no larger than gzip -6 on generic text (20% smaller on trading data). bench/experiments.py.
DEFAULT_LEVEL = {"zstd": 2, "gzip": 6}


class Compressor(Protocol):
    def compress(self, data: bytes) -> bytes: ...
    def flush(self) -> bytes: ...


def compressor(name: str, level: int | None = None, threads: int = 0) -> Compressor:
    level = DEFAULT_LEVEL[name] if level is None else level
    if name == "zstd":
        # threads > 0 hands compression to zstd's worker threads (they run without the GIL), so the
        # Python loop only shuffles buffers; write_checksum adds zstd's own per-frame integrity check.
        params = zstandard.ZstdCompressionParameters.from_level(level, threads=threads, write_checksum=True)
        return zstandard.ZstdCompressor(compression_params=params).compressobj()
    if name == "gzip":
        return zlib.compressobj(level, zlib.DEFLATED, 31)
    raise ConfigError(f"unknown compression {name!r}")


def decompressed_chunks(source: BinaryIO, name: str, *, what: str) -> Iterator[bytes]:
    """Yield the decompressed content of ``source``; damage raises ``BackupCorrupt`` naming ``what``."""
    if name == "zstd":
        dctx = zstandard.ZstdDecompressor()
        try:
            reader = dctx.stream_reader(source, read_size=CHUNK, read_across_frames=True)
            while chunk := reader.read(CHUNK):
                yield chunk
        except zstandard.ZstdError as exc:
            raise BackupCorrupt(f"{what} cannot be decompressed: {exc}") from None
        return
    if name == "gzip":
        dobj = zlib.decompressobj(31)
        try:
            while chunk := source.read(CHUNK):
                out = dobj.decompress(chunk)
                if out:
                    yield out
            tail = dobj.flush()
        except zlib.error as exc:
            raise BackupCorrupt(f"{what} cannot be decompressed: {exc}") from None
        if tail:
            yield tail
        if not dobj.eof:
            raise BackupCorrupt(f"{what} is truncated: the gzip stream ends early")
        return
    raise ConfigError(f"unknown compression {name!r}")
