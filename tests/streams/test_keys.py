"""age keys: recipients (BACKUP_ENCRYPT_RECIPIENT), identity files, what ``check`` reports; no secret ever echoed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pyrage
import pytest

from backup_tasks.errors import ConfigError, IdentityUnusable
from backup_tasks.settings import Settings
from backup_tasks.streams import crypto, keys
from backup_tasks.streams.keys import (
    encryption_info,
    key_status,
    load_identities,
    manifest_recipients,
    parse_recipients,
)
from tests.support.crypto import write_identity_file
from tests.support.paths import BACKUP_TASKS

AGE_KEYGEN = shutil.which("age-keygen")


@pytest.fixture
def keypair(tmp_path: Path) -> tuple[Path, str]:
    return tmp_path / "backup.key", write_identity_file(tmp_path / "backup.key")


def test_recipients_are_parsed_deduplicated_and_validated(keypair: tuple[Path, str]) -> None:
    _, public = keypair
    other = str(pyrage.x25519.Identity.generate().to_public())
    assert parse_recipients(f" {public} ,{other},, {public}") == (public, other)
    assert Settings.from_env({"BACKUP_ENCRYPT_RECIPIENT": f"{public},{other}"}).encrypt_recipients == (public, other)
    assert Settings.from_env({}).encrypt_recipients == ()
    assert encryption_info([public]) == {"format": "age", "recipients": [public]}
    assert encryption_info([]) is None
    assert manifest_recipients(encryption_info([public])) == (public,)


@pytest.mark.parametrize("raw", ["age1notakey", "ssh-ed25519 AAAA", "  ,  ", "age1" + "q" * 58])
def test_malformed_recipients_are_configuration_errors(raw: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({"BACKUP_ENCRYPT_RECIPIENT": raw})
    assert raised.value.exit_code == 2
    assert "BACKUP_ENCRYPT_RECIPIENT" in str(raised.value)


def test_a_pasted_secret_key_is_refused_and_never_echoed() -> None:
    secret = str(pyrage.x25519.Identity.generate())
    with pytest.raises(ConfigError) as raised:
        parse_recipients(f"{secret}")
    assert secret not in str(raised.value) and "secret key" in str(raised.value)


def test_cli_exits_2_on_a_malformed_recipient_before_doing_anything(tmp_path: Path) -> None:
    env = {**os.environ, "BACKUP_DIR": str(tmp_path / "b"), "BACKUP_ENCRYPT_RECIPIENT": "age1broken"}
    done = subprocess.run([BACKUP_TASKS, "list", "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert json.loads(done.stdout)["error_type"] == "ConfigError"
    assert not (tmp_path / "b").exists()


def test_identity_files_in_age_keygen_format(tmp_path: Path, keypair: tuple[Path, str]) -> None:
    path, public = keypair
    identities = load_identities(path)
    assert identities.public_keys == (public,) and identities.matches([public, "age1other"])
    secret_line = path.read_text().splitlines()[-1]
    assert secret_line not in repr(identities)
    if AGE_KEYGEN:  # the real tool's output, header comments and all
        made = tmp_path / "keygen.txt"
        subprocess.run([AGE_KEYGEN, "-o", str(made)], check=True, capture_output=True)
        printed = subprocess.run([AGE_KEYGEN, "-y", str(made)], check=True, capture_output=True, text=True).stdout
        assert load_identities(made).public_keys == (printed.strip(),)
    two = tmp_path / "two.txt"
    two.write_text(f"\n# old key\n{secret_line}\n\n# new key\n{pyrage.x25519.Identity.generate()}\n")
    assert len(load_identities(two).keys) == 2


def test_unusable_identity_files_say_why_without_echoing_secrets(tmp_path: Path, keypair: tuple[Path, str]) -> None:
    path, _ = keypair
    with pytest.raises(IdentityUnusable, match="BACKUP_DECRYPT_IDENTITY_FILE is not set"):
        load_identities(None)
    with pytest.raises(IdentityUnusable, match="does not exist"):
        load_identities(tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n")
    with pytest.raises(IdentityUnusable, match="holds no age secret key"):
        load_identities(empty)
    broken = tmp_path / "broken.txt"
    damaged = path.read_text().splitlines()[-1][:-6] + "QQQQQQ"
    broken.write_text(f"# comment\n{damaged}\n")
    with pytest.raises(IdentityUnusable, match="line 2") as raised:
        load_identities(broken)
    assert damaged not in str(raised.value)


def test_key_status_for_check(tmp_path: Path, keypair: tuple[Path, str]) -> None:
    path, public = keypair
    writer_only = key_status([public], None)
    assert writer_only.ok and writer_only.encrypting and "not set" in writer_only.warnings[0]
    full = key_status([public], path)
    assert full.ok and full.identity_matches_recipients and full.identity_public_keys == [public]
    assert full.warnings == []
    other = str(pyrage.x25519.Identity.generate().to_public())
    mismatch = key_status([other], path)
    assert not mismatch.ok and "none of the secret keys" in mismatch.problems[0]
    path.chmod(0o644)
    assert "chmod 600" in key_status([public], path).warnings[0]
    missing = key_status([public], tmp_path / "gone.key")
    assert not missing.ok and "does not exist" in missing.problems[0]
    assert key_status([], None).ok and not key_status([], None).encrypting
    secret = path.read_text().splitlines()[-1]
    assert secret not in repr(full) and secret not in repr(mismatch)


def test_the_key_names_stay_importable_from_streams_crypto() -> None:
    """settings, the CLI, catalog, restore and wal.archive import them from there."""
    for name in ("FORMAT", "IDENTITY_SETTING", "RECIPIENT_SETTING", "Identities", "KeyStatus", "encryption_info",
                 "key_status", "load_identities", "manifest_recipients", "parse_recipients", "wrong_identity_error"):
        assert getattr(crypto, name) is getattr(keys, name), name
