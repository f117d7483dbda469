"""``check``'s repository-side checks on the memory backend, and the archive_command parser."""

from __future__ import annotations

from datetime import timedelta

import pytest
from lifecycle_fakes import SERVER, T0, drop_from_index, make_backup, put_segments
from services.proc import free_port

from cloudbk.errors import AccessDenied
from cloudbk.lifecycle.checks import CheckOptions, _archive_command_problem, run_checks
from cloudbk.repo.proofs import DRILL, VERIFY, record_proof
from cloudbk.storage.memory import MemoryStorage


def options(**kw: object) -> CheckOptions:
    base: dict[str, object] = {"repo": "memory://x", "server": SERVER, "now": T0 + timedelta(hours=1)}
    base.update(kw)
    return CheckOptions(**base)  # type: ignore[arg-type]


def by_name(report: object) -> dict[str, tuple[bool, str]]:
    return {r.name: (r.ok, r.detail) for r in report.results}  # type: ignore[attr-defined]


def healthy(storage: MemoryStorage) -> None:
    put_segments(storage, 1, 2, 12)
    make_backup(storage, "20260101T000000Z", 1, 3, 4, T0 - timedelta(hours=2))
    make_backup(storage, "20260101T010000Z", 1, 8, 9, T0)


def test_repository_checks_pass_on_a_healthy_repository() -> None:
    storage = MemoryStorage()
    healthy(storage)
    report = run_checks(storage, options(minimum_redundancy=2), postgres=False)
    assert report.ok, report.results
    results = by_name(report)
    assert list(results) == [
        "repository",
        "repository writable",
        "backup objects",
        "WAL continuity",
        "backup maximum age",
        "minimum redundancy requirements",
        "last successful verify",
        "last successful drill",
    ]
    assert results["minimum redundancy requirements"] == (True, "have 2 backups, expected at least 2")
    assert results["last successful drill"] == (True, "never")  # no limit configured: reported, never failing
    assert [info.key for info in storage.list(f"{SERVER}/check/")] == []  # the probe was removed


def test_repository_checks_fail_with_a_reason() -> None:
    storage = MemoryStorage()
    healthy(storage)
    drop_from_index(storage, 1, 6)
    report = run_checks(storage, options(minimum_redundancy=3, max_backup_age=timedelta(minutes=30)), postgres=False)
    results = by_name(report)
    assert not report.ok
    assert results["WAL continuity"][0] is False and "000000010000000000000006" in results["WAL continuity"][1]
    assert results["backup maximum age"][0] is False
    assert "limit 30 minutes" in results["backup maximum age"][1]
    assert results["minimum redundancy requirements"] == (False, "have 2 backups, expected at least 3")


def test_no_backups_fails_the_age_check() -> None:
    storage = MemoryStorage()
    put_segments(storage, 1, 2, 3)
    results = by_name(run_checks(storage, options(), postgres=False))
    assert results["backup maximum age"] == (False, "there are no backups")


def test_unreadable_or_read_only_repository() -> None:
    storage = MemoryStorage()
    healthy(storage)
    storage.inject("commit", times=1, error=lambda key: AccessDenied("permission denied", key=key))
    results = by_name(run_checks(storage, options(), postgres=False))
    assert results["repository"][0] is True
    assert results["repository writable"] == (False, "permission denied")

    broken = MemoryStorage()
    broken.inject("open_read", times=100, error=lambda key: AccessDenied("access denied", key=key))
    report = run_checks(broken, options(), postgres=False)
    assert [(r.name, r.ok) for r in report.results] == [("repository", False)]


def test_a_repository_without_an_archive_fails() -> None:
    storage = MemoryStorage()
    report = run_checks(storage, options(), postgres=False)
    assert [(r.name, r.ok) for r in report.results] == [("repository", False)]
    assert "holds no archive for server 'main'" in report.results[0].detail
    assert list(storage.list("")) == []  # nothing was written to find out


def test_postgres_unreachable_is_one_failed_line() -> None:
    storage = MemoryStorage()
    healthy(storage)
    conninfo = f"host=127.0.0.1 port={free_port()} user=postgres dbname=postgres connect_timeout=3"
    report = run_checks(storage, options(conninfo=conninfo))
    results = by_name(report)
    assert results["PostgreSQL"][0] is False
    assert "archive_mode" not in results
    assert not report.ok


@pytest.mark.parametrize(
    ("command", "problem"),
    [
        ("/opt/cloudbk-venv/bin/cloudbk-wal-push %p", None),
        ("cloudbk wal-push %p", None),
        ("cloudbk-wal-push --server main %p", None),
        ("cloudbk-wal-push --repo=file:///srv/repo/ %p", None),
        ("", "empty"),
        ("(disabled)", "empty"),
        ("cp %p /mnt/archive/%f", "does not run cloudbk-wal-push"),
        ("cloudbk-wal-push", "must pass %p"),
        ("cloudbk-wal-push --repo file:///other %p", "archives with --repo file:///other"),
        ("cloudbk-wal-push --server=other %p", "archives with --server other"),
    ],
)
def test_archive_command_recognition(command: str, problem: str | None) -> None:
    found = _archive_command_problem(command, "file:///srv/repo", "main")
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def test_proof_ages_fail_only_when_configured() -> None:
    storage = MemoryStorage()
    healthy(storage)
    now, backup_id = T0 + timedelta(hours=1), "20260101T010000Z"  # options()' clock, the newest backup
    record_proof(storage, SERVER, DRILL, backup_id, True, {"rto_seconds": 12.5}, now=now - timedelta(days=9))
    record_proof(storage, SERVER, DRILL, backup_id, False, {}, now=now - timedelta(days=1))  # failed: not counted
    record_proof(storage, SERVER, VERIFY, backup_id, True, {}, now=now - timedelta(hours=2))
    weekly = options(max_drill_age=timedelta(days=8), max_verify_age=timedelta(hours=25))
    results = by_name(run_checks(storage, weekly, postgres=False))
    assert results["last successful drill"] == (False, f"backup {backup_id}, 9 days ago (limit 8 days)")
    assert results["last successful verify"] == (True, f"backup {backup_id}, 2 hours ago (limit 25 hours)")
    record_proof(storage, SERVER, DRILL, backup_id, True, {}, now=now - timedelta(minutes=5))
    assert by_name(run_checks(storage, weekly, postgres=False))["last successful drill"][0] is True
    empty = MemoryStorage()
    healthy(empty)
    assert by_name(run_checks(empty, weekly, postgres=False))["last successful drill"][0] is False
