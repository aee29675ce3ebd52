"""age keys for the tests."""

from __future__ import annotations

from pathlib import Path

import pyrage


def write_identity_file(path: Path) -> str:
    """An identity file exactly as age-keygen writes it (comments included); returns the public key."""
    identity = pyrage.x25519.Identity.generate()
    public = str(identity.to_public())
    path.write_text(f"# created: 2026-11-27T02:00:00+05:30\n# public key: {public}\n{identity}\n")
    path.chmod(0o600)
    return public
