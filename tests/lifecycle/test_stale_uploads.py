"""Incomplete uploads a killed backup-push leaves behind are aborted by retention, unless a running backup's
heartbeat claims them or they are younger than the stale-upload age."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest
from backends import Backend, selected

from cloudbk.cli.main import main
from cloudbk.errors import ConflictError
from cloudbk.repo import layout
from cloudbk.repo.inflight import Heartbeat, find_stale_uploads, live_heartbeats, stale_uploads
from cloudbk.storage.base import UploadInfo
from cloudbk.storage.memory import MemoryStorage

DEAD, LIVE = "20261121T090000Z", "20261121T100000Z"
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)

KILLED_WRITER = r"""
import os, sys
from cloudbk.storage.registry import open_storage, StorageOptions
url, key, endpoint = sys.argv[1], sys.argv[2], sys.argv[3] or None
storage = open_storage(url, StorageOptions(endpoint_url=endpoint, retry_deadline=5))
writer = storage.open_write(key)
chunk = os.urandom(1024 * 1024)
for n in range(1, 1000):
    writer.write(chunk)
    if n == 24:  # past the first parts: the multipart upload exists and holds parts
        print("midway", flush=True)
"""


def _upload(key: str, age: timedelta | None) -> UploadInfo:
    return UploadInfo(key, f"id-{key}", None if age is None else (NOW - age).timestamp())


def test_which_uploads_are_stale() -> None:
    dead_tar = _upload(f"main/backups/{DEAD}/base.tar.zst", 2 * DAY)
    live_tar = _upload(f"main/backups/{LIVE}/base.tar.zst", 2 * DAY)  # a backup running for two days
    young = _upload("main/backups/20261122T115500Z/base.tar.zst", timedelta(minutes=5))
    wal = _upload("main/wal/00000001/000000010000000000000003", 2 * DAY)  # a killed wal-push
    unknown = _upload(f"main/backups/{DEAD}/16385.tar.zst", None)  # a store that reports no start time
    uploads = [dead_tar, live_tar, young, wal, unknown]
    assert stale_uploads("main", uploads, {LIVE}, NOW, DAY) == [dead_tar, wal]
    assert stale_uploads("main", uploads, {LIVE}, NOW, timedelta(minutes=1)) == [dead_tar, young, wal]


def test_heartbeat_is_rewritten_while_the_backup_runs_and_removed_after() -> None:
    storage = MemoryStorage()
    key = layout.backup_heartbeat_key("main", LIVE)
    heartbeat = Heartbeat(storage, "main", LIVE, interval=0.02)
    heartbeat.start()
    try:
        first = storage.stat(key)
        with pytest.raises(ConflictError, match="another backup-push"):
            Heartbeat(storage, "main", LIVE).start()  # the id is taken while its backup runs
        deadline = time.monotonic() + 5
        while storage.stat(key).version == first.version and time.monotonic() < deadline:
            time.sleep(0.01)
        assert storage.stat(key).version != first.version
        now = datetime.now(UTC)
        assert live_heartbeats(storage, "main", now) == {LIVE}
        assert live_heartbeats(storage, "main", now + timedelta(hours=1)) == set()  # not rewritten: dead
    finally:
        heartbeat.stop()
    assert not storage.exists(key)


def _kill_writer_midway(backend: Backend, key: str) -> None:
    env = dict(os.environ, **backend.env)
    argv = [sys.executable, "-c", KILLED_WRITER, backend.url, key, env.get("CLOUDBK_ENDPOINT_URL", "")]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == b"midway", proc.stderr.read() if proc.stderr else b""
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


@pytest.mark.parametrize("backend", selected(("s3-moto", "s3-seaweedfs")), indirect=True)
def test_retention_aborts_the_uploads_of_a_killed_backup_only(
    backend: Backend, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    dead_key, live_key = (layout.backup_object_key("main", b, "base.tar.zst") for b in (DEAD, LIVE))
    _kill_writer_midway(backend, dead_key)
    storage = backend.open()
    heartbeat = Heartbeat(storage, "main", LIVE)
    heartbeat.start()
    live = storage.open_write(live_key)  # a backup still running: its upload holds parts, its heartbeat is fresh
    other = storage.open_write("other/backups/20261121T090000Z/base.tar.zst")  # another server's: not ours
    try:
        chunk = os.urandom(1024 * 1024)
        for _ in range(24):
            live.write(chunk)
            other.write(chunk)
        uploads = {u.key for u in storage.list_uploads("")}
        assert {dead_key, live_key, "other/backups/20261121T090000Z/base.tar.zst"} <= uploads
        if backend.name == "s3-seaweedfs":  # moto reports every upload as started in 2010
            assert find_stale_uploads(storage, "main", datetime.now(UTC), DAY) == []  # too young by default
        time.sleep(1.1)
        for name, value in {**backend.env, "CLOUDBK_REPO": backend.url}.items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("CLOUDBK_CONFIG", raising=False)
        argv = ["retention", "--redundancy", "1", "--stale-upload-age", "1s"]
        assert main([*argv, "--dry-run"]) == 0
        report = capsys.readouterr().out
        assert f"1 incomplete upload(s) no running backup claims would be aborted:\n  {dead_key}" in report
        assert dead_key in {u.key for u in storage.list_uploads("main/")}
        assert main(argv) == 0
        assert f"1 incomplete upload(s) no running backup claims aborted:\n  {dead_key}" in capsys.readouterr().out
        assert [u.key for u in storage.list_uploads("main/")] == [live_key]
        assert list(storage.list_uploads("other/")) != []
        assert live.commit().size == 24 * 1024 * 1024  # the running backup's upload was left whole
    finally:
        live.abort()
        other.abort()
        heartbeat.stop()
        storage.close()
