"""backup-push refuses what it cannot make restorable, and a backup whose WAL never arrives is not listed."""

from __future__ import annotations

from backends import Backend
from bkhelpers import Clusters, backup_push, index_of, repo_env
from pgcluster import PgCluster, cloudbk

from cloudbk.errors import ExitCode
from cloudbk.repo import layout


def test_backup_waits_for_wal_bounded_and_is_not_listed_without_it(file_backend: Backend, clusters: Clusters) -> None:
    pg = clusters.archiving(file_backend, archive_command="/bin/false")
    proc = backup_push(pg, file_backend, "--wal-wait", "3", check=False)
    assert proc.returncode == ExitCode.FAILED, proc.stderr
    assert "was not archived within 3s" in proc.stderr and "archive_command" in proc.stderr
    assert "pg_stat_archiver" in proc.stderr
    assert proc.stdout.strip() == ""
    assert index_of(file_backend).backups == {}
    assert "no backups" in cloudbk("backup-list", env=repo_env(file_backend)).stdout
    storage = file_backend.open()
    assert list(storage.list(layout.backups_prefix("main"))) == [], "a failed backup leaves no objects"
    storage.close()


def test_backup_refuses_a_server_without_archiving(file_backend: Backend, clusters: Clusters) -> None:
    pg = PgCluster.init("noarch", env=repo_env(file_backend))
    clusters.all.append(pg)
    pg.start()
    proc = backup_push(pg, file_backend, check=False)
    assert proc.returncode == ExitCode.USAGE
    assert "archive_mode is off" in proc.stderr
