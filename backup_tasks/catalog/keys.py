"""Which age identities open an encrypted backup: the identity file, checked against the manifest."""

from __future__ import annotations

from backup_tasks.catalog.manifest import Manifest
from backup_tasks.settings import Settings
from backup_tasks.streams.crypto import Identities, load_identities, manifest_recipients


def identities_for(settings: Settings, manifest: Manifest) -> Identities | None:
    """The identity file's keys when ``manifest`` is encrypted (``IdentityUnusable`` when unusable), else None."""
    if not manifest.encryption:
        return None
    manifest_recipients(manifest.encryption)  # an unknown format is refused here, not half-way through
    return load_identities(settings.decrypt_identity_file, needed_for=f"backup {manifest.id}")
