"""Eight wal-push processes and a backup-push at once: the index keeps every segment and the backup."""

from __future__ import annotations

import concurrent.futures as cf
import subprocess
import threading

from backends import Backend
from bkhelpers import Clusters, backup_push, index_of, repo_env, scratch_dir
from pgcluster import BIN_DIR, run_as_pg

from cloudbk.pg.walnames import parse_wal_name


def test_concurrent_wal_pushes_and_a_backup_lose_no_index_entry(
    concurrency_backend: Backend, clusters: Clusters
) -> None:
    backend = concurrency_backend
    spool = scratch_dir("spool")
    # real segments of the cluster, set aside by a plain copy, to be pushed by hand all at once later
    pg = clusters.archiving(backend, archive_command=f"cp %p {spool}/%f")
    pg.sql("CREATE TABLE t (n int)")
    for n in range(9):
        pg.sql(f"INSERT INTO t VALUES ({n}); SELECT pg_switch_wal()")
    pg.wait_archived()
    segments = sorted(p for p in spool.iterdir() if len(p.name) == 24)[:8]
    assert len(segments) == 8
    pg.configure({"archive_command": f"'{BIN_DIR / 'cloudbk-wal-push'} %p'"})
    pg.sql("SELECT pg_reload_conf()")

    env = repo_env(backend)
    start = threading.Barrier(9)

    def push(path: str) -> subprocess.CompletedProcess[str]:
        start.wait()
        return run_as_pg([str(BIN_DIR / "cloudbk-wal-push"), path], env=env, check=False)

    def backup() -> subprocess.CompletedProcess[str]:
        start.wait()
        return backup_push(pg, backend, check=False)

    with cf.ThreadPoolExecutor(max_workers=9) as pool:
        pushes = [pool.submit(push, str(p)) for p in segments]
        taken = pool.submit(backup)
        results = [f.result() for f in pushes]
        backup_proc = taken.result()
    for proc in results:
        assert proc.returncode == 0, proc.stderr
    assert backup_proc.returncode == 0, backup_proc.stderr
    backup_id = backup_proc.stdout.strip().splitlines()[-1]

    index = index_of(backend)
    for path in segments:
        assert index.has_segment(1, parse_wal_name(path.name).segno()), f"{path.name} lost from the index"
    assert backup_id in index.backups
    summary = index.backups[backup_id]
    begin, end = (parse_wal_name(summary[k]).segno() for k in ("begin_wal", "end_wal"))
    assert not index.missing_segments(1, begin, end)
