"""``verify --snapshot`` (and the ``backup_tasks.verify_snapshot`` task) name the snapshot they verified.

Without an id, "the newest complete snapshot" is resolved once, before anything is verified: a snapshot
landing in the catalog meanwhile changes neither what is verified nor what the result names.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from backup_tasks.catalog import manifest as catalog
from backup_tasks.catalog.manifest import Manifest
from backup_tasks.cli.pitr import cmd_verify_snapshot
from backup_tasks.errors import RestoreFailed, VerificationFailed
from backup_tasks.physical import verify as verify_module
from backup_tasks.settings import Settings
from backup_tasks.storage.base import Storage
from backup_tasks.storage.local import LocalStorage
from backup_tasks.worker import tasks
from tests.support.data import base_tar, store_snapshot
from tests.support.pitr import Scenario


def use_settings(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    """The worker reads its settings from the environment: exactly these, nothing inherited."""
    for name in list(os.environ):
        if name.startswith(("BACKUP_", "CELERY_", "SENTRY_", "WAL_")) and name != "BACKUP_TASKS_TEST_REDIS_DB":
            monkeypatch.delenv(name)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("BACKUP_DIR", settings.backup_dir)
    monkeypatch.setenv("CELERY_BROKER_URL", "memory://")
    if settings.database_url:
        monkeypatch.setenv("DATABASE_URL", settings.database_url)


def land_newer_snapshot(storage: Storage, snapshot: Manifest, landed: list[str]) -> None:
    """A newer complete snapshot appears in the catalog (its manifest only: it shares the stored objects)."""
    newer_id = f"{snapshot.id}-newer{len(landed)}"
    newer = replace(snapshot, id=newer_id, started_at="2099-01-01T00:00:00Z", finished_at="2099-01-01T00:00:00Z",
                    verification=None, pitr_drill=None)
    catalog.save_new(storage, newer)
    landed.append(newer_id)


@contextmanager
def newer_snapshot_lands_while_restoring(monkeypatch: pytest.MonkeyPatch, storage: Storage, snapshot: Manifest,
                                         *, then_fail: bool) -> Iterator[list[str]]:
    """Mid-verification (as the snapshot is being restored), a newer snapshot is cataloged.

    With ``then_fail`` the restore then fails (quick: no cluster); otherwise the real restore goes on.
    The landed manifests are removed afterwards, so the module's scenario stays as it was.
    """
    landed: list[str] = []
    real = verify_module.restored_cluster

    @contextmanager
    def landing(*args: Any, **kwargs: Any) -> Iterator[Any]:
        land_newer_snapshot(storage, snapshot, landed)
        if then_fail:
            raise RestoreFailed("the restored snapshot did not start: (injected by the test)")
        with real(*args, **kwargs) as restored:
            yield restored

    monkeypatch.setattr(verify_module, "restored_cluster", landing)
    try:
        yield landed
    finally:
        for backup_id in landed:
            storage.delete(catalog.manifest_key(backup_id))
        monkeypatch.setattr(verify_module, "restored_cluster", real)


def cli_args() -> argparse.Namespace:
    return argparse.Namespace(backup_id=None, snapshot=True, json=True, verbose=False)


# --- quick: a synthetic snapshot whose restore fails (the naming is the same either way) ----------------

@pytest.fixture
def synthetic(tmp_path: Path) -> tuple[Settings, Manifest]:
    backup_dir = tmp_path / "backups"
    snapshot = store_snapshot(backup_dir, base_tar(files=2, file_size=1000))
    return Settings(backup_dir=str(backup_dir), broker_url="memory://", lock_url=None), snapshot


def test_the_task_names_the_newest_snapshot_it_resolved_before_verifying(
        synthetic: tuple[Settings, Manifest], monkeypatch: pytest.MonkeyPatch) -> None:
    settings, snapshot = synthetic
    storage = LocalStorage(Path(settings.backup_dir))
    use_settings(monkeypatch, settings)
    with newer_snapshot_lands_while_restoring(monkeypatch, storage, snapshot, then_fail=True) as landed:
        with pytest.raises(VerificationFailed) as caught:
            tasks.verify_snapshot.run()
        assert landed, "the newer snapshot landed during verification"
        assert f"snapshot {snapshot.id} failed verification" in str(caught.value), str(caught.value)
        assert catalog.load(storage, snapshot.id).verification is not None
        assert catalog.load(storage, landed[0]).verification is None, "the newer one was not verified"


def test_the_cli_names_the_snapshot_it_verified_not_one_that_landed_meanwhile(
        synthetic: tuple[Settings, Manifest], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    settings, snapshot = synthetic
    storage = LocalStorage(Path(settings.backup_dir))
    with newer_snapshot_lands_while_restoring(monkeypatch, storage, snapshot, then_fail=True) as landed:
        assert cmd_verify_snapshot(cli_args(), settings) == 1
        assert landed
    document = json.loads(capsys.readouterr().out)
    assert document["backup_id"] == snapshot.id, document
    assert document["ok"] is False and "injected by the test" in " ".join(document["problems"])


def test_the_verification_itself_names_the_snapshot(synthetic: tuple[Settings, Manifest],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    settings, snapshot = synthetic
    storage = LocalStorage(Path(settings.backup_dir))
    with newer_snapshot_lands_while_restoring(monkeypatch, storage, snapshot, then_fail=True):
        result = verify_module.verify_snapshot(settings)
    assert (result.details or {}).get("backup_id") == snapshot.id, result.details
    recorded = catalog.load(storage, snapshot.id).verification
    assert recorded is not None and (recorded.details or {}).get("backup_id") == snapshot.id


# --- a real snapshot, verified for real: the task's result document names it -----------------------------

@pytest.mark.slow
def test_a_successful_verification_names_the_snapshot_verified(
        scenario: Scenario, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    storage = LocalStorage(Path(scenario.settings.backup_dir))
    use_settings(monkeypatch, scenario.settings)
    with newer_snapshot_lands_while_restoring(monkeypatch, storage, scenario.snapshot, then_fail=False) as landed:
        document = tasks.verify_snapshot.run()
        assert landed
        assert document["ok"] is True, document["problems"]
        assert document["backup_id"] == scenario.snapshot.id, document["backup_id"]
        assert catalog.load(storage, landed[0]).verification is None
    with newer_snapshot_lands_while_restoring(monkeypatch, storage, scenario.snapshot, then_fail=False) as landed:
        assert cmd_verify_snapshot(cli_args(), scenario.settings) == 0
        assert landed
    printed = json.loads(capsys.readouterr().out)
    assert printed["ok"] is True and printed["backup_id"] == scenario.snapshot.id, printed
