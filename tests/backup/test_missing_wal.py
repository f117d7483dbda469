"""A segment missing between the backup and the target: restore refuses before it writes anything."""

from __future__ import annotations

import os

from backends import Backend
from bkhelpers import Clusters, archive_all, forget_segment, index_of, new_dest, restore, take_backup

from cloudbk.errors import ExitCode
from cloudbk.pg.walnames import segment_name
from cloudbk.repo import layout


def test_missing_segment_refuses_before_extracting(file_backend: Backend, clusters: Clusters) -> None:
    pg = clusters.archiving(file_backend)
    pg.sql("CREATE TABLE t (phase text); INSERT INTO t VALUES ('0-base')")
    take_backup(pg, file_backend)
    for n in range(3):
        pg.sql(f"INSERT INTO t VALUES ('{n}-after')")
        archive_all(pg)
    target = pg.sql("SELECT now()")
    pg.sql("INSERT INTO t VALUES ('late')")
    archive_all(pg)
    backup = next(iter(index_of(file_backend).backups.values()))
    end_seg = int(backup["end_wal"][8:16], 16) * 256 + int(backup["end_wal"][16:], 16)
    victim = end_seg + 1
    name = segment_name(1, victim)

    # the index lost the entry but the object is there: the plan checks the exact key and goes ahead
    forget_segment(file_backend, victim)
    dest = new_dest()
    proc = restore(file_backend, dest, "--target-time", target)
    assert "every WAL segment and history file the plan needs is in the archive" in proc.stdout

    # the object is really gone: refused, and nothing is written
    storage = file_backend.open()
    storage.delete(layout.wal_key("main", name))
    storage.close()
    dest = new_dest()
    proc = restore(file_backend, dest, "--target-time", target, check=False)
    assert proc.returncode == ExitCode.FAILED, proc.stderr
    assert "MISSING" in proc.stdout and name in proc.stdout
    assert "refusing to restore" in proc.stderr
    assert not dest.exists() or not os.listdir(dest)

    # --force restores anyway (recovery would stop at the gap)
    proc = restore(file_backend, dest, "--target-time", target, "--force")
    assert (dest / "recovery.signal").exists() and (dest / "global" / "pg_control").exists()
