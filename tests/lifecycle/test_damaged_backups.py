"""A damaged backup (corrupt manifest, truncated or missing data object) does not count anywhere: backup-list,
backup-show, check, retention's redundancy and the PITR choice agree, because they all start from
``cloudbk.repo.catalog.load_catalog``. A manifest the storage fails to return is an error, never "not a backup".
And with ``index.json`` gone while backups or WAL are stored, every command says so and points to reindex."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from backends import Backend
from lifecycle_fakes import SERVER, T0, TAR_BYTES, keys_under, make_backup, put_segments

from cloudbk.backup.restore import RestoreOptions, prepare
from cloudbk.cli.main import main
from cloudbk.errors import IntegrityError, TransientError
from cloudbk.lifecycle.actions import apply_retention, delete_backup
from cloudbk.lifecycle.checks import CheckOptions, run_checks
from cloudbk.lifecycle.retention import Policy
from cloudbk.repo import layout
from cloudbk.repo.catalog import load_catalog
from cloudbk.repo.index import Index, update_index
from cloudbk.storage.base import Storage
from cloudbk.storage.memory import MemoryStorage

IDS = ["20260101T000000Z", "20260102T000000Z", "20260103T000000Z"]


@pytest.fixture
def cli_env(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> Backend:
    """The process environment pointing the in-process CLI at ``backend``."""
    for name in list(os.environ):
        if name.startswith(("CLOUDBK_", "PG")):
            monkeypatch.delenv(name)
    for name, value in backend.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CLOUDBK_REPO", backend.url)
    monkeypatch.setenv("CLOUDBK_RETRY_DEADLINE", "5")
    return backend


@pytest.fixture
def storage(cli_env: Backend) -> Iterator[Storage]:
    opened = cli_env.open(retry_deadline=5)
    try:
        yield opened
    finally:
        opened.close()


def three_backups(storage: Storage) -> None:
    put_segments(storage, 1, 2, 14)
    for i, backup_id in enumerate(IDS):
        make_backup(storage, backup_id, 1, 2 + 4 * i, 3 + 4 * i, T0 + timedelta(hours=i))


def damage(storage: Storage) -> None:
    """The middle backup's manifest is cut in half; the newest one's tar loses its tail."""
    manifest = layout.backup_manifest_key(SERVER, IDS[1])
    data = storage.get_bytes(manifest)
    storage.put_bytes(manifest, data[: len(data) // 2])
    storage.put_bytes(layout.backup_object_key(SERVER, IDS[2], "base.tar.zst"), TAR_BYTES[:4])


def test_damaged_backups_count_nowhere(storage: Storage, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    three_backups(storage)
    damage(storage)

    catalog = load_catalog(storage, SERVER)
    assert [b.id for b in catalog.backups] == [IDS[0]]
    assert sorted(catalog.damaged) == IDS[1:]
    assert "manifest.json is corrupt" in catalog.damaged[IDS[1]]
    assert catalog.damaged[IDS[2]] == f"its data object base.tar.zst is 4 bytes, the manifest says {len(TAR_BYTES)}"

    # check names both, with what to do, and does not count them
    report = run_checks(
        storage,
        CheckOptions(repo="x", server=SERVER, minimum_redundancy=2, now=T0 + timedelta(hours=3)),
        postgres=False,
    )
    results = {r.name: r for r in report.results}
    objects = results["backup objects"]
    assert not objects.ok and IDS[1] in objects.detail and IDS[2] in objects.detail
    assert objects.hint is not None and "cloudbk delete" in objects.hint
    assert results["minimum redundancy requirements"].detail == "have 1 backups, expected at least 2"
    assert "20260101T000000Z" in results["backup maximum age"].detail  # the newest *sound* backup

    # PITR: the newest sound backup is chosen; asking for a damaged one is an integrity error naming it
    options = RestoreOptions(dest=str(tmp_path / "dest"), restore_command="true")
    assert prepare(storage, SERVER, options)[1].backup.id == IDS[0]
    with pytest.raises(IntegrityError, match=f"backup {IDS[2]} is damaged"):
        prepare(storage, SERVER, RestoreOptions(dest=str(tmp_path / "dest"), restore_command="true", backup_id=IDS[2]))

    # the CLI: backup-list lists the sound one only, backup-show refuses a damaged one (exit 4)
    assert main(["backup-list", "--json"]) == 0
    listed = capsys.readouterr()
    assert [d["id"] for d in json.loads(listed.out)] == [IDS[0]]
    assert f"backup {IDS[2]} is damaged" in listed.err  # a warning names what is left out
    assert main(["backup-show", IDS[1]]) == 4
    assert "is damaged" in capsys.readouterr().err

    # retention counts only the sound backup, so it expires nothing, and leaves the damaged ones alone
    before = keys_under(storage, f"{SERVER}/backups/")
    result = apply_retention(storage, SERVER, Policy(redundancy=1), now=T0 + timedelta(days=1))
    assert [d.backup.id for d in result.plan.decisions] == [IDS[0]] and not result.plan.expired
    assert keys_under(storage, f"{SERVER}/backups/") == before

    # the way out check points to: deleting a damaged backup needs no --force (it is not counted)
    assert delete_backup(storage, SERVER, IDS[2]).deleted_keys
    assert sorted(load_catalog(storage, SERVER).damaged) == [IDS[1]]


def strip_sizes(storage: Storage) -> None:
    """Index entries as an older cloudbk wrote them: no object sizes, so the catalog reads each manifest."""

    def mutate(index: Index) -> bool:
        for summary in index.backups.values():
            summary.pop("objects", None)
            summary.pop("manifest_size", None)
        return True

    update_index(storage, SERVER, mutate)


def test_a_manifest_read_that_fails_is_an_error_not_a_missing_backup() -> None:
    storage = MemoryStorage()
    three_backups(storage)
    strip_sizes(storage)
    assert [b.id for b in load_catalog(storage, SERVER).backups] == IDS  # older entries still count
    before = keys_under(storage, f"{SERVER}/")
    # the index read passes, the first manifest read fails (as after the retry layer gave up)
    storage.inject("open_read", after=1, times=1, error=lambda key: TransientError("injected 503", key=key))
    with pytest.raises(TransientError):
        apply_retention(storage, SERVER, Policy(redundancy=1), now=T0 + timedelta(days=1))
    assert keys_under(storage, f"{SERVER}/") == before  # no backup, no WAL deleted


@pytest.mark.parametrize("what", ["backups", "wal"])
def test_a_missing_index_with_objects_stored_points_to_reindex(
    storage: Storage, tmp_path: Path, capsys: pytest.CaptureFixture[str], what: str
) -> None:
    if what == "backups":
        three_backups(storage)
    else:
        put_segments(storage, 1, 2, 4)
    storage.delete(layout.index_key(SERVER))
    commands = [
        ["backup-list"],
        ["backup-show", "latest"],
        ["restore", str(tmp_path / "dest")],
        ["retention", "--redundancy", "1"],
    ]
    before = keys_under(storage, f"{SERVER}/")
    for argv in commands:
        assert main(argv) == 4, argv
        err = capsys.readouterr().err
        assert f"the index {SERVER}/index.json is missing" in err and "cloudbk reindex" in err, (argv, err)
    assert keys_under(storage, f"{SERVER}/") == before  # retention did nothing
    assert main(["check", "--json"]) == 1
    repository = json.loads(capsys.readouterr().out)["checks"][0]
    assert repository["name"] == "repository" and not repository["ok"]
    assert "is missing" in repository["detail"] and "cloudbk reindex" in repository["hint"]


def test_an_empty_repository_still_has_no_backups(cli_env: Backend, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["backup-list"]) == 0
    assert "no backups for server 'main'" in capsys.readouterr().out
