"""``cloudbk restore --dry-run`` writes nothing and refuses exactly when ``restore`` would (issue 14).

One cluster, one backup on the file backend. A healthy dry run exits 0 and leaves DEST as it was (absent, or an
empty directory); then three refusals, each compared with the real restore's exit code and checked to leave
DEST untouched: a WAL segment missing from the plan, a target time before the oldest backup, and a DEST on a
small tmpfs (the new free-space check).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from backends import Backend
from bkhelpers import (
    Clusters,
    archive_all,
    forget_segment,
    new_dest,
    replace_object,
    restore,
    scratch_dir,
    take_backup,
)
from pgcluster import chown_to_pg

from cloudbk.errors import ExitCode
from cloudbk.pg.walnames import lsn_segno, segment_name
from cloudbk.repo import layout
from cloudbk.repo.manifest import Manifest


def _both_refuse(backend: Backend, dest: Path, *args: str) -> str:
    """The dry run and the restore exit alike, nonzero, and DEST stays as it was; returns the dry run's stderr."""
    before = sorted(os.listdir(dest)) if dest.exists() else None
    dry = restore(backend, dest, "--dry-run", *args, check=False)
    assert dry.returncode != 0 and "Traceback" not in dry.stderr, dry.stderr
    assert (sorted(os.listdir(dest)) if dest.exists() else None) == before
    real = restore(backend, dest, *args, check=False)
    assert real.returncode == dry.returncode, (dry.stderr, real.stderr)
    assert (sorted(os.listdir(dest)) if dest.exists() else None) == before
    return dry.stderr


def test_dry_run_writes_nothing_and_refuses_like_restore(file_backend: Backend, clusters: Clusters) -> None:
    pg = clusters.archiving(file_backend)
    before_backup = pg.sql("SELECT now()")
    pg.sql("CREATE TABLE t AS SELECT generate_series(1, 1000) AS n")
    backup_id = take_backup(pg, file_backend)
    pg.sql("INSERT INTO t SELECT generate_series(1, 1000)")
    after = int(pg.sql("SELECT pg_current_wal_lsn() - '0/0'"))
    archive_all(pg)
    pg.sql("INSERT INTO t SELECT generate_series(1, 1000)")
    archive_all(pg)  # the segment of ``after`` is inside the archived WAL, not its end

    dest = new_dest()
    dry = restore(file_backend, dest, "--dry-run")
    assert "dry run: restore would write backup" in dry.stdout and "space " in dry.stdout, dry.stdout
    assert not dest.exists()
    empty = scratch_dir("empty")
    doc = json.loads(restore(file_backend, empty, "--dry-run", "--json").stdout)
    assert doc["would_restore"] and doc["backup"] == backup_id and doc["complete"] and doc["space"][0]["ok"], doc
    assert os.listdir(empty) == []  # no recovery.signal, nothing

    storage = file_backend.open()
    try:
        key = layout.backup_manifest_key("main", backup_id)
        manifest = Manifest.from_json(storage.get_bytes(key), key)
        name = segment_name(manifest.timeline, lsn_segno(after, manifest.wal_segment_size), manifest.wal_segment_size)
        wal_key = layout.wal_key("main", name)
        segment = storage.get_bytes(wal_key)
        replace_object(file_backend, storage, wal_key, None)
        forget_segment(file_backend, lsn_segno(after, manifest.wal_segment_size))  # gone from the index too
        assert name in _both_refuse(file_backend, empty)
        replace_object(file_backend, storage, wal_key, segment, create=True)  # the stat finds it again
    finally:
        storage.close()

    stderr = _both_refuse(file_backend, empty, "--target-time", before_backup)
    assert "no backup ended before the target" in stderr, stderr

    small = scratch_dir("small")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)  # tests run as root
    try:
        chown_to_pg(small)
        stderr = _both_refuse(file_backend, small / "data")
        assert "not enough free space" in stderr and str(small) in stderr, stderr
        assert restore(file_backend, small / "data", "--dry-run", check=False).returncode == ExitCode.FAILED
    finally:
        subprocess.run(["umount", str(small)], check=True)
