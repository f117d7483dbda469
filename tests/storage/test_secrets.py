"""A password in a URL (``--endpoint-url http://user:PW@host``, CLOUDBK_ENDPOINT_URL, AWS_ENDPOINT_URL, a
repository URL) never shows: not on stdout, not on stderr (the PostgreSQL log, for WAL commands), not in the
recovery settings ``restore`` writes."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import subprocess
import tarfile
from datetime import UTC, datetime
from pathlib import Path

import pytest
from backends import Backend
from pgcluster import BIN_DIR
from services.proc import free_port
from services.s3 import S3Service

from cloudbk import layout
from cloudbk.cli.main import main
from cloudbk.compression import CompressingWriter
from cloudbk.envelope import Header
from cloudbk.errors import ExitCode
from cloudbk.index import Index, update_index
from cloudbk.manifest import FileEntry, Manifest, TarEntry, format_time
from cloudbk.redact import redact_text, redact_url
from cloudbk.storage.base import Storage

SECRET = "SECRETPW"
BACKUP_ID = "20261121T090000Z"
SEG = 16 * 1024 * 1024


def test_redaction_masks_userinfo_only() -> None:
    assert redact_url("http://user:SECRETPW@127.0.0.1:9000/path?sig=abc") == "http://***@127.0.0.1:9000/path"
    assert redact_url("https://s3.example.net") == "https://s3.example.net"
    text = 'Could not connect to the endpoint URL: "http://user:p@ss@host:1/b/k" (postgresql://u:SECRETPW@db/x)'
    assert redact_text(text) == 'Could not connect to the endpoint URL: "http://***@host:1/b/k" (postgresql://***@db/x)'
    assert redact_text("s3://bucket/prefix/a@b") == "s3://bucket/prefix/a@b"  # an '@' in a path is no password


@pytest.mark.parametrize(
    "url",
    [f"s3://user:{SECRET}@bucket/p", f"gs://{SECRET}@bucket/p", f"azure://u:{SECRET}@c/p", f"file://u:{SECRET}@/x"],
)
def test_repository_url_with_a_password_is_refused_without_echoing_it(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["backup-list", "--repo", url]) == ExitCode.USAGE
    out = capsys.readouterr()
    assert "must not hold a user name or password" in out.err
    assert SECRET not in out.out + out.err


def _s3_env(service: S3Service, endpoint: str) -> dict[str, str]:
    env = service.env(endpoint_url=endpoint)
    del env["CLOUDBK_ENDPOINT_URL"]
    return env


def _wal_file(directory: Path) -> Path:
    """A segment whose first page has a PostgreSQL 15 long header (what wal-push checks before uploading)."""
    path = directory / "000000010000000000000003"
    header = struct.pack("<HHIQI4xQII", 0xD110, 0x0002, 1, 3 * SEG, 0, 7300000000000000001, SEG, 8192)
    path.write_bytes(header + bytes(SEG - len(header)))
    return path


@pytest.mark.parametrize("how", ["flag", "CLOUDBK_ENDPOINT_URL", "AWS_ENDPOINT_URL"])
def test_s3_endpoint_password_is_never_printed(
    how: str,
    s3_moto_service: S3Service,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    endpoint = f"http://user:{SECRET}@127.0.0.1:{free_port()}"  # nothing listens there
    for name, value in _s3_env(s3_moto_service, endpoint).items():
        monkeypatch.setenv(name, value)
    for name in ("CLOUDBK_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "CLOUDBK_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    flags = ["--repo", f"s3://{s3_moto_service.bucket}/secrets", "--retry-deadline", "0"]
    if how == "flag":
        flags += ["--endpoint-url", endpoint]
    else:
        monkeypatch.setenv(how, endpoint)
    commands = [
        ["wal-push", str(_wal_file(tmp_path))],
        ["wal-fetch", "000000010000000000000003", str(tmp_path / "fetched")],
        ["backup-list", "-v"],
        ["check"],
        ["check", "--json"],
        ["restore", str(tmp_path / "dest")],
        ["retention", "--redundancy", "1"],
    ]
    shown = ""
    for argv in commands:
        code = main([*argv, *flags])
        out = capsys.readouterr()
        assert code != 0, argv
        shown += out.out + out.err
    assert "127.0.0.1" in shown and "***@" in shown, shown  # the endpoint is named, without its password
    assert SECRET not in shown


def test_wal_fetch_process_logs_no_password(s3_moto_service: S3Service, tmp_path: Path) -> None:
    """The console script as restore_command runs it: its stderr goes to the PostgreSQL log."""
    endpoint = f"http://user:{SECRET}@127.0.0.1:{free_port()}"
    env = dict(os.environ, **_s3_env(s3_moto_service, endpoint))
    env.update(CLOUDBK_REPO=f"s3://{s3_moto_service.bucket}/secrets", CLOUDBK_ENDPOINT_URL=endpoint)
    argv = [str(BIN_DIR / "cloudbk-wal-fetch"), "--retry-deadline", "0", "000000010000000000000003", "pg_wal/f"]
    (tmp_path / "pg_wal").mkdir()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == ExitCode.STORAGE, proc.stderr
    assert "***@127.0.0.1" in proc.stderr and SECRET not in proc.stdout + proc.stderr


def _plant_backup(storage: Storage) -> None:
    """A tiny backup (no server needed) whose WAL the index says is archived: enough for `restore` to run."""
    members = {"PG_VERSION": b"15\n", "global/pg_control": bytes(8192)}
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    tar = raw.getvalue()
    out = io.BytesIO()
    out.write(Header(kind="tar", name="base.tar.zst", compression="zstd").encode())
    comp = CompressingWriter("zstd", out)
    comp.write(tar)
    comp.finish()
    files = [FileEntry(name, len(data), hashlib.sha256(data).hexdigest()) for name, data in members.items()]
    now = format_time(datetime.now(UTC))
    manifest = Manifest(
        id=BACKUP_ID, server="main", system_identifier="7300000000000000001", pg_version=150004, timeline=1,
        begin_lsn=2 * SEG + 0x28, end_lsn=2 * SEG + 0x100, begin_wal="000000010000000000000002",
        end_wal="000000010000000000000002", begin_time=now, end_time=now, wal_segment_size=SEG, compression="zstd",
        tars=[TarEntry("base.tar.zst", None, len(tar), hashlib.sha256(tar).hexdigest(), len(out.getvalue()), files)],
    )  # fmt: skip
    storage.put_bytes(layout.backup_object_key("main", BACKUP_ID, "base.tar.zst"), out.getvalue())
    storage.put_bytes(layout.backup_manifest_key("main", BACKUP_ID), manifest.to_json())

    def mutate(index: Index) -> bool:
        index.system_identifier, index.wal_segment_size = manifest.system_identifier, SEG
        index.add_segments(1, 1, 4)
        index.backups[BACKUP_ID] = manifest.summary()
        return True

    update_index(storage, "main", mutate)


def test_restore_writes_no_password(
    s3_moto_service: S3Service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    backend: Backend = s3_moto_service.make("secrets-restore")
    storage = backend.open()
    try:
        _plant_backup(storage)
    finally:
        storage.close()
    endpoint = f"http://user:{SECRET}@127.0.0.1:{s3_moto_service.process.port}"
    for name, value in _s3_env(s3_moto_service, endpoint).items():
        monkeypatch.setenv(name, value)
    dest = tmp_path / "dest"
    code = main(["restore", str(dest), "--repo", backend.url, "--endpoint-url", endpoint])
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    auto = (dest / "postgresql.auto.conf").read_text()
    assert f"--endpoint-url http://127.0.0.1:{s3_moto_service.process.port}" in auto  # usable, and no password
    written = "".join(p.read_text(errors="replace") for p in dest.rglob("*") if p.is_file())
    assert SECRET not in out.out + out.err + written


@pytest.mark.parametrize("scheme", ["azure", "gcs"])
def test_other_endpoints_with_a_password_are_never_printed(
    scheme: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    monkeypatch.delenv("CLOUDBK_CONFIG", raising=False)
    if scheme == "azure":
        monkeypatch.setenv("AZURE_STORAGE_ACCOUNT", "devstoreaccount1")
        monkeypatch.setenv("AZURE_STORAGE_KEY", "a2V5")
        monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
        argv = ["--repo", "azure://secrets/p", "--endpoint-url", f"http://u:{SECRET}@127.0.0.1:{port}/devstoreaccount1"]
    else:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://u:{SECRET}@127.0.0.1:{port}")
        argv = ["--repo", "gs://secrets/p"]
    shown = ""
    for command in (["backup-list"], ["check"], ["wal-fetch", "000000010000000000000003", "/nonexistent/x"]):
        assert main([*command, *argv, "--retry-deadline", "0"]) != 0
        out = capsys.readouterr()
        shown += out.out + out.err
    assert "127.0.0.1" in shown and SECRET not in shown, shown
