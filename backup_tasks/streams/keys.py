"""Who may read a backup: age public keys (recipients) and secret keys (identities), never a stream.

* ``parse_recipients`` validates ``BACKUP_ENCRYPT_RECIPIENT`` (settings calls it, so a bad key
  fails before anything runs); ``encryption_info``/``manifest_recipients`` write and read the
  manifest's ``encryption`` field.
* ``load_identities`` reads an ``age-keygen`` identity file into ``Identities``; every problem is
  an ``IdentityUnusable`` naming the file and line.
* ``wrong_identity_error`` is the error for "no key unwraps this": a wrong identity file, or a
  damaged header when the identity is one of the recipients the manifest names.
* ``key_status`` is what ``backup-tasks check`` reports about the keys.

Only public keys (``age1...``) are needed to write backups; the identity file is read only by
verify, restore and wal-fetch. No secret key ever reaches a message or a repr. pyrage is imported
only by the functions that need it. ``crypto`` re-exports these names for its callers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backup_tasks.errors import BackupCorrupt, BackupError, ConfigError, IdentityUnusable

#: The manifest's ``encryption.format``.
FORMAT = "age"

#: The settings named in messages: the public keys backups are written to, and the identity file that reads them.
RECIPIENT_SETTING = "BACKUP_ENCRYPT_RECIPIENT"
IDENTITY_SETTING = "BACKUP_DECRYPT_IDENTITY_FILE"


def parse_recipients(raw: str, *, setting: str = RECIPIENT_SETTING) -> tuple[str, ...]:
    """``"age1..., age1..."`` -> the distinct public keys in order; ``ConfigError`` (exit 2) when one is malformed.

    A malformed value is echoed only when it is plainly a public key attempt (``age1...``,
    shortened); anything else, in particular a pasted secret key, is never repeated.
    """
    from pyrage import RecipientError, x25519

    found: list[str] = []
    items = [item.strip() for item in raw.split(",")]
    for number, item in enumerate(items, start=1):
        if not item:
            continue
        where = f"{setting} (item {number} of {len(items)})" if len(items) > 1 else setting
        if item.upper().startswith("AGE-SECRET-KEY-"):
            raise ConfigError(f"{where} holds a secret key; put the public key there instead (`age-keygen -y "
                              f"FILE` prints it) and keep the secret key away from the machines that write "
                              f"backups")
        if not item.startswith("age1"):
            raise ConfigError(f"{where} is not an age public key: it must start with 'age1' (the 'public key:' "
                              f"line of age-keygen's output)")
        try:
            recipient = x25519.Recipient.from_str(item)
        except RecipientError as exc:
            shown = item if len(item) <= 16 else f"{item[:12]}…{item[-4:]}"
            raise ConfigError(f"{where} {shown!r} is not a valid age public key ({exc}); copy it whole "
                              f"from `age-keygen -y FILE`") from None
        key = str(recipient)
        if key not in found:
            found.append(key)
    if not found:
        raise ConfigError(f"{setting} is set but names no public key; unset it or give age1... keys, comma-separated")
    return tuple(found)


def encryption_info(recipients: Sequence[str]) -> dict[str, Any] | None:
    """The manifest's ``encryption`` field: ``None`` or ``{"format": "age", "recipients": [...]}``."""
    if not recipients:
        return None
    return {"format": FORMAT, "recipients": list(recipients)}


def manifest_recipients(encryption: dict[str, Any] | None) -> tuple[str, ...]:
    """The recipients a manifest's ``encryption`` field names (empty when not encrypted)."""
    if not encryption:
        return ()
    if encryption.get("format") != FORMAT:
        raise BackupError(f"unknown encryption format {encryption.get('format')!r} in the manifest")
    return tuple(str(r) for r in encryption.get("recipients") or ())


@dataclass(frozen=True)
class Identities:
    """The secret keys of an identity file, with their public keys (the secrets never print)."""

    path: Path
    keys: tuple[Any, ...] = field(repr=False)  # pyrage.x25519.Identity
    public_keys: tuple[str, ...] = ()

    def matches(self, recipients: Sequence[str]) -> bool:
        return bool(set(self.public_keys) & set(recipients))


def load_identities(path: str | Path | None, *, setting: str = IDENTITY_SETTING, needed_for: str = "") -> Identities:
    """Read an ``age-keygen`` identity file (``#`` comments and blank lines allowed).

    Every problem is an ``IdentityUnusable`` (exit 1) naming the file and line, never the key.
    """
    from pyrage import IdentityError, x25519

    purpose = f" to decrypt {needed_for}" if needed_for else ""
    if path is None or not str(path).strip():
        raise IdentityUnusable(f"{setting} is not set; it must name the age identity file (age-keygen output) "
                               f"whose secret key is needed{purpose}")
    file = Path(str(path).strip()).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise IdentityUnusable(f"{setting} names {file}, which does not exist") from None
    except UnicodeDecodeError:
        raise IdentityUnusable(f"{setting} names {file}, which is not a text identity file from age-keygen") from None
    except OSError as exc:
        raise IdentityUnusable(f"{setting}: cannot read {file}: {exc.strerror or type(exc).__name__}") from None
    keys = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not line.upper().startswith("AGE-SECRET-KEY-1"):
            raise IdentityUnusable(f"line {number} of {file} ({setting}) is not an age identity: expected "
                                   f"AGE-SECRET-KEY-1..., a # comment or a blank line")
        try:
            keys.append(x25519.Identity.from_str(line))
        except IdentityError:
            raise IdentityUnusable(f"line {number} of {file} ({setting}) is a malformed age secret key "
                                   f"(damaged or cut short)") from None
    if not keys:
        raise IdentityUnusable(f"{file} ({setting}) holds no age secret key (no AGE-SECRET-KEY-1... line)")
    return Identities(path=file, keys=tuple(keys), public_keys=tuple(str(k.to_public()) for k in keys))


def wrong_identity_error(identities: Identities, *, what: str, recipients: Sequence[str] = (),
                         damaged: type[BackupCorrupt] = BackupCorrupt) -> BackupError:
    """The error for "no key unwraps ``what``": ``IdentityUnusable`` (wrong identity file), unless the
    identity is one of the recipients the manifest names, in which case the age header is damaged."""
    if recipients and identities.matches(recipients):
        return damaged(f"{what}: the age header is damaged (the identity in {identities.path} is one of its "
                       f"recipients, yet no key unwraps)")
    to = f" to {', '.join(recipients)}" if recipients else ""
    return IdentityUnusable(f"{what} is encrypted{to}; none of the {len(identities.keys)} key(s) in "
                            f"{identities.path} (public: {', '.join(identities.public_keys)}) can decrypt it: "
                            f"wrong identity file")


@dataclass
class KeyStatus:
    """What ``backup-tasks check --json`` reports about encryption keys (public data only)."""

    encrypting: bool
    recipients: list[str]
    identity_file: str | None
    identity_public_keys: list[str]
    identity_matches_recipients: bool | None
    ok: bool
    problems: list[str]
    warnings: list[str]


def key_status(recipients: Sequence[str], identity_file: str | Path | None) -> KeyStatus:
    """Recipients were validated with the settings; here the identity file is read and matched against them.

    No identity file is fine for a worker that only writes backups (it needs only the public
    key), so its absence is a warning, not a problem; a file that is set but unusable is a problem.
    """
    problems: list[str] = []
    warnings: list[str] = []
    public: list[str] = []
    matches: bool | None = None
    if identity_file:
        try:
            identities = load_identities(identity_file)
            public = list(identities.public_keys)
            if recipients:
                matches = identities.matches(recipients)
                if not matches:
                    problems.append(f"the identity file {identities.path} holds none of the secret keys for "
                                    f"{RECIPIENT_SETTING}: new backups could not be decrypted with it")
            mode = identities.path.stat().st_mode & 0o077
            if mode:
                warnings.append(f"the identity file {identities.path} is readable by group or others "
                                f"(mode {oct(identities.path.stat().st_mode & 0o777)}); chmod 600 it")
        except IdentityUnusable as exc:
            problems.append(str(exc))
    elif recipients:
        warnings.append(f"{IDENTITY_SETTING} is not set: this machine can write encrypted backups but not verify "
                        f"or restore them")
    return KeyStatus(encrypting=bool(recipients), recipients=list(recipients),
                     identity_file=str(identity_file) if identity_file else None, identity_public_keys=public,
                     identity_matches_recipients=matches, ok=not problems, problems=problems, warnings=warnings)
