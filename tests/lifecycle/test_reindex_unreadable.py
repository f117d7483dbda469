"""``cloudbk reindex`` repairs an index that does not parse: it rebuilds from the objects whatever the index
holds, replaces the damaged version by compare-and-swap (a writer that got there first is merged with, not
overwritten), and says what it found. An index of a newer format is refused, never replaced."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import timedelta

import pytest
from backends import Backend, unique_prefix
from lifecycle_fakes import SEG, SERVER, T0, make_backup, put_segments

from cloudbk.cli.main import main
from cloudbk.errors import IntegrityError, UnreadableIndex
from cloudbk.lifecycle.reindex import reindex
from cloudbk.repo import layout
from cloudbk.repo.index import Index, load_index, update_index
from cloudbk.storage.base import OVERWRITE, IfVersion, ObjectInfo, Storage, WriteMode
from cloudbk.storage.memory import MemoryStorage


@pytest.fixture
def storage(backend: Backend) -> Iterator[Storage]:
    opened = backend.open(retry_deadline=5)
    try:
        yield opened
    finally:
        opened.close()


def archive(storage: Storage) -> Index:
    put_segments(storage, 1, 2, 12)
    make_backup(storage, "20260101T000000Z", 1, 3, 4, T0)
    make_backup(storage, "20260102T000000Z", 1, 8, 9, T0 + timedelta(days=1))
    return load_index(storage, SERVER)


def truncate_index(storage: Storage) -> None:
    key = layout.index_key(SERVER)
    data = storage.get_bytes(key)
    storage.put_bytes(key, data[: len(data) // 3])


def add_segment(segno: int) -> object:
    def mutate(index: Index) -> bool:
        return index.add_segments(1, segno)

    return mutate


def test_reindex_replaces_an_unreadable_index(storage: Storage) -> None:
    before = archive(storage)
    truncate_index(storage)
    with pytest.raises(UnreadableIndex, match="cloudbk reindex"):
        update_index(storage, SERVER, add_segment(13))  # what every wal-push meets
    report = reindex(storage, SERVER)
    assert report.index_unreadable is not None and "is unreadable" in report.index_unreadable
    assert (report.backups, report.segments) == (2, 11)
    after = load_index(storage, SERVER)
    assert after.segments == before.segments and after.backups == before.backups
    assert after.system_identifier == before.system_identifier
    update_index(storage, SERVER, add_segment(13))  # archiving works again
    assert load_index(storage, SERVER).has_segment(1, 13)


class RacingStorage(MemoryStorage):
    """A writer replaces the damaged index (with a readable one) just before reindex's compare-and-swap."""

    def __init__(self) -> None:
        super().__init__(f"memory://{unique_prefix('race')}")
        self.armed = self.raced = False

    def put_bytes(self, key: str, data: bytes, mode: WriteMode = OVERWRITE) -> ObjectInfo:
        if key == layout.index_key(SERVER) and isinstance(mode, IfVersion) and self.armed and not self.raced:
            self.raced = True
            other = Index(server=SERVER, system_identifier=None, wal_segment_size=SEG)
            other.add_segments(1, 40)  # what a concurrent writer added
            super().put_bytes(key, other.to_json())
        return super().put_bytes(key, data, mode)


def test_reindex_swaps_against_the_damaged_version_only() -> None:
    storage = RacingStorage()
    archive(storage)
    truncate_index(storage)
    storage.armed = True
    reindex(storage, SERVER)
    assert storage.raced
    index = load_index(storage, SERVER)
    assert index.has_segment(1, 40)  # the concurrent writer's entry survived the rebuild
    assert index.segments[1] == [[2, 12], [40, 40]] and len(index.backups) == 2


def test_reindex_refuses_an_index_of_a_newer_format() -> None:
    storage = MemoryStorage()
    archive(storage)
    key = layout.index_key(SERVER)
    doc = json.loads(storage.get_bytes(key))
    doc["format_version"] = 99
    storage.put_bytes(key, json.dumps(doc).encode())
    with pytest.raises(IntegrityError, match="upgrade cloudbk"):
        reindex(storage, SERVER)
    assert json.loads(storage.get_bytes(key))["format_version"] == 99


def test_reindex_cli_says_what_it_found(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"memory://{unique_prefix('reindex-cli')}"
    storage = MemoryStorage.named(url)
    archive(storage)
    truncate_index(storage)
    for name in list(os.environ):
        if name.startswith("CLOUDBK_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CLOUDBK_REPO", url)
    assert main(["backup-list"]) == 4
    assert "run `cloudbk reindex`" in capsys.readouterr().err
    assert main(["reindex"]) == 0
    out = capsys.readouterr().out
    assert f"{SERVER}/index.json was unreadable (index {SERVER}/index.json is unreadable: " in out
    assert "rebuilt from 2 backups and 11 WAL segments" in out
    assert main(["backup-list"]) == 0
