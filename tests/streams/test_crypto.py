"""age encryption at rest: streaming round trips, tampering, wrong keys, interop, memory (the keys: test_keys.py)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from backup_tasks.conninfo import ConnInfo
from backup_tasks.errors import BackupCorrupt, BucketMissing, IdentityUnusable
from backup_tasks.postgres.connect import connect
from backup_tasks.postgres.queries import count_rows
from backup_tasks.postgres.tools import find_tool, tool_env
from backup_tasks.storage.integrity import HashingWriter
from backup_tasks.storage.local import LocalStorage
from backup_tasks.storage.s3 import MIB, S3Options, S3Storage
from backup_tasks.streams.codec import compressor, decompressed_chunks
from backup_tasks.streams.crypto import AGE_MAGIC, EncryptingWriter, check_identity, open_decrypted
from backup_tasks.streams.keys import Identities, load_identities
from tests.support.crypto import write_identity_file
from tests.support.data import random_chunks
from tests.support.paths import ROOT
from tests.support.require import tool
from tests.support.s3 import S3Server


@pytest.fixture
def keypair(tmp_path: Path) -> tuple[Path, str]:
    return tmp_path / "backup.key", write_identity_file(tmp_path / "backup.key")


def encrypt_to(storage: LocalStorage, key: str, chunks: list[bytes] | object, recipients: list[str]) -> HashingWriter:
    stored = HashingWriter(storage.writer(key))
    writer = EncryptingWriter(stored, recipients)
    for chunk in chunks:  # type: ignore[attr-defined]
        writer.write(chunk)
    writer.commit()
    return stored


# --- streaming round trips ---------------------------------------------------------------------------

def test_round_trip_through_local_storage(tmp_path: Path, keypair: tuple[Path, str]) -> None:
    path, public = keypair
    storage = LocalStorage(tmp_path / "b")
    chunks = list(random_chunks(9 * MIB + 777, chunk=MIB + 3))
    stored = encrypt_to(storage, "x.dump.zst", chunks, [public])
    raw = (tmp_path / "b" / "x.dump.zst").read_bytes()
    # The manifest's view: sha256 and size of the ciphertext as stored.
    assert stored.bytes_written == len(raw) and stored.hexdigest() == hashlib.sha256(raw).hexdigest()
    assert raw.startswith(AGE_MAGIC) and chunks[0][:4096] not in raw
    assert (tmp_path / "b" / "x.dump.zst").stat().st_mode & 0o777 == 0o600
    with open_decrypted(storage.open("x.dump.zst"), load_identities(path), what="x.dump.zst",
                        recipients=[public]) as plain:
        assert hashlib.sha256(plain.read()).digest() == hashlib.sha256(b"".join(chunks)).digest()


def test_several_recipients_each_can_decrypt(tmp_path: Path) -> None:
    first, second = tmp_path / "a.key", tmp_path / "b.key"
    recipients = [write_identity_file(first), write_identity_file(second)]
    storage = LocalStorage(tmp_path / "b")
    encrypt_to(storage, "x", [b"hello ", b"world"], recipients)
    for path in (first, second):
        with open_decrypted(storage.open("x"), load_identities(path), what="x") as plain:
            assert plain.read() == b"hello world"


def test_empty_plaintext_round_trips(tmp_path: Path, keypair: tuple[Path, str]) -> None:
    path, public = keypair
    storage = LocalStorage(tmp_path / "b")
    encrypt_to(storage, "empty", [], [public])
    with open_decrypted(storage.open("empty"), load_identities(path), what="empty") as plain:
        assert plain.read() == b""


def test_interoperates_with_the_age_command_line_tool(tmp_path: Path, keypair: tuple[Path, str]) -> None:
    age = tool("age", "age")
    path, public = keypair
    storage = LocalStorage(tmp_path / "b")
    data = b"".join(random_chunks(3 * MIB))
    encrypt_to(storage, "ours.age", [data], [public])
    decrypted = subprocess.run([age, "--decrypt", "-i", str(path), str(tmp_path / "b" / "ours.age")],
                               check=True, capture_output=True).stdout
    assert decrypted == data
    theirs = subprocess.run([age, "-r", public], input=data, check=True, capture_output=True).stdout
    storage.put_bytes("theirs.age", theirs)
    with open_decrypted(storage.open("theirs.age"), load_identities(path), what="theirs.age") as plain:
        assert plain.read() == data


def test_round_trip_through_a_bucket(bucket_url: str, keypair: tuple[Path, str]) -> None:
    path, public = keypair
    storage = S3Storage.from_url(bucket_url, S3Options(part_size=5 * MIB))
    stored = HashingWriter(storage.writer("enc.dump.zst"))
    chunks = list(random_chunks(11 * MIB))
    with EncryptingWriter(stored, [public]) as writer:
        for chunk in chunks:
            writer.write(chunk)
        writer.commit()
    assert storage.size("enc.dump.zst") == stored.bytes_written
    assert storage.head("enc.dump.zst")["ETag"].strip('"').endswith("-3")  # type: ignore[index]
    with open_decrypted(storage.open("enc.dump.zst"), load_identities(path), what="enc.dump.zst") as plain:
        assert plain.read() == b"".join(chunks)


def test_a_storage_failure_surfaces_as_itself_and_leaves_nothing(s3_env: S3Server, keypair: tuple[Path, str]) -> None:
    _, public = keypair
    storage = S3Storage.from_url("s3://bt-test-no-such-bucket/x", S3Options(part_size=5 * MIB))
    writer = EncryptingWriter(HashingWriter(storage.writer("k")), [public])
    with pytest.raises(BucketMissing):
        for chunk in random_chunks(12 * MIB):
            writer.write(chunk)
        writer.commit()
    writer.abort()  # idempotent after a failure


def test_abort_midway_leaves_no_object(tmp_path: Path, keypair: tuple[Path, str]) -> None:
    _, public = keypair
    storage = LocalStorage(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt), EncryptingWriter(storage.writer("x"), [public]) as writer:
        for chunk in random_chunks(8 * MIB):
            writer.write(chunk)
        raise KeyboardInterrupt
    assert storage.list() == [] and list((tmp_path / "b").iterdir()) == []


# --- wrong keys and tampering ------------------------------------------------------------------------

@pytest.fixture
def encrypted(tmp_path: Path, keypair: tuple[Path, str]) -> tuple[LocalStorage, Identities, str, bytes]:
    path, public = keypair
    storage = LocalStorage(tmp_path / "b")
    data = b"".join(random_chunks(2 * MIB))
    encrypt_to(storage, "x.dump.zst", [data], [public])
    return storage, load_identities(path), public, data


def test_the_wrong_identity_is_refused_clearly(tmp_path: Path,
                                               encrypted: tuple[LocalStorage, Identities, str, bytes]) -> None:
    storage, _, public, _ = encrypted
    write_identity_file(tmp_path / "wrong.key")
    wrong = load_identities(tmp_path / "wrong.key")
    with pytest.raises(IdentityUnusable) as raised:
        check_identity(storage.open("x.dump.zst"), wrong, what="backup x", recipients=[public])
    message = str(raised.value)
    assert public in message and str(tmp_path / "wrong.key") in message and "wrong identity" in message
    with pytest.raises(IdentityUnusable), open_decrypted(storage.open("x.dump.zst"), wrong, what="x") as plain:
        plain.read()


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["payload", "header", "last byte"])
def test_a_flipped_byte_is_detected(encrypted: tuple[LocalStorage, Identities, str, bytes], where: str) -> None:
    storage, identities, public, _ = encrypted
    file = storage.root / "x.dump.zst"
    size = file.stat().st_size
    flip(file, {"payload": size // 2, "header": 40, "last byte": size - 1}[where])
    with pytest.raises(BackupCorrupt) as raised, \
            open_decrypted(storage.open("x.dump.zst"), identities, what="x.dump.zst", recipients=[public]) as plain:
        plain.read()
    assert "x.dump.zst" in str(raised.value)


def test_truncation_and_garbage_are_detected(encrypted: tuple[LocalStorage, Identities, str, bytes]) -> None:
    storage, identities, _, _ = encrypted
    file = storage.root / "x.dump.zst"
    whole = file.read_bytes()
    for damaged in (whole[: len(whole) - 100], whole[: len(whole) // 3], b"PGDMP not encrypted", b""):
        file.write_bytes(damaged)
        with pytest.raises(BackupCorrupt), open_decrypted(storage.open("x.dump.zst"), identities, what="x") as plain:
            plain.read()


# --- flat memory -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_memory_stays_flat_while_encrypting_and_decrypting_256_mib(tmp_path: Path, keypair: tuple[Path, str]) -> None:
    path, public = keypair
    script = textwrap.dedent(f"""
        import hashlib, resource, sys
        from pathlib import Path
        from backup_tasks.streams.crypto import EncryptingWriter, load_identities, open_decrypted
        from backup_tasks.storage.local import LocalStorage
        storage = LocalStorage(Path({str(tmp_path / "b")!r}))
        chunk = hashlib.sha256(b"x").digest() * 32768  # 1 MiB
        def peak():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        base = peak()
        writer = EncryptingWriter(storage.writer("big"), [{public!r}])
        for i in range(256):
            writer.write(chunk)
        writer.commit()
        after_encrypt = peak()
        n = 0
        with open_decrypted(storage.open("big"), load_identities({str(path)!r}), what="big") as plain:
            while data := plain.read(1 << 20):
                n += len(data)
        assert n == 256 << 20, n
        print(base, after_encrypt, peak())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr
    base, after_encrypt, after_decrypt = (int(v) for v in done.stdout.split())
    assert after_encrypt - base < 48, (base, after_encrypt)  # MiB: a 256 MiB stream, a few MiB held
    assert after_decrypt - base < 48, (base, after_decrypt)


# --- an encrypted dump, with the real tools -----------------------------------------------------------

@pytest.mark.slow
def test_encrypted_dump_restores_and_is_unreadable_without_the_key(
        tmp_path: Path, trading_db: ConnInfo, make_database: object, keypair: tuple[Path, str]) -> None:
    path, public = keypair
    with connect(trading_db) as conn:
        expected = count_rows(conn)
        major = int(conn.info.server_version) // 10000
    pg_dump = find_tool("pg_dump", min_major=major)
    pg_restore = find_tool("pg_restore", min_major=major)
    storage = LocalStorage(tmp_path / "b")
    # The pipeline dump.py runs, with the encryption stage: pg_dump | zstd | age | sha256 | storage.
    proc = subprocess.Popen([str(pg_dump.path), "--format=custom", "--compress=0", "--no-password"],
                            stdout=subprocess.PIPE, env=tool_env(trading_db))
    stored = HashingWriter(storage.writer("trading.dump.zst"))
    writer = EncryptingWriter(stored, [public])
    comp = compressor("zstd", threads=1)
    assert proc.stdout is not None
    while chunk := proc.stdout.read(MIB):
        writer.write(comp.compress(chunk))
    writer.write(comp.flush())
    assert proc.wait() == 0
    writer.commit()
    file = storage.root / "trading.dump.zst"
    assert stored.hexdigest() == hashlib.sha256(file.read_bytes()).hexdigest()

    # Without the key the stored object is no dump at all.
    listed = subprocess.run([str(pg_restore.path), "--list", str(file)], capture_output=True, text=True)
    assert listed.returncode != 0 and b"PGDMP" not in file.read_bytes()[:4096]

    # With it: a full restore, every row back.
    target = make_database()  # type: ignore[operator]
    restore = subprocess.Popen([str(pg_restore.path), "--exit-on-error", "--single-transaction", "--no-owner",
                                "-d", target.dbname], stdin=subprocess.PIPE, env=tool_env(target))
    assert restore.stdin is not None
    with open_decrypted(storage.open("trading.dump.zst"), load_identities(path), what="trading dump",
                        recipients=[public]) as plain:
        for data in decompressed_chunks(plain, "zstd", what="trading dump"):
            restore.stdin.write(data)
    restore.stdin.close()
    assert restore.wait() == 0
    with connect(target) as conn:
        assert count_rows(conn) == expected and sum(expected.values()) > 0
