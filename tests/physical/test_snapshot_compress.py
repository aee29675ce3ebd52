"""Snapshots compressed where zstd is: on the server, in pg_basebackup, or here, always stored the same way."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import zstandard

from backup_tasks.catalog import manifest as catalog
from backup_tasks.catalog.manifest import Manifest
from backup_tasks.conninfo import ConnInfo
from backup_tasks.errors import ConfigError
from backup_tasks.physical.compression import HolePuncher, basebackup_has_zstd, choose, server_has_zstd
from backup_tasks.physical.snapshot import take_snapshot
from backup_tasks.physical.unpack import snapshot_identities, unpack_snapshot
from backup_tasks.postgres.cluster import ThrowawayCluster
from backup_tasks.postgres.connect import connect
from backup_tasks.settings import Settings
from backup_tasks.storage.locations import open_storage
from backup_tasks.streams.crypto import AGE_MAGIC
from tests.support.crypto import write_identity_file
from tests.support.pitr import PitrEnv, cli_env, run_cli, switch_and_wait, trading_cluster

PG15_BIN = Path("/usr/lib/postgresql/15/bin")


# --- the setting and the choice ---------------------------------------------------------------------------

@pytest.mark.parametrize("raw", ["local-zstd", "local-zstd:level=1", "local-zstd:level=19,workers=4",
                                 "server-zstd:workers=2", "client-zstd:level=3"])
def test_the_setting_takes_local_zstd_beside_the_server_and_client_spellings(raw: str) -> None:
    assert Settings.from_env({"BACKUP_SNAPSHOT_COMPRESS": raw}).snapshot_compress == raw


@pytest.mark.parametrize(("raw", "says"), [
    ("local-zstd:long=1", "takes level=N and workers=N"),
    ("local-zstd:level=0", "level must be 1 to 22"),
    ("local-zstd:level=23", "level must be 1 to 22"),
    ("local-gzip", "must look like"),
    ("zstd", "must look like"),
])
def test_the_setting_refuses_what_local_zstd_cannot_do(raw: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        Settings.from_env({"BACKUP_SNAPSHOT_COMPRESS": raw})


@pytest.mark.parametrize(("configured", "server", "client", "by", "spec"), [
    ("server-zstd:workers=2", True, False, "server", "server-zstd:workers=2"),
    ("server-zstd:workers=2", False, True, "backup-tasks", "local-zstd:level=3,workers=2"),
    ("server-zstd:level=9", False, False, "backup-tasks", "local-zstd:level=9"),
    ("client-zstd:level=1", False, True, "pg_basebackup", "client-zstd:level=1"),
    ("client-zstd:level=1,workers=3", True, False, "backup-tasks", "local-zstd:level=1,workers=3"),
    ("local-zstd", True, True, "backup-tasks", "local-zstd:level=3"),
    ("local-zstd:workers=2,level=5", True, True, "backup-tasks", "local-zstd:level=5,workers=2"),
])
def test_the_configured_place_is_used_when_it_can_and_this_process_otherwise(
        configured: str, server: bool, client: bool, by: str, spec: str) -> None:
    chosen = choose(configured, server_zstd=server, basebackup_zstd=client)
    assert (chosen.by, chosen.spec) == (by, spec)
    assert chosen.basebackup_option() == ("none" if by == "backup-tasks" else configured)
    assert bool(chosen.reason) == (by == "backup-tasks" and not configured.startswith("local-"))


def test_pg_basebackup_is_asked_whether_it_was_built_with_zstd(pg18_bin: Path) -> None:
    assert basebackup_has_zstd(PG15_BIN / "pg_basebackup") is True  # Debian's build
    assert basebackup_has_zstd(pg18_bin / "pg_basebackup") is False  # the PyPI wheel's


def test_the_server_says_whether_it_was_built_with_zstd(pg_admin: ConnInfo) -> None:
    with connect(pg_admin) as conn:
        assert server_has_zstd(conn) is True  # Debian's 15 (the 18 build without it: tests/compat/test_postgres18.py)


def test_what_was_read_is_released_from_the_staging_file(tmp_path: Path) -> None:
    path = tmp_path / "base.tar"
    block = os.urandom(1 << 20)
    with open(path, "wb") as out:
        for _ in range(40):
            out.write(block)
    before = path.stat().st_blocks * 512
    with open(path, "rb") as source, HolePuncher(path) as puncher:
        puncher.release_to(35 << 20)  # rounded down to whole steps: the first 32 MiB
        assert puncher.enabled, "tmp_path's filesystem punches holes (ext4, tmpfs, xfs)"
        assert puncher.done == 32 << 20
        source.seek(puncher.done)
        assert source.read() == block * 8, "the part not yet read is untouched"
    assert path.stat().st_size == 40 << 20, "the size stays: the writer appends where it was"
    assert path.stat().st_blocks * 512 <= before - (32 << 20)


# --- real snapshots of a 15 server, compressed on the server and here --------------------------------------

@dataclass
class Source:
    env: PitrEnv
    cluster: ThrowawayCluster
    settings: Settings


@pytest.fixture(scope="module")
def source() -> Iterator[Source]:
    with trading_cluster("bt-test-snapcompress-") as (env, cluster):
        yield Source(env, cluster, env.for_cluster(cluster, "aitrapp"))


def tar_members(path: Path) -> dict[str, bytes | None]:
    """The base tar's regular files (content of the small ones we look at) after zstd, as unpack reads it."""
    data = zstandard.ZstdDecompressor().decompressobj().decompress(path.read_bytes())
    members: dict[str, bytes | None] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if member.isfile():
                wanted = member.name in ("PG_VERSION", "backup_label")
                members[member.name] = tar.extractfile(member).read() if wanted else None  # type: ignore[union-attr]
    return members


def stored_shape(manifest: Manifest) -> dict[str, str]:
    """Each stored object's key without the backup id, and its role: what unpack and verify go by."""
    return {key.replace(manifest.id, "ID"): info["role"] for key, info in manifest.files.items()}


@pytest.mark.slow
def test_a_snapshot_compressed_here_is_stored_as_one_compressed_on_the_server(source: Source) -> None:
    backup_dir = Path(source.settings.backup_dir)
    on_server = take_snapshot(source.settings)
    here = take_snapshot(replace(source.settings, snapshot_compress="local-zstd:level=1"))
    assert (on_server.snapshot["compressed_by"], here.snapshot["compressed_by"]) == ("server", "backup-tasks")
    assert here.snapshot["compress"] == "local-zstd:level=1" and "compress_reason" not in here.snapshot
    assert stored_shape(here) == stored_shape(on_server) == {
        "ID.base.tar.zst": "base", "ID.pg_wal.tar.zst": "wal", "ID.backup_manifest": "backup_manifest"}
    assert (here.compression, here.format, here.path) == ("zstd", "pg_basebackup-tar", f"{here.id}.base.tar.zst")
    for manifest in (on_server, here):
        for key, info in manifest.files.items():
            stored = backup_dir / key
            assert stored.stat().st_size == info["size"], key
    # The base object is one zstd frame of the very tar pg_basebackup sends: the files its manifest lists.
    members = tar_members(backup_dir / here.path)
    listed = {f["Path"] for f in json.loads((backup_dir / f"{here.id}.backup_manifest").read_bytes())["Files"]}
    assert set(members) == listed
    assert members["PG_VERSION"] == b"15\n" and f"backup-tasks {here.id}".encode() in (members["backup_label"] or b"")
    assert set(tar_members(backup_dir / on_server.path)) == listed, "both hold the same files"


@pytest.mark.slow
def test_a_snapshot_compressed_here_recovers_with_the_usual_verify(source: Source) -> None:
    settings = replace(source.settings, snapshot_compress="local-zstd:level=3,workers=2")
    conninfo = source.cluster.conninfo("aitrapp")
    snapshot = take_snapshot(settings)
    with connect(conninfo) as conn:
        conn.execute("CREATE TABLE after_snapshot AS SELECT g AS id FROM generate_series(1, 37) g")
        tables = [r[0] for r in conn.execute("SELECT format('%I.%I', table_schema, table_name) FROM "
                                             "information_schema.tables WHERE table_schema = 'public' "
                                             "AND table_type = 'BASE TABLE'")]
        rows = sum(conn.execute(f"SELECT count(*) FROM {name}").fetchone()[0] for name in tables)
    switch_and_wait(conninfo, source.env.archive)
    result = run_cli("verify", snapshot.id, "--json", env=cli_env(settings), timeout=600)
    assert result.returncode == 0, result.stderr + result.stdout
    document = json.loads(result.stdout)
    assert document["ok"] is True, document["problems"]
    assert {"sha256", "pg_verifybackup", "recovery", "row-counts", "amcheck"} <= set(document["checked"])
    recorded = catalog.load(open_storage(settings.backup_dir), snapshot.id)
    assert recorded.verification is not None and recorded.verification.ok
    assert document["details"]["rows"] == rows, "every row committed before the end, the 37 new ones included"


@pytest.mark.slow
def test_an_encrypted_snapshot_compressed_here_unpacks_as_any_other(source: Source, tmp_path: Path) -> None:
    public = write_identity_file(tmp_path / "backup.key")
    settings = replace(source.settings, snapshot_compress="local-zstd:level=1", encrypt_recipients=(public,),
                       decrypt_identity_file=str(tmp_path / "backup.key"))
    manifest = take_snapshot(settings)
    storage = open_storage(settings.backup_dir)
    for key in manifest.files:
        assert (Path(settings.backup_dir) / key).read_bytes().startswith(AGE_MAGIC), key
    data_dir = tmp_path / "unpacked"
    unpack_snapshot(storage, manifest, data_dir, snapshot_identities(settings, storage, manifest))
    assert (data_dir / "PG_VERSION").read_text() == "15\n"
    files = {str(p.relative_to(data_dir)) for p in data_dir.rglob("*") if p.is_file()}
    assert {"global/pg_control", "backup_label", f"pg_wal/{manifest.start_segment}"} <= files
