"""The recovery drill on every backend: back up, write, note the time, make a mistake, lose the data directory,
restore to the noted time, and get the data back on a new timeline that archives again."""

from __future__ import annotations

import json
import shutil
import time

from backends import Backend
from bkhelpers import (
    Clusters,
    archive_all,
    current_timeline,
    index_of,
    repo_env,
    restore,
    start_and_promote,
    take_backup,
)
from pgcluster import cloudbk

from cloudbk.pg.walnames import lsn_segno


def test_drill_point_in_time_restore(pg_backend: Backend, clusters: Clusters) -> None:
    pg = clusters.archiving(pg_backend)
    pg.sql("CREATE TABLE accounts (id int PRIMARY KEY, owner text); "
           "INSERT INTO accounts SELECT g, 'before-backup' FROM generate_series(1, 5000) g")  # fmt: skip
    backup_id = take_backup(pg, pg_backend)
    pg.sql("INSERT INTO accounts SELECT g, 'after-backup' FROM generate_series(5001, 6000) g")
    noted = pg.sql("SELECT now()")
    time.sleep(1.1)  # the mistake commits strictly after the noted time
    pg.sql("DELETE FROM accounts WHERE id % 2 = 0")
    pg.sql("INSERT INTO accounts VALUES (9999, 'after-target')")
    archive_all(pg)

    listed = json.loads(cloudbk("backup-list", "--json", env=repo_env(pg_backend)).stdout)
    assert [b["id"] for b in listed] == [backup_id]
    assert listed[0]["status"] == "complete" and listed[0]["wal_after"]["restorable"]

    pg.stop()
    shutil.rmtree(pg.datadir)  # the data directory is lost

    dest = pg.datadir  # restore in place, as an operator would
    proc = restore(pg_backend, dest, "--target-time", noted)
    assert f"backup      {backup_id}" in proc.stdout
    assert "every WAL segment and history file the plan needs is in the archive" in proc.stdout
    restored = clusters.restored(dest, pg_backend)
    start_and_promote(restored)

    counts = restored.sql(
        "SELECT count(*) FILTER (WHERE owner = 'before-backup'), count(*) FILTER (WHERE owner = 'after-backup'), "
        "count(*) FILTER (WHERE owner = 'after-target') FROM accounts"
    )
    assert counts == "5000|1000|0", "rows before the target must be back, rows after it absent"
    assert current_timeline(restored) == 2

    # the promoted server archives again, on its new timeline
    restored.sql("INSERT INTO accounts VALUES (10000, 'new-timeline')")
    lsn = restored.sql("SELECT pg_current_wal_lsn()")
    archive_all(restored)
    index = index_of(pg_backend)
    assert 2 in index.histories and index.histories[2][0].timeline == 1
    hi, lo = (int(x, 16) for x in lsn.split("/"))
    assert index.has_segment(2, lsn_segno((hi << 32) | lo))
