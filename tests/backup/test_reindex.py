"""`cloudbk reindex` rebuilds the index from the objects: the same backups, WAL ranges and histories."""

from __future__ import annotations

from backends import Backend
from bkhelpers import Clusters, archive_all, index_of, new_dest, repo_env, restore, start_and_promote, take_backup
from pgcluster import cloudbk

from cloudbk.repo import layout


def test_reindex_rebuilds_what_the_objects_say(file_backend: Backend, clusters: Clusters) -> None:
    pg = clusters.archiving(file_backend)
    pg.sql("CREATE TABLE t (n int); INSERT INTO t VALUES (1)")
    backup_id = take_backup(pg, file_backend)
    pg.sql("INSERT INTO t VALUES (2)")
    archive_all(pg)
    # a promoted restore adds timeline 2 and its history file
    dest = new_dest()
    restore(file_backend, dest)
    restored = clusters.restored(dest, file_backend)
    start_and_promote(restored)
    archive_all(restored)
    before = index_of(file_backend)
    assert 2 in before.histories

    storage = file_backend.open()
    storage.delete(layout.index_key("main"))
    storage.close()
    out = cloudbk("reindex", env=repo_env(file_backend)).stdout
    assert "backups           1" in out
    after = index_of(file_backend)
    assert after.segments == before.segments
    assert after.histories == before.histories
    assert after.backups == before.backups and backup_id in after.backups
    assert after.other_files == before.other_files
    assert after.system_identifier == before.system_identifier

    # a truncated index stops every wal-push ("run `cloudbk reindex`"); reindex must repair it, not fail on it
    storage = file_backend.open()
    key = layout.index_key("main")
    storage.put_bytes(key, storage.get_bytes(key)[:100])
    storage.close()
    out = cloudbk("reindex", env=repo_env(file_backend)).stdout
    assert "main/index.json was unreadable (" in out and "rebuilt from 1 backups and " in out
    repaired = index_of(file_backend)
    assert repaired.segments == before.segments and repaired.backups == before.backups
    restored.sql("CREATE TABLE after_repair (n int)")
    archive_all(restored)  # archiving works again
