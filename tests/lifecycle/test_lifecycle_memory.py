"""Retention, delete and keep carried out on the memory backend: what is deleted, in which order, and what an
interrupted run leaves behind."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest
from lifecycle_fakes import SERVER, T0, keys_under, make_backup, put_history, put_other, put_segments

from cloudbk.errors import OperationFailed
from cloudbk.lifecycle.actions import (
    apply_retention,
    delete_backup,
    keep_backup,
    release_backup,
)
from cloudbk.lifecycle.retention import Policy
from cloudbk.pg.walnames import segment_name
from cloudbk.repo import layout
from cloudbk.repo.catalog import KEEP_FULL, KEEP_STANDALONE, load_catalog, read_keep_marks
from cloudbk.repo.index import load_index, update_index
from cloudbk.storage.memory import MemoryStorage


def five_backups(storage: MemoryStorage) -> list[str]:
    """Backups ending on day 0..4 at segments 2,10,18,26,34; WAL 2..40 on timeline 1."""
    put_segments(storage, 1, 2, 40)
    ids = []
    for i in range(5):
        backup_id = f"2026010{i + 1}T000000Z"
        make_backup(storage, backup_id, 1, 2 + 8 * i, 3 + 8 * i, T0 + timedelta(days=i))
        ids.append(backup_id)
    return ids


def wal_keys(storage: MemoryStorage) -> list[str]:
    return keys_under(storage, layout.wal_prefix(SERVER))


def test_dry_run_lists_exactly_what_a_real_run_deletes() -> None:
    storage = MemoryStorage()
    ids = five_backups(storage)
    put_other(storage, f"{segment_name(1, 2, 1024 * 1024)}.00000028.backup")
    put_history(storage, 2, [(1, 40 * 1024 * 1024)])
    before = set(keys_under(storage, ""))
    index_before = load_index(storage, SERVER).to_json()

    dry = apply_retention(storage, SERVER, Policy(redundancy=2), now=T0 + timedelta(days=5), dry_run=True)
    assert set(keys_under(storage, "")) == before, "a dry run deleted something"
    assert load_index(storage, SERVER).to_json() == index_before
    assert [b.id for b in dry.plan.expired] == ids[:3]
    announced = set(dry.wal_keys) | {k for keys in dry.backup_keys.values() for k in keys}

    real = apply_retention(storage, SERVER, Policy(redundancy=2), now=T0 + timedelta(days=5))
    gone = before - set(keys_under(storage, ""))
    assert gone == announced
    assert set(real.wal_keys) == set(dry.wal_keys)
    # the WAL before the oldest retained backup (begin segment 26) is gone, everything from it on is there
    names = [layout.wal_name_from_key(k) for k in wal_keys(storage)]
    assert segment_name(1, 25, 1024 * 1024) not in names
    assert [n for n in names if not n.endswith(".history")] == [segment_name(1, s, 1024 * 1024) for s in range(26, 41)]
    assert "00000002.history" in names  # history files never go
    index = load_index(storage, SERVER)
    assert sorted(index.backups) == ids[3:]
    assert index.segments == {1: [[26, 40]]}
    assert index.other_files == []
    # a second run has nothing left to do
    again = apply_retention(storage, SERVER, Policy(redundancy=2), now=T0 + timedelta(days=5))
    assert again.plan.expired == [] and again.wal_keys == []


def test_backups_are_deleted_manifest_first_and_batched() -> None:
    storage = MemoryStorage()
    storage.capabilities = replace(storage.capabilities, delete_batch_size=7)
    ids = five_backups(storage)
    calls_before = storage.calls.get("delete_many", 0)
    apply_retention(storage, SERVER, Policy(redundancy=1), now=T0 + timedelta(days=5))
    # 4 manifests (1 batch), 4 data objects (1 batch), 32 WAL segments (5 batches of at most 7)
    assert storage.calls["delete_many"] - calls_before == 1 + 1 + 5
    for backup_id in ids[:4]:
        assert keys_under(storage, layout.backup_prefix(SERVER, backup_id)) == []


def test_an_interrupted_run_leaves_nothing_listed_as_restorable_half_deleted() -> None:
    storage = MemoryStorage()
    ids = five_backups(storage)
    # the manifests go, then the data deletion fails for good
    storage.inject("delete_many", after=1, times=1, error=lambda key: OperationFailed("injected", key=key))
    with pytest.raises(OperationFailed):
        apply_retention(storage, SERVER, Policy(redundancy=2), now=T0)
    catalog = load_catalog(storage, SERVER)
    # the expired backups no longer exist (their manifests went first); the retained ones are intact
    assert [b.id for b in catalog.backups] == ids[3:]
    assert catalog.vanished == ids[:3]
    for backup_id in ids[3:]:
        assert layout.backup_manifest_key(SERVER, backup_id) in keys_under(
            storage, layout.backup_prefix(SERVER, backup_id)
        )
    # `delete` finishes one of them without --force: it no longer exists
    assert delete_backup(storage, SERVER, ids[0]).existed is False
    assert ids[0] not in load_index(storage, SERVER).backups
    # the next retention run finishes the others
    result = apply_retention(storage, SERVER, Policy(redundancy=2), now=T0)
    assert sorted(result.backup_keys) == ids[1:3]
    assert sorted(load_index(storage, SERVER).backups) == ids[3:]
    for backup_id in ids[:3]:
        assert keys_under(storage, layout.backup_prefix(SERVER, backup_id)) == []


def test_transient_storage_errors_are_retried_by_the_retry_layer() -> None:
    from cloudbk.storage.backoff import RetryPolicy
    from cloudbk.storage.retry import RetryingStorage

    inner = MemoryStorage()
    five_backups(inner)
    inner.inject("delete_many", times=2)  # TransientError twice
    storage = RetryingStorage(inner, RetryPolicy(deadline=5.0))
    result = apply_retention(storage, SERVER, Policy(redundancy=2), now=T0)
    assert len(result.plan.expired) == 3
    assert [f.fired for f in inner.faults] == [2]
    assert [b.id for b in load_catalog(inner, SERVER).backups] == [b.id for b in result.plan.retained]


def test_wal_the_index_does_not_list_is_still_expired_and_newer_wal_is_not_touched() -> None:
    storage = MemoryStorage()
    ids = five_backups(storage)
    # segment 1 was stored but the index update after it was lost; the segment beyond the index too
    orphan_old = put_segments(storage, 1, 1, 1, index=False)[0]
    orphan_new = put_segments(storage, 1, 41, 41, index=False)[0]
    result = apply_retention(storage, SERVER, Policy(redundancy=1), now=T0)
    assert orphan_old in result.wal_keys
    assert orphan_new not in result.wal_keys
    assert orphan_new in wal_keys(storage)
    assert [b.id for b in result.plan.retained] == [ids[-1]]


def test_kept_backup_survives_with_its_wal_and_release_lets_it_expire() -> None:
    storage = MemoryStorage()
    ids = five_backups(storage)
    keep_backup(storage, SERVER, ids[0], KEEP_FULL)
    assert storage.exists(layout.backup_keep_key(SERVER, ids[0]))
    assert load_index(storage, SERVER).backups[ids[0]]["keep"] == KEEP_FULL
    result = apply_retention(storage, SERVER, Policy(redundancy=1), now=T0)
    assert [b.id for b in result.plan.retained] == [ids[0], ids[4]]
    assert result.wal_keys == []  # the kept backup needs all WAL from segment 2 on
    assert len(wal_keys(storage)) == 39

    with pytest.raises(OperationFailed, match="kept"):
        delete_backup(storage, SERVER, ids[0], force=True)

    backup, previous = release_backup(storage, SERVER, ids[0])
    assert (backup.id, previous) == (ids[0], KEEP_FULL)
    assert "keep" not in load_index(storage, SERVER).backups[ids[0]]
    result = apply_retention(storage, SERVER, Policy(redundancy=1), now=T0)
    assert [b.id for b in result.plan.expired] == [ids[0]]
    assert load_index(storage, SERVER).segments == {1: [[34, 40]]}


def test_standalone_keep_keeps_only_the_backups_own_wal() -> None:
    storage = MemoryStorage()
    ids = five_backups(storage)
    keep_backup(storage, SERVER, ids[1], KEEP_STANDALONE)
    apply_retention(storage, SERVER, Policy(redundancy=1), now=T0)
    assert sorted(load_index(storage, SERVER).backups) == [ids[1], ids[4]]
    assert load_index(storage, SERVER).segments == {1: [[10, 11], [34, 40]]}


def test_keep_mark_protects_even_when_the_index_lost_it() -> None:
    storage = MemoryStorage()
    ids = five_backups(storage)
    keep_backup(storage, SERVER, ids[0])

    def forget(index: object) -> bool:  # what an index rebuilt without the marks looks like
        from cloudbk.repo.index import Index

        assert isinstance(index, Index)
        index.backups[ids[0]].pop("keep", None)
        return True

    update_index(storage, SERVER, forget)
    assert read_keep_marks(storage, SERVER) == {ids[0]: KEEP_FULL}
    result = apply_retention(storage, SERVER, Policy(redundancy=1), now=T0)
    assert ids[0] in [b.id for b in result.plan.retained]
    assert load_index(storage, SERVER).backups[ids[0]]["keep"] == KEEP_FULL  # the mirror is repaired


def test_keep_mark_survives_reindex() -> None:
    from cloudbk.lifecycle.reindex import reindex

    storage = MemoryStorage()
    ids = five_backups(storage)
    keep_backup(storage, SERVER, ids[2], KEEP_STANDALONE)
    storage.delete(layout.index_key(SERVER))
    reindex(storage, SERVER)
    index = load_index(storage, SERVER)
    assert index.backups[ids[2]]["keep"] == KEEP_STANDALONE
    assert [b for b, s in index.backups.items() if "keep" in s] == [ids[2]]


def test_a_backup_the_index_misses_is_still_counted() -> None:
    storage = MemoryStorage()
    ids = five_backups(storage)
    make_backup(storage, "20260106T000000Z", 1, 42, 43, T0 + timedelta(days=6), index=False)
    put_segments(storage, 1, 41, 45)
    result = apply_retention(storage, SERVER, Policy(redundancy=1), now=T0 + timedelta(days=7))
    assert result.catalog.unindexed == ["20260106T000000Z"]
    assert [b.id for b in result.plan.retained] == ["20260106T000000Z"]
    assert [b.id for b in result.plan.expired] == ids


def test_an_unfinished_backup_push_is_left_alone() -> None:
    storage = MemoryStorage()
    five_backups(storage)
    storage.put_bytes(layout.backup_object_key(SERVER, "20260110T000000Z", "base.tar.zst"), b"partial")
    result = apply_retention(storage, SERVER, Policy(redundancy=1), now=T0)
    assert result.catalog.orphans == ["20260110T000000Z"]
    assert keys_under(storage, layout.backup_prefix(SERVER, "20260110T000000Z"))
    with pytest.raises(OperationFailed, match="no manifest"):
        delete_backup(storage, SERVER, "20260110T000000Z")
    result_delete = delete_backup(storage, SERVER, "20260110T000000Z", force=True)
    assert not result_delete.existed
    assert keys_under(storage, layout.backup_prefix(SERVER, "20260110T000000Z")) == []


def test_delete_refuses_the_last_backup_and_honours_minimum_redundancy() -> None:
    storage = MemoryStorage()
    ids = five_backups(storage)
    with pytest.raises(OperationFailed, match="does not exist"):
        delete_backup(storage, SERVER, "20991231T000000Z")
    with pytest.raises(OperationFailed, match="minimum is 5"):
        delete_backup(storage, SERVER, ids[0], minimum_redundancy=5)
    for backup_id in ids[:4]:
        result = delete_backup(storage, SERVER, backup_id)
        assert layout.backup_manifest_key(SERVER, backup_id) == result.deleted_keys[0]  # manifest first
    with pytest.raises(OperationFailed, match="the last backup"):
        delete_backup(storage, SERVER, ids[4])
    wal_before = wal_keys(storage)
    delete_backup(storage, SERVER, ids[4], force=True)
    assert load_index(storage, SERVER).backups == {}
    assert keys_under(storage, layout.backups_prefix(SERVER)) == []
    assert wal_keys(storage) == wal_before  # delete never touches WAL


def test_retention_refuses_when_a_backup_is_kept_while_it_runs() -> None:
    storage = MemoryStorage()
    ids = five_backups(storage)
    # a `keep` lands between retention's LIST and its deletes: simulated by a mark written on the first stat
    original_stat = storage.stat

    def stat_with_race(key: str):  # type: ignore[no-untyped-def]
        if key == layout.backup_keep_key(SERVER, ids[0]) and not storage.calls.get("raced"):
            storage.calls["raced"] = 1
            storage.put_bytes(key, b'{"mode": "full"}')
        return original_stat(key)

    storage.stat = stat_with_race  # type: ignore[method-assign]
    with pytest.raises(OperationFailed, match="marked kept while retention was running"):
        apply_retention(storage, SERVER, Policy(redundancy=1), now=T0)
    assert sorted(load_index(storage, SERVER).backups) == ids
    assert load_catalog(storage, SERVER).keeps == {ids[0]: KEEP_FULL}
