"""The archived object of one WAL file: zstd-compressed (maybe age-encrypted), with a checksum trailer.

Every object is one zstd frame (with zstd's content checksum), age-encrypted when the archive has
recipients, followed by a zstd *skippable* frame, the trailer, that carries the sha256 and size of
the original file and the time the server completed it. ``zstd -d`` skips the trailer, so an
unencrypted archive stays readable without this tool; and the trailer stays readable without the
key, so a repeated push is recognized, and PITR coverage computed, by a machine holding only the
public key.

``stored_object`` builds one from a file; ``verified_chunks`` reads one back, decompressed and checked
against its trailer (``WalCorrupt`` otherwise). Nothing here knows where objects are kept.
"""

from __future__ import annotations

import hashlib
import io
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

import zstandard

from backup_tasks.errors import WalArchiveError, WalCorrupt

CHUNK = 1 << 20
DEFAULT_LEVEL = 1  # WAL compresses as well at level 1 as at 3, twice as fast (measured on trading WAL)
#: The first line of an age-encrypted file (as ``crypto.AGE_MAGIC``; not imported, to keep this module light).
AGE_MAGIC = b"age-encryption.org/v1\n"

# Trailer: a zstd skippable frame (magic 0x184D2A5B, then payload length) whose payload is our tag,
# the sha256 and size of the uncompressed file and its completion time (unix microseconds).
TRAILER_MAGIC = 0x184D2A5B
TRAILER_TAG = b"BTWAL001"
_PAYLOAD = struct.Struct("<8s32sQq")
_HEADER = struct.Struct("<II")
TRAILER_SIZE = _HEADER.size + _PAYLOAD.size


@dataclass(frozen=True)
class Trailer:
    sha256: str
    size: int
    completed_at: float  # unix time the file was last written by the server (segment completion)


def trailer_bytes(digest: bytes, size: int, completed_at: float) -> bytes:
    return _HEADER.pack(TRAILER_MAGIC, _PAYLOAD.size) + _PAYLOAD.pack(TRAILER_TAG, digest, size,
                                                                        int(completed_at * 1_000_000))


def parse_trailer(raw: bytes, what: str) -> Trailer:
    if len(raw) == TRAILER_SIZE:
        magic, length = _HEADER.unpack_from(raw)
        if magic == TRAILER_MAGIC and length == _PAYLOAD.size:
            tag, digest, size, micros = _PAYLOAD.unpack_from(raw, _HEADER.size)
            if tag == TRAILER_TAG:
                return Trailer(digest.hex(), size, micros / 1_000_000)
    raise WalCorrupt(f"{what} is damaged: its checksum trailer is missing (truncated, or not written by "
                     f"backup-tasks)")


def file_sha256(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


class StoredObject(NamedTuple):
    """The object to store for one WAL file, and what its trailer says."""

    data: bytes
    trailer: Trailer


def stored_object(source: Path, *, size: int, completed_at: float, level: int = DEFAULT_LEVEL,
                  recipients: tuple[str, ...] = ()) -> StoredObject:
    """``source`` compressed (encrypted to ``recipients``), then its trailer; ``size`` as stat saw it.

    One WAL file (16 MiB at most by default) is built in memory: the primary and its copy store the
    very same bytes. A file that changes size while it is read is refused (``WalArchiveError``).
    """
    # Compressed pieces joined once with the trailer: one copy of the object, not three (a BytesIO, its
    # getvalue and the concatenation cost 15-20 ms a 16 MiB segment, about 15 % of a push).
    pieces: list[bytes] = []
    digest, read = _compress_into(source, pieces.append, level, size)
    if recipients:
        import pyrage
        from pyrage import x25519

        pieces = [pyrage.encrypt(b"".join(pieces), [x25519.Recipient.from_str(r) for r in recipients])]
    tail = trailer_bytes(digest, read, completed_at)
    return StoredObject(b"".join([*pieces, tail]), parse_trailer(tail, str(source)))


def _compress_into(source: Path, out: Callable[[bytes], object], level: int, size_hint: int) -> tuple[bytes, int]:
    params = zstandard.ZstdCompressionParameters.from_level(level, write_checksum=True)
    compressor = zstandard.ZstdCompressor(compression_params=params).compressobj(size=size_hint)
    digest = hashlib.sha256()
    size = 0
    with open(source, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
            out(compressor.compress(chunk))
    if size != size_hint:
        raise WalArchiveError(f"{source} changed size while it was being archived ({size_hint} -> {size} bytes)")
    out(compressor.flush())
    return digest.digest(), size


def verified_chunks(fh: BinaryIO, total: int, name: str, digest: hashlib._Hash, *,
                    identity_file: str | Path | None = None) -> Iterator[bytes]:
    """Decompressed content of one archived object read from ``fh`` (seekable, ``total`` bytes), checked by its
    trailer as it goes: ``WalCorrupt`` unless size and sha256 match (``digest`` is updated with the content).

    An encrypted object is decrypted with ``identity_file`` (``IdentityUnusable`` without a usable one).
    """
    if total < TRAILER_SIZE:
        raise WalCorrupt(f"archived {name} is damaged: only {total} bytes")
    fh.seek(total - TRAILER_SIZE)
    trailer = parse_trailer(fh.read(TRAILER_SIZE), f"archived {name}")
    fh.seek(0)
    if fh.read(len(AGE_MAGIC)) == AGE_MAGIC:
        fh = _decrypted(fh, total, name, identity_file)
    fh.seek(0)
    size = 0
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(fh, read_size=CHUNK, read_across_frames=False)
        while chunk := reader.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
            yield chunk
    except zstandard.ZstdError as exc:
        raise WalCorrupt(f"archived {name} is damaged: {exc}") from None
    if size != trailer.size or digest.hexdigest() != trailer.sha256:
        raise WalCorrupt(f"archived {name} is damaged: it decompresses to {size} bytes with sha256 "
                         f"{digest.hexdigest()[:16]}…, but was archived as {trailer.size} bytes with sha256 "
                         f"{trailer.sha256[:16]}…")


def _decrypted(fh: BinaryIO, total: int, name: str, identity_file: str | Path | None) -> BinaryIO:
    """The zstd frame inside an age-encrypted archived file (small: one WAL file, decrypted in memory)."""
    from backup_tasks.streams.crypto import decrypt_bytes, load_identities

    identities = load_identities(identity_file, needed_for=f"the archived WAL file {name}")
    fh.seek(0)
    # A wrong identity is IdentityUnusable, damage WalCorrupt: decided in streams.crypto.
    return io.BytesIO(decrypt_bytes(fh.read(total - TRAILER_SIZE), identities, what=f"archived {name}",
                                    damaged=WalCorrupt))
