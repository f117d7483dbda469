"""The console scripts as PostgreSQL runs them: separate processes, as the postgres user, on every backend."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from backends import NETWORK_BACKENDS, Backend, selected
from pgcluster import BIN_DIR, chown_to_pg, run_as_pg
from walhelpers import cloudbk_env, segment_bytes, write_segment

from cloudbk.errors import ExitCode
from cloudbk.repo import layout
from cloudbk.repo.index import load_index

SEG3 = "000000010000000000000003"


def push(env: dict[str, str], path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return run_as_pg([str(BIN_DIR / "cloudbk-wal-push"), *flags, str(path)], env=env, check=False, timeout=120)


def fetch(env: dict[str, str], name: str, dest: str, cwd: str = "/", *flags: str) -> subprocess.CompletedProcess[str]:
    argv = [str(BIN_DIR / "cloudbk-wal-fetch"), *flags, name, dest]
    return run_as_pg(argv, env=env, check=False, cwd=cwd, timeout=120)


def pg_file(directory: Path, name: str, data: bytes) -> Path:
    path = directory / name
    path.write_bytes(data)
    chown_to_pg(path)
    return path


def test_duplicate_push(pg_backend: Backend, pg_dirs: Callable[[str], Path]) -> None:
    env = cloudbk_env(pg_backend)
    work = pg_dirs("dup")
    src = pg_file(work, SEG3, segment_bytes(1, 3))
    first = push(env, src)
    assert first.returncode == 0, first.stderr
    assert first.stderr.count("\n") == 1 and f"pushed {SEG3} (16.0 MiB -> " in first.stderr

    storage = pg_backend.open()
    key = layout.wal_key("main", SEG3)
    stored, info = storage.get_bytes(key), storage.stat(key)

    again = push(env, src)
    assert again.returncode == 0, again.stderr
    assert "already archived with identical content" in again.stderr

    forked_dir = pg_dirs("fork")
    forked = pg_file(forked_dir, SEG3, segment_bytes(1, 3, seed="a second cluster"))
    refused = push(env, forked)
    assert refused.returncode == ExitCode.OTHER, refused.stderr
    assert SEG3 in refused.stderr and "different content" in refused.stderr
    assert "two clusters" in refused.stderr and "HINT" in refused.stderr
    assert storage.get_bytes(key) == stored
    assert storage.stat(key).version == info.version
    assert load_index(storage, "main").segments == {1: [[3, 3]]}


def test_partial_backup_and_history_files(pg_backend: Backend, pg_dirs: Callable[[str], Path]) -> None:
    env = cloudbk_env(pg_backend)
    work, out = pg_dirs("other"), pg_dirs("out")
    files = {
        f"{SEG3}.partial": segment_bytes(1, 3, seed="partial"),
        f"{SEG3}.00000028.backup": b"START WAL LOCATION: 0/3000028 (file 000000010000000000000003)\n",
        "00000002.history": b"1\t0/3000090\tno recovery target specified\n",
    }
    for name, data in files.items():
        result = push(env, pg_file(work, name, data))
        assert result.returncode == 0, result.stderr
    for name, data in files.items():
        result = fetch(env, name, str(out / name))
        assert result.returncode == 0, result.stderr
        assert (out / name).read_bytes() == data
    # the full segment is not in the archive, only its .partial: never served in its place
    assert fetch(env, SEG3, str(out / "RECOVERYXLOG")).returncode == 1
    assert not (out / "RECOVERYXLOG").exists()
    # a timeline history file is never overwritten
    other = pg_dirs("other-history")
    refused = push(env, pg_file(other, "00000002.history", b"1\t0/5000000\tanother promotion\n"))
    assert refused.returncode == ExitCode.OTHER, refused.stderr
    assert "never overwritten" in refused.stderr
    index = load_index(pg_backend.open(), "main")
    assert [e.timeline for e in index.histories[2]] == [1]
    assert index.other_files == sorted(n for n in files if not n.endswith(".history"))


def test_fetch_absent_corrupt_and_recovery_exit_codes(pg_backend: Backend, pg_dirs: Callable[[str], Path]) -> None:
    env = cloudbk_env(pg_backend)
    work = pg_dirs("fetch")
    src = pg_file(work, SEG3, segment_bytes(1, 3))
    assert push(env, src).returncode == 0
    out = pg_dirs("out")

    ok = fetch(env, SEG3, str(out / "RECOVERYXLOG"))
    assert ok.returncode == 0, ok.stderr
    assert (out / "RECOVERYXLOG").read_bytes() == src.read_bytes()
    os.unlink(out / "RECOVERYXLOG")

    absent = fetch(env, "000000010000000000000004", str(out / "RECOVERYXLOG"))
    assert absent.returncode == 1, absent.stderr
    assert "is not in the archive" in absent.stderr
    assert fetch(env, "00000002.history", str(out / "RECOVERYHISTORY")).returncode == 1

    storage = pg_backend.open()
    key = layout.wal_key("main", SEG3)
    data = bytearray(storage.get_bytes(key))
    data[len(data) // 2] ^= 0xFF
    storage.put_bytes(key, bytes(data))
    corrupt = fetch(env, SEG3, str(out / "RECOVERYXLOG"))
    assert corrupt.returncode == ExitCode.OTHER, corrupt.stderr
    assert key in corrupt.stderr and "corrupt" in corrupt.stderr
    assert sorted(os.listdir(out)) == []  # DEST not created, no temporary file left

    # the same corrupt object while the server is in archive recovery: stop it, never let it promote
    datadir = pg_dirs("pgdata")
    for name in ("PG_VERSION", "recovery.signal"):
        pg_file(datadir, name, b"15\n" if name == "PG_VERSION" else b"")
    fatal = fetch(env, SEG3, str(out / "RECOVERYXLOG"), str(datadir))
    assert fatal.returncode == ExitCode.FETCH_FATAL, fatal.stderr
    assert "exiting with 126" in fatal.stderr
    assert sorted(os.listdir(out)) == []


def _imported_modules(argv: list[str], env: dict[str, str]) -> tuple[int, list[str], str]:
    script = (
        "import json, sys\n"
        "from cloudbk.cli.main import main\n"
        "rc = main(sys.argv[1:])\n"
        "print(json.dumps({'rc': rc, 'modules': sorted(sys.modules)}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, *argv], env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    return int(doc["rc"]), list(doc["modules"]), proc.stderr


CLOUD_SDKS = ("boto3", "botocore", "s3transfer", "azure", "google", "psycopg", "requests", "urllib3")


def test_file_repository_imports_no_cloud_sdk(tmp_path: Path) -> None:
    env = {"CLOUDBK_REPO": f"file://{tmp_path / 'repo'}"}
    src = write_segment(tmp_path, 1, 3)
    rc, modules, err = _imported_modules(["wal-push", str(src)], env)
    assert rc == 0, err
    loaded = sorted({m.split(".")[0] for m in modules} & set(CLOUD_SDKS))
    assert loaded == [], f"a file:// wal-push imported {loaded}"
    rc, modules, err = _imported_modules(["wal-fetch", SEG3, str(tmp_path / "RECOVERYXLOG")], env)
    assert rc == 0, err
    loaded = sorted({m.split(".")[0] for m in modules} & set(CLOUD_SDKS))
    assert loaded == [], f"a file:// wal-fetch imported {loaded}"
    assert "zstandard" in modules  # the test would not notice a broken probe otherwise


@pytest.mark.parametrize("pg_backend", selected(("s3-moto", "s3-seaweedfs")), indirect=True)
def test_s3_repository_imports_only_the_s3_client(pg_backend: Backend, tmp_path: Path) -> None:
    src = write_segment(tmp_path, 1, 3)
    rc, modules, err = _imported_modules(["wal-push", str(src)], cloudbk_env(pg_backend))
    assert rc == 0, err
    roots = {m.split(".")[0] for m in modules}
    assert "botocore" in roots
    assert sorted(roots & {"azure", "google", "psycopg", "s3transfer"}) == []


@pytest.mark.parametrize("pg_backend", selected(NETWORK_BACKENDS), indirect=True)
def test_sigterm_during_a_fetch_removes_the_temporary_file(pg_backend: Backend, tmp_path: Path) -> None:
    """PostgreSQL stops a restore_command with SIGTERM on fast shutdown; it must die of that signal (PostgreSQL
    tells a shutdown from a failure that way) and leave nothing behind."""
    assert pg_backend.unreachable_env is not None
    env = cloudbk_env(pg_backend, **pg_backend.unreachable_env)
    env["CLOUDBK_RETRY_DEADLINE"] = "60"
    proc = subprocess.Popen(
        [str(BIN_DIR / "cloudbk-wal-fetch"), SEG3, str(tmp_path / "RECOVERYXLOG")],
        env={**os.environ, **env},
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not os.listdir(tmp_path):  # the temporary file appears once the fetch is under way
        assert time.monotonic() < deadline and proc.poll() is None, "the fetch did not start"
        time.sleep(0.05)
    time.sleep(0.3)  # retrying the unreachable storage by now
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGTERM, (proc.returncode, err)
    assert "terminated by SIGTERM" in err
    assert os.listdir(tmp_path) == []
