"""``cloudbk check`` against a real PostgreSQL 15 server: healthy, then broken three ways, each with a clear line."""

from __future__ import annotations

import json
import os
import time

from backends import Backend
from lifecycle_pg import Site
from pgcluster import new_dir
from services.proc import free_port

from cloudbk.repo import layout


def lines(output: str) -> dict[str, str]:
    """``name: STATUS (detail)`` lines by name."""
    found = {}
    for line in output.splitlines():
        if line.startswith("\t") and not line.startswith("\t\t") and ": " in line:
            name, rest = line.strip().split(": ", 1)
            found[name] = rest
    return found


def wait_until(condition: object, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


def test_check_passes_when_healthy_and_names_each_failure() -> None:
    root = new_dir("lc-repo")
    site = Site.create(Backend("file", f"file://{root}"), CLOUDBK_RETRY_DEADLINE="2")
    try:
        site.churn(1)
        backup_id = site.backup()
        site.churn(1)
        site.settle()
        argv = ("check", "--dbname", site.primary.conninfo)

        # -- healthy -----------------------------------------------------------------------------------------
        healthy = site.cloudbk(*argv, check=False)
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr
        results = lines(healthy.stdout)
        assert healthy.stdout.startswith("Server main:\n")
        assert set(results) == {
            "repository",
            "repository writable",
            "PostgreSQL",
            "archive_mode",
            "wal_level",
            "archive_command",
            "continuous archiving",
            "last archived WAL",
            "system identifier",
            "backup objects",
            "WAL continuity",
            "backup maximum age",
            "minimum redundancy requirements",
        }
        assert all(status.startswith("OK") for status in results.values()), healthy.stdout
        doc = json.loads(site.cloudbk(*argv, "--json").stdout)
        assert doc["ok"] is True and len(doc["checks"]) == len(results)
        too_old = site.cloudbk(*argv, "--max-backup-age", "0.0001", check=False)
        assert too_old.returncode == 1
        assert lines(too_old.stdout)["backup maximum age"].startswith("FAILED (newest backup")

        # -- archive_command pointing elsewhere ----------------------------------------------------------------
        site.primary.sql("alter system set archive_command = 'cp %p /var/tmp/elsewhere/%f'")
        site.primary.sql("select pg_reload_conf()")
        site.primary.wait_for("show archive_command", "cp %p /var/tmp/elsewhere/%f")
        wrong = site.cloudbk(*argv, check=False)
        assert wrong.returncode == 1
        assert lines(wrong.stdout)["archive_command"] == (
            "FAILED (archive_command is 'cp %p /var/tmp/elsewhere/%f', which does not run cloudbk-wal-push)"
        )
        assert "\t\tHINT: set archive_command = 'cloudbk-wal-push %p'" in wrong.stdout
        site.primary.sql("alter system reset archive_command")
        site.primary.sql("select pg_reload_conf()")
        wait_until(lambda: "cloudbk-wal-push" in site.primary.sql("show archive_command"), "archive_command reset")

        # -- archiving fails (the repository refuses writes): a recent failure --------------------------------
        timeline_dir = root / layout.timeline_prefix("main", 1)
        mode = timeline_dir.stat().st_mode
        os.chmod(timeline_dir, 0o555)
        try:
            site.churn(1)
            wait_until(lambda: site.primary.sql("select failed_count from pg_stat_archiver") != "0", "a failure")
            failing = site.cloudbk(*argv, check=False)
            assert failing.returncode == 1
            results = lines(failing.stdout)
            assert results["archive_command"] == "OK"
            assert results["continuous archiving"].startswith("FAILED (archiving 0000000100000000000000")
            assert "and nothing has been archived since" in results["continuous archiving"]
        finally:
            os.chmod(timeline_dir, mode)
        site.churn(1)  # wakes the archiver, which now succeeds
        site.primary.wait_archived()
        recovered = site.cloudbk(*argv, check=False)
        assert recovered.returncode == 0, recovered.stdout
        assert lines(recovered.stdout)["continuous archiving"].startswith("OK")

        # -- the repository cannot be reached ------------------------------------------------------------------
        unreachable_env = {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "CLOUDBK_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
        }
        started = time.monotonic()
        unreachable = site.cloudbk(
            *argv, "--repo", "s3://cloudbk-test/nowhere", "--retry-deadline", "1", check=False, **unreachable_env
        )
        assert time.monotonic() - started < 60
        assert unreachable.returncode == 1
        results = lines(unreachable.stdout)
        assert results["repository"].startswith("FAILED (")
        assert results["PostgreSQL"].startswith("OK")
        assert "WAL continuity" not in results  # nothing to judge without the repository

        missing = site.cloudbk(*argv, "--repo", f"file://{new_dir('lc-empty')}/none", check=False)
        assert missing.returncode == 1
        assert "holds no archive for server 'main'" in lines(missing.stdout)["repository"]

        # -- the backup's tar loses its tail: the backup is damaged and no longer counts ---------------------
        tar = root / layout.backup_object_key("main", backup_id, "base.00001.tar.zst")  # PGDATA's first volume
        with open(tar, "r+b") as f:
            f.truncate(tar.stat().st_size - 1000)
        damaged = site.cloudbk(*argv, check=False)
        assert damaged.returncode == 1
        results = lines(damaged.stdout)
        assert results["backup objects"].startswith(f"FAILED (backup {backup_id} is damaged: its data object ")
        assert results["minimum redundancy requirements"] == "FAILED (have 0 backups, expected at least 1)"
        assert f"cloudbk delete {backup_id}" in damaged.stdout
    finally:
        site.destroy()
