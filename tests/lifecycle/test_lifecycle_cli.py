"""The lifecycle commands through ``cloudbk.cli.main.main``: settings from flags, env and the config file, what
they print, and their exit codes (SPEC §1)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from backends import unique_prefix
from lifecycle_fakes import SERVER, drop_from_index, make_backup, put_segments
from services.proc import free_port

from cloudbk.cli.main import main
from cloudbk.repo import layout
from cloudbk.repo.index import load_index
from cloudbk.storage.memory import MemoryStorage


@pytest.fixture
def repo(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, MemoryStorage]]:
    """Four backups a day apart, the newest ending an hour ago, in a memory repository the CLI can reach."""
    url = f"memory://{unique_prefix('lc-cli')}"
    storage = MemoryStorage.named(url)
    put_segments(storage, 1, 2, 20)
    for i in range(4):
        # ages are measured from when the fixture runs, not when the module was imported (the CLI reads the clock)
        now = datetime.now(UTC)
        make_backup(storage, f"2026010{i + 1}T000000Z", 1, 2 + 4 * i, 3 + 4 * i, now - timedelta(days=3 - i, hours=1))
    for name in list(os.environ):
        if name.startswith(("CLOUDBK_", "PG")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CLOUDBK_REPO", url)
    yield url, storage


def backups(storage: MemoryStorage) -> list[str]:
    return sorted(load_index(storage, SERVER).backups)


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "cloudbk.toml"
    path.write_text(text)
    return str(path)


def test_retention_alone_takes_its_policy_from_the_config_file(
    repo: tuple[str, MemoryStorage], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, storage = repo
    config = write_config(tmp_path, "[retention]\nredundancy = 3\nminimum_redundancy = 2\n")
    assert main(["retention", "--config", config, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "retention policy: REDUNDANCY 3, MINIMUM REDUNDANCY 2 (dry run: nothing is deleted)" in out
    assert "20260101T000000Z  timeline 1  end 0/300100" in out and "EXPIRED: obsolete" in out
    assert "would be deleted: main/backups/20260101T000000Z/manifest.json" in out
    assert len(backups(storage)) == 4
    assert main(["retention", "--config", config]) == 0
    assert backups(storage) == ["20260102T000000Z", "20260103T000000Z", "20260104T000000Z"]
    # a flag replaces the configured policy
    assert main(["retention", "--config", config, "--redundancy", "2"]) == 0
    assert backups(storage) == ["20260103T000000Z", "20260104T000000Z"]


def test_recovery_window_from_the_environment(
    repo: tuple[str, MemoryStorage], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _, storage = repo
    monkeypatch.setenv("CLOUDBK_RETENTION_RECOVERY_WINDOW", "36h")
    assert main(["retention", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["policy"] == "RECOVERY WINDOW OF 36 HOURS, MINIMUM REDUNDANCY 1"
    # window start 37 h ago: the backup that ended 49 h ago is needed to recover to it
    assert [b["status"] for b in doc["backups"]] == ["expired", "retained", "retained", "retained"]
    assert backups(storage) == ["20260102T000000Z", "20260103T000000Z", "20260104T000000Z"]


@pytest.mark.parametrize(
    ("args", "config"),
    [
        (["retention"], None),
        (["retention", "--redundancy", "2", "--recovery-window", "7"], None),
        (["retention", "--redundancy", "0"], None),
        (["retention", "--recovery-window", "7m"], None),
        (["retention"], "[retention]\nredundancy = 2\nrecovery_window = 7\n"),
        (["retention"], "[retention]\nredundency = 2\n"),
        (["check"], "[check]\nmax_backup_age = 'soon'\n"),
    ],
)
def test_usage_errors_exit_3(
    repo: tuple[str, MemoryStorage], tmp_path: Path, args: list[str], config: str | None
) -> None:
    _, storage = repo
    if config is not None:
        args = [*args, "--config", write_config(tmp_path, config)]
    assert main(args) == 3
    assert len(backups(storage)) == 4


def test_keep_delete_and_their_refusals(repo: tuple[str, MemoryStorage], capsys: pytest.CaptureFixture[str]) -> None:
    _, storage = repo
    assert main(["keep", "latest"]) == 0
    assert "backup 20260104T000000Z is kept (full)" in capsys.readouterr().out
    assert load_index(storage, SERVER).backups["20260104T000000Z"]["keep"] == "full"
    assert main(["keep", "--status", "20260104T000000Z"]) == 0
    assert capsys.readouterr().out.strip() == "full"
    assert main(["delete", "20260104T000000Z", "--force"]) == 1
    assert "is kept (full); refusing to delete it" in capsys.readouterr().err
    assert main(["delete", "20991231T000000Z"]) == 1
    assert main(["delete", "not-an-id"]) == 3
    for backup_id in ("20260101T000000Z", "20260102T000000Z", "20260103T000000Z"):
        assert main(["delete", backup_id]) == 0
    assert main(["keep", "--release", "20260104T000000Z"]) == 0
    assert main(["delete", "20260104T000000Z"]) == 1
    assert "refusing to delete the last backup" in capsys.readouterr().err
    assert main(["delete", "--force", "20260104T000000Z"]) == 0
    assert backups(storage) == []
    assert storage.exists(layout.wal_key(SERVER, "000000010000000000000002"))  # delete leaves WAL alone


def test_wal_verify_exit_codes(repo: tuple[str, MemoryStorage], capsys: pytest.CaptureFixture[str]) -> None:
    _, storage = repo
    assert main(["wal-verify", "--deep"]) == 0
    assert "wal-verify: OK" in capsys.readouterr().out
    drop_from_index(storage, 1, 9)
    assert main(["wal-verify"]) == 4
    out = capsys.readouterr().out
    assert "GAP: timeline 1: 1 segment(s) missing, 000000010000000000000009 .. 000000010000000000000009" in out
    assert "wal-verify: FAILED (1 gap(s))" in out


def test_check_exit_code_and_json(
    repo: tuple[str, MemoryStorage], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, "[check]\nmax_backup_age = 2\nminimum_redundancy = 4\n")
    dbname = f"host=127.0.0.1 port={free_port()} user=postgres connect_timeout=3"
    assert main(["check", "--config", config, "--dbname", dbname, "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    results = {c["name"]: c for c in doc["checks"]}
    assert doc["ok"] is False
    assert results["PostgreSQL"]["ok"] is False
    assert results["repository"]["ok"] and results["WAL continuity"]["ok"]
    assert results["backup maximum age"]["ok"] and "limit 2 hours" in results["backup maximum age"]["detail"]
    assert results["minimum redundancy requirements"]["detail"] == "have 4 backups, expected at least 4"
    assert main(["check", "--config", config, "--dbname", dbname, "--max-backup-age", "0.5"]) == 1
    out = capsys.readouterr().out
    assert "\tbackup maximum age: FAILED (newest backup 20260104T000000Z is 60 minutes old (limit 30 minutes))" in out
    assert "\tPostgreSQL: FAILED (cannot connect to PostgreSQL" in out
