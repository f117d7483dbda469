"""Every kind of recovery target once, and the choice between two backups (file backend)."""

from __future__ import annotations

import json
import time

from backends import Backend
from bkhelpers import Clusters, archive_all, new_dest, phases, repo_env, restore, start_and_promote, take_backup
from pgcluster import PgCluster, cloudbk


def _restore_and_read(clusters: Clusters, backend: Backend, *args: str) -> tuple[list[str], str]:
    dest = new_dest()
    proc = restore(backend, dest, *args)
    pg = clusters.restored(dest, backend, archive=False)
    start_and_promote(pg)
    rows = phases(pg)
    pg.stop()
    return rows, proc.stdout


def test_each_kind_of_target(file_backend: Backend, clusters: Clusters) -> None:
    pg = clusters.archiving(file_backend)
    pg.sql("CREATE TABLE t (phase text); INSERT INTO t VALUES ('0-base')")
    backup_id = take_backup(pg, file_backend)
    xid = pg.sql("BEGIN; INSERT INTO t VALUES ('1-first'); SELECT txid_current(); COMMIT;").splitlines()[0]
    lsn = pg.sql("SELECT pg_current_wal_lsn()")
    pg.sql("SELECT pg_create_restore_point('before-second')")
    pg.sql("INSERT INTO t VALUES ('2-second')")
    archive_all(pg)

    rows, plan = _restore_and_read(clusters, file_backend)  # no target: the end of the archived WAL
    assert rows == ["0-base", "1-first", "2-second"]
    assert "target      the end of the archived WAL" in plan

    rows, plan = _restore_and_read(clusters, file_backend, "--target-name", "before-second")
    assert rows == ["0-base", "1-first"]
    assert "restore point 'before-second'" in plan

    rows, plan = _restore_and_read(clusters, file_backend, "--target-lsn", lsn)
    assert rows == ["0-base", "1-first"]
    assert f"LSN {lsn}" in plan

    rows, plan = _restore_and_read(clusters, file_backend, "--target-xid", xid)
    assert rows == ["0-base", "1-first"]

    rows, plan = _restore_and_read(clusters, file_backend, "--target-immediate")
    assert rows == ["0-base"]
    assert f"backup      {backup_id}" in plan

    # a time later than anything archived: refused before anything is written (--force would go on)
    later = pg.sql("SELECT now() + interval '1 hour'")
    dest = new_dest()
    refused = restore(file_backend, dest, "--target-time", later, check=False)
    assert refused.returncode == 1 and "later than anything the archive can reach" in refused.stderr
    assert "--force" in refused.stderr and not dest.exists()


def _noted(pg: PgCluster) -> str:
    noted = pg.sql("SELECT now()")
    time.sleep(1.1)
    return noted


def test_target_between_two_backups_uses_the_older(file_backend: Backend, clusters: Clusters) -> None:
    pg = clusters.archiving(file_backend)
    pg.sql("CREATE TABLE t (phase text); INSERT INTO t VALUES ('0-base')")
    first = take_backup(pg, file_backend)
    pg.sql("INSERT INTO t VALUES ('1-between')")
    between = _noted(pg)
    pg.sql("INSERT INTO t VALUES ('2-later')")
    second = take_backup(pg, file_backend)
    pg.sql("INSERT INTO t VALUES ('3-after')")
    after = _noted(pg)
    pg.sql("INSERT INTO t VALUES ('4-last')")
    archive_all(pg)

    listed = json.loads(cloudbk("backup-list", "--json", env=repo_env(file_backend)).stdout)
    assert [b["id"] for b in listed] == [first, second]
    shown = json.loads(cloudbk("backup-show", "latest", "--json", env=repo_env(file_backend)).stdout)
    assert shown["id"] == second and shown["tars"][0]["name"] == "base"

    rows, plan = _restore_and_read(clusters, file_backend, "--target-time", between)
    assert f"backup      {first}" in plan
    assert rows == ["0-base", "1-between"]

    dest = new_dest()
    plan = restore(file_backend, dest, "--target-time", after).stdout
    assert f"backup      {second}" in plan
