"""Retention's deletes on every storage backend (batched, manifest first), on a synthetic archive: five backups
and WAL laid out exactly as cloudbk writes them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta

import pytest
from backends import Backend
from lifecycle_fakes import SEG, SERVER, T0, keys_under, make_backup, put_history, put_segments

from cloudbk.lifecycle.actions import apply_retention, delete_backup, keep_backup
from cloudbk.lifecycle.retention import Policy
from cloudbk.pg.walnames import segment_name
from cloudbk.repo import layout
from cloudbk.repo.catalog import load_catalog
from cloudbk.repo.index import load_index
from cloudbk.storage.base import Storage
from cloudbk.wal.verify import verify_deep, verify_index


@pytest.fixture
def storage(backend: Backend) -> Iterator[Storage]:
    opened = backend.open()
    opened.capabilities = replace(opened.capabilities, delete_batch_size=7)  # several batches per run
    try:
        yield opened
    finally:
        opened.close()


def test_retention_deletes_in_batches_on_every_backend(storage: Storage) -> None:
    put_segments(storage, 1, 2, 24)
    ids = []
    for i in range(5):
        backup_id = f"2026010{i + 1}T000000Z"
        make_backup(storage, backup_id, 1, 2 + 4 * i, 3 + 4 * i, T0 + timedelta(days=i))
        ids.append(backup_id)
    put_history(storage, 2, [(1, 30 * SEG)])
    keep_backup(storage, SERVER, ids[1])

    dry = apply_retention(storage, SERVER, Policy(redundancy=2), now=T0, dry_run=True)
    before = set(keys_under(storage, f"{SERVER}/"))
    result = apply_retention(storage, SERVER, Policy(redundancy=2), now=T0)
    after = set(keys_under(storage, f"{SERVER}/"))

    # b1 and b3 expire; b2 is kept (so the WAL from its begin, segment 6, stays); b4 and b5 are the newest two
    assert [b.id for b in result.plan.expired] == [ids[0], ids[2]]
    announced = set(dry.wal_keys) | {k for keys in dry.backup_keys.values() for k in keys}
    assert before - after == announced
    assert {layout.wal_name_from_key(k) for k in result.wal_keys} == {segment_name(1, n, SEG) for n in (2, 3, 4, 5)}
    index = load_index(storage, SERVER)
    assert sorted(index.backups) == [ids[1], ids[3], ids[4]]
    assert index.segments == {1: [[6, 24]]}
    assert layout.wal_key(SERVER, "00000002.history") in after
    catalog = load_catalog(storage, SERVER)
    report = verify_deep(storage, catalog.index, verify_index(catalog.index, catalog.backups), workers=4)
    assert report.ok, report.problems

    deleted = delete_backup(storage, SERVER, ids[3])
    assert deleted.deleted_keys[0] == layout.backup_manifest_key(SERVER, ids[3])
    assert keys_under(storage, layout.backup_prefix(SERVER, ids[3])) == []
