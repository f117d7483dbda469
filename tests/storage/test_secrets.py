"""A password in a URL (``--endpoint-url http://user:PW@host``, CLOUDBK_ENDPOINT_URL, AWS_ENDPOINT_URL, a
repository URL) never shows: not on stdout, not on stderr (the PostgreSQL log, for WAL commands), not in the
recovery settings ``restore`` writes."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from backends import Backend
from pgcluster import BIN_DIR
from services.proc import free_port
from services.s3 import S3Service
from synthetic import plant_backup, segment_file

from cloudbk.cli.main import RedactingFormatter, _excepthook, main
from cloudbk.errors import ExitCode
from cloudbk.redact import redact_text, redact_url

SECRET = "SECRETPW"


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
    monkeypatch.setenv("PGHOST", str(tmp_path))  # `check` finds no server there, at once
    flags = ["--repo", f"s3://{s3_moto_service.bucket}/secrets", "--retry-deadline", "0"]
    if how == "flag":
        flags += ["--endpoint-url", endpoint]
    else:
        monkeypatch.setenv(how, endpoint)
    commands = [
        ["wal-push", str(segment_file(tmp_path, 1, 3))],
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


def test_restore_writes_no_password(
    s3_moto_service: S3Service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    backend: Backend = s3_moto_service.make("secrets-restore")
    storage = backend.open()
    try:
        plant_backup(storage)
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
    scheme: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    monkeypatch.delenv("CLOUDBK_CONFIG", raising=False)
    monkeypatch.setenv("PGHOST", str(tmp_path))  # `check` finds no server there, at once
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


def test_unexpected_tracebacks_and_log_lines_are_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        raise RuntimeError(f"boom at http://u:{SECRET}@127.0.0.1:1/x")
    except RuntimeError as exc:
        _excepthook(RuntimeError, exc, exc.__traceback__)
    err = capsys.readouterr().err
    assert "RuntimeError: boom at http://***@127.0.0.1:1/x" in err and SECRET not in err
    record = logging.LogRecord("cloudbk", logging.ERROR, __file__, 1, "%s", (f"s3 at http://k:{SECRET}@h",), None)
    assert RedactingFormatter("%(message)s").format(record) == "s3 at http://***@h"
    # an SDK's own warnings (loggers without a handler) go through logging's last resort, redacted as well
    script = (
        "import logging, sys; from cloudbk.cli.main import _setup_logging; _setup_logging('wal-fetch', False); "
        "logging.getLogger('botocore.endpoint').warning('SDK text about %s', sys.argv[1])"
    )
    proc = subprocess.run([sys.executable, "-c", script, f"http://k:{SECRET}@h"], capture_output=True, text=True)
    assert proc.stderr == "SDK text about http://***@h\n"
