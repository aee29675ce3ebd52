"""The cluster-level objects saved with every dump: stored beside it, listed in its manifest, read back.

``postgres.globals`` reads the roles, memberships, settings and database properties a database needs
(``ClusterObjects``); here that document becomes a backup object, ``<id>.globals.json.zst[.age]``
(``ids.cluster_objects_key``), compressed with the dump's codec and encrypted to the dump's recipients
(it holds password verifiers when the backup role may read them), written to a temporary name and
committed like the dump. Its size and sha256 (of the stored bytes, so damage is found without the key) go
into ``Manifest.cluster_objects`` and ``Manifest.files`` (role ``cluster-objects``, beside the dump
itself), so prune deletes it with its dump and ``check_cluster_objects`` finds it damaged or missing.

Dumps taken before this object existed have no ``cluster_objects``: ``load_cluster_objects`` returns None.
"""

from __future__ import annotations

import io
from typing import Any

from backup_tasks.catalog.ids import cluster_objects_key
from backup_tasks.catalog.manifest import Manifest
from backup_tasks.errors import BackupCorrupt, IdentityUnusable
from backup_tasks.postgres.globals import ClusterObjects
from backup_tasks.settings import Settings
from backup_tasks.storage.base import ObjectWriter, Storage
from backup_tasks.storage.integrity import HashingWriter, LocationCheck, check_locations, first_good
from backup_tasks.streams.codec import compressor, decompressed_chunks
from backup_tasks.streams.crypto import (
    IDENTITY_SETTING,
    EncryptingWriter,
    Identities,
    decrypt_bytes,
    manifest_recipients,
)

#: The role of the object in ``Manifest.files``.
ROLE = "cluster-objects"


def store_cluster_objects(storage: Storage, backup_id: str, objects: ClusterObjects,
                          settings: Settings) -> dict[str, Any]:
    """Store ``objects`` as the dump ``backup_id``'s cluster-objects object; its ``Manifest.cluster_objects`` entry.

    Temporary name, then commit: a failure leaves nothing under the key (the writer's abort).
    """
    key = cluster_objects_key(backup_id, settings.compression, encrypted=bool(settings.encrypt_recipients))
    stored = HashingWriter(storage.writer(key))
    writer: ObjectWriter = stored
    try:
        if settings.encrypt_recipients:
            writer = EncryptingWriter(stored, settings.encrypt_recipients)
        comp = compressor(settings.compression, settings.compression_level, threads=0)
        writer.write(comp.compress(objects.to_json()) + comp.flush())
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return {"key": key, "size_bytes": stored.bytes_written, "sha256": stored.hexdigest(),
            "roles": objects.role_names(), "passwords": objects.passwords}


def files_entries(manifest_path: str, size_bytes: int, sha256: str, entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``Manifest.files`` of a dump: the dump itself and its cluster-objects object (what prune deletes)."""
    return {manifest_path: {"size": size_bytes, "sha256": sha256, "role": "dump"},
            entry["key"]: {"size": entry["size_bytes"], "sha256": entry["sha256"], "role": ROLE}}


def check_cluster_objects(storage: Storage, manifest: Manifest) -> list[LocationCheck]:
    """The cluster-objects object checked against the manifest in every location (verify); [] for older dumps."""
    entry = manifest.cluster_objects
    if not entry:
        return []
    return check_locations(storage, entry["key"], size=int(entry["size_bytes"]), sha256=str(entry["sha256"]))


def load_cluster_objects(storage: Storage, manifest: Manifest, identities: Identities | None) -> ClusterObjects | None:
    """The cluster objects saved with dump ``manifest``, or None for a dump taken before they were saved.

    Size and sha256 are checked first, primary location first (``BackupCorrupt`` when no location holds a
    good copy, ``ObjectMissing`` when none holds it at all); then decrypted (an encrypted dump's needs
    ``identities``) and decompressed. A document that does not parse is ``BackupCorrupt`` too.
    """
    entry = manifest.cluster_objects
    if not entry:
        return None
    key = str(entry["key"])
    good, _checks = first_good(storage, key, size=int(entry["size_bytes"]), sha256=str(entry["sha256"]))
    data = good.read_bytes(key)
    what = f"the roles and database properties of backup {manifest.id} ({key})"
    if manifest.encryption:
        if identities is None:
            raise IdentityUnusable(f"{what} are encrypted: set {IDENTITY_SETTING} to an identity file of "
                                   f"the backup's recipients to read them")
        data = decrypt_bytes(data, identities, what=what, recipients=manifest_recipients(manifest.encryption))
    plain = b"".join(decompressed_chunks(io.BytesIO(data), manifest.compression, what=what))
    try:
        return ClusterObjects.from_json(plain)
    except ValueError as exc:
        raise BackupCorrupt(f"{what} cannot be read: {exc}") from None
