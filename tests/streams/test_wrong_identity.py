"""age's "no matching keys" is detected in one place (streams.crypto) and means the same everywhere:
``IdentityUnusable`` for a wrong identity file, ``BackupCorrupt`` (``WalCorrupt`` for WAL) for damage."""

from __future__ import annotations

from pathlib import Path

import pyrage
import pytest

from backup_tasks.errors import BackupCorrupt, IdentityUnusable, WalCorrupt
from backup_tasks.streams.crypto import decrypt_bytes, is_wrong_identity, load_identities
from backup_tasks.wal.archive import WalArchive
from backup_tasks.wal.objects import TRAILER_SIZE
from tests.support.crypto import write_identity_file

SEGMENT = "000000010000000000000003"


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, str, Path, str]:
    right, wrong = tmp_path / "right.key", tmp_path / "wrong.key"
    return right, write_identity_file(right), wrong, write_identity_file(wrong)


def encrypted(data: bytes, public: str) -> bytes:
    return bytes(pyrage.encrypt(data, [pyrage.x25519.Recipient.from_str(public)]))


def test_decrypt_bytes_round_trips_and_names_a_wrong_identity(keys: tuple[Path, str, Path, str]) -> None:
    right, public, wrong, wrong_public = keys
    data = encrypted(b"wal bytes" * 100, public)
    assert decrypt_bytes(data, load_identities(right), what="x") == b"wal bytes" * 100
    with pytest.raises(IdentityUnusable) as raised:
        decrypt_bytes(data, load_identities(wrong), what="archived 0001", recipients=(public,))
    message = str(raised.value)
    assert "wrong identity" in message and str(wrong) in message and wrong_public in message
    assert "AGE-SECRET-KEY" not in message


def test_is_wrong_identity_tells_a_wrong_key_from_damage(keys: tuple[Path, str, Path, str]) -> None:
    right, public, wrong, _ = keys
    data = encrypted(b"x" * 1000, public)
    with pytest.raises(pyrage.DecryptError) as wrong_key:
        pyrage.decrypt(data, list(load_identities(wrong).keys))
    assert is_wrong_identity(wrong_key.value)
    damaged = data[:-10] + bytes(b ^ 0xFF for b in data[-10:])
    with pytest.raises(pyrage.DecryptError) as flipped:
        pyrage.decrypt(damaged, list(load_identities(right).keys))
    assert not is_wrong_identity(flipped.value)
    assert not is_wrong_identity(ValueError("No matching keys"))
    with pytest.raises(WalCorrupt, match="damaged"):
        decrypt_bytes(damaged, load_identities(right), what="archived x", damaged=WalCorrupt)


def test_an_identity_among_the_recipients_that_unwraps_nothing_is_damage(keys: tuple[Path, str, Path, str]) -> None:
    _, public, wrong, wrong_public = keys
    data = encrypted(b"x" * 1000, public)
    with pytest.raises(BackupCorrupt, match="age header is damaged"):  # the manifest says wrong.key should work
        decrypt_bytes(data, load_identities(wrong), what="backup b", recipients=(wrong_public,))


def test_wal_fetch_with_the_wrong_identity_and_with_damage(keys: tuple[Path, str, Path, str], tmp_path: Path) -> None:
    right, public, wrong, wrong_public = keys
    source = tmp_path / "pg_wal" / SEGMENT
    source.parent.mkdir()
    source.write_bytes(b"wal-like bytes " * 10000)
    writer = WalArchive.in_directory(tmp_path / "wal", recipients=(public,))
    writer.ensure()
    writer.push(source)
    with pytest.raises(IdentityUnusable) as raised:
        WalArchive.in_directory(tmp_path / "wal", identity_file=wrong).fetch(SEGMENT, tmp_path / "out")
    assert "wrong identity" in str(raised.value) and wrong_public in str(raised.value)
    assert SEGMENT in str(raised.value) and not (tmp_path / "out").exists()
    reader = WalArchive.in_directory(tmp_path / "wal", identity_file=right)
    assert reader.fetch(SEGMENT, tmp_path / "out") == source.stat().st_size
    stored = reader.path_for(SEGMENT)
    content = bytearray(stored.read_bytes())
    content[-TRAILER_SIZE - 20] ^= 0xFF  # in the last age chunk, just before the checksum trailer
    stored.chmod(0o600)
    stored.write_bytes(bytes(content))
    with pytest.raises(WalCorrupt, match="damaged: age authentication failed") as damaged:
        reader.fetch(SEGMENT, tmp_path / "out2")
    assert "\n" not in str(damaged.value)
