"""Units of issue 14 without PostgreSQL running: the drill's safety settings, stopping a detached worker by the PID
in its lock file, finding the server binaries, proof keys, and the free-space arithmetic."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cloudbk.backup.space import SpaceNeed, check_space
from cloudbk.drill.server import find_binaries, stop_workers
from cloudbk.drill.settings import command_line, ensure_postgresql_conf, safety_settings, write_auth_files
from cloudbk.errors import OperationFailed
from cloudbk.repo import layout

PG_BIN = os.environ.get("CLOUDBK_PG_BIN", "/usr/lib/postgresql/15/bin")


def test_safety_settings() -> None:
    s = safety_settings("/s/data", "/s", 5555, "/s/socket", keep_preload=False)
    must = {"listen_addresses": "127.0.0.1", "port": "5555", "unix_socket_directories": "/s/socket",
            "archive_mode": "off", "max_wal_senders": "0", "max_logical_replication_workers": "0",
            "shared_preload_libraries": "", "recovery_target_action": "promote", "data_directory": "/s/data",
            "hba_file": "/s/pg_hba.conf", "external_pid_file": "", "archive_cleanup_command": ""}  # fmt: skip
    assert {k: s[k] for k in must} == must
    kept = safety_settings("/s/data", "/s", 5555, "/s/socket", keep_preload=True)
    assert "shared_preload_libraries" not in kept
    assert "archive_library" not in safety_settings("/s/data", "/s", 1, "/s/socket", False, major=14)
    assert command_line({"a": "1", "b": "x y"}) == ["-c", "a=1", "-c", "b=x y"]


def test_stop_workers_by_the_pid_in_the_lock(tmp_path: Path) -> None:
    state = tmp_path / "pg_wal" / "cloudbk-fetch" / "abc"
    state.mkdir(parents=True)
    lock = state / "worker.lock"
    holder = (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, str(os.getpid()).encode())\n"
        "time.sleep(120)\n"
    )
    worker = subprocess.Popen([sys.executable, "-c", holder, str(lock)])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (lock.exists() and lock.read_text()):
            time.sleep(0.05)
        (tmp_path / "pg_wal" / "cloudbk-push" / "old").mkdir(parents=True)
        (tmp_path / "pg_wal" / "cloudbk-push" / "old" / "worker.lock").write_text("1")  # not held: left alone
        assert stop_workers(str(tmp_path)) == [worker.pid]
        assert worker.wait(timeout=10) != 0
    finally:
        if worker.poll() is None:
            worker.kill()
    assert stop_workers(str(tmp_path)) == []


def test_find_binaries() -> None:
    assert find_binaries(15, PG_BIN) == PG_BIN
    with pytest.raises(OperationFailed, match=r"no PostgreSQL 14 server binaries found.*is PostgreSQL 15"):
        find_binaries(14, PG_BIN)
    assert os.path.isfile(os.path.join(find_binaries(15, None), "postgres"))


def test_proof_keys() -> None:
    key = layout.proof_key("main", "drill", "20261201T010203Z", "20261201T020304.123456Z", "ok")
    assert key == "main/proofs/drill/20261201T010203Z/20261201T020304.123456Z-ok.json"
    assert layout.parse_proof_key("main", key) == ("drill", "20261201T010203Z", "20261201T020304.123456Z", "ok")
    for other in ("main/proofs/drill/x/20261201T020304Z-ok.json", "main/proofs/other/20261201T010203Z/a-ok.json",
                  "main/proofs/verify/20261201T010203Z/20261201T020304Z-maybe.json", "main/index.json"):  # fmt: skip
        assert layout.parse_proof_key("main", other) is None


def test_check_space_names_the_directory() -> None:
    check_space([SpaceNeed("/a", 10, 10, ["/a"])])
    with pytest.raises(
        OperationFailed, match=r"not enough free space for the restore at /a, /b: it needs about 2\.0 MiB"
    ):
        check_space([SpaceNeed("/a", 2 * 1024**2, 1024, ["/a", "/b"])])


def test_config_files(tmp_path: Path) -> None:
    assert ensure_postgresql_conf(str(tmp_path), None)  # the backup had none (Debian): one is written
    assert not ensure_postgresql_conf(str(tmp_path), None)  # never replaced
    write_auth_files(str(tmp_path), None)
    hba = (tmp_path / "pg_hba.conf").read_text().splitlines()
    assert "local all all trust" in hba and "host all all 0.0.0.0/0 reject" in hba
    assert not [line for line in hba if line.startswith("host") and "reject" not in line]
