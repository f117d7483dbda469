"""A backup object holding a tar that tries to escape the destination: refused, nothing written outside."""

from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile
from datetime import UTC, datetime
from pathlib import Path

import pytest
from backends import Backend
from bkhelpers import restore, scratch_dir
from pgcluster import chown_to_pg
from synthetic import publish_backup, store_tar

from cloudbk.backup.restore import PG_CONTROL_TMP, _finish
from cloudbk.errors import ExitCode, OperationFailed
from cloudbk.repo.manifest import FileEntry, Manifest, format_time

BACKUP_ID = "20261121T090000Z"
SEG = 16 * 1024 * 1024


def _member(
    name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = ""
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.linkname = link
    return info, data


def _plant_backup(backend: Backend, members: list[tuple[tarfile.TarInfo, bytes]], pg_control: bool = True) -> None:
    """A backup with a hand-made tar (ending with a pg_control unless told not to), a manifest listing its
    files, and an index that says the WAL is there."""
    if pg_control:
        members = [*members, _member("global/pg_control", bytes(8192))]
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    files = [
        FileEntry(info.name.lstrip("/"), len(data), hashlib.sha256(data).hexdigest())
        for info, data in members
        if info.isreg()
    ]
    storage = backend.open()
    try:
        manifest = Manifest(
            id=BACKUP_ID, server="main", system_identifier="7300000000000000001", pg_version=150004, timeline=1,
            begin_lsn=2 * SEG + 0x28, end_lsn=2 * SEG + 0x100, begin_wal="000000010000000000000002",
            end_wal="000000010000000000000002", begin_time=format_time(datetime.now(UTC)),
            end_time=format_time(datetime.now(UTC)), wal_segment_size=SEG, compression="zstd",
            tars=[store_tar(storage, BACKUP_ID, raw.getvalue(), files)],
        )  # fmt: skip
        publish_backup(storage, manifest, 10)
    finally:
        storage.close()


CASES = {
    "dotdot": [_member("PG_VERSION", b"15\n"), _member("../escaped", b"pwned")],
    "absolute": [_member("PG_VERSION", b"15\n"), _member("/tmp/cloudbk-escaped-abs", b"pwned")],
    "symlink-outside": [
        _member("PG_VERSION", b"15\n"),
        _member("evil", kind=tarfile.SYMTYPE, link="../outside"),
        _member("evil/escaped", b"pwned"),
    ],
    # each link passes a check of its own text; together they lead out of DEST (issue 8, item 1)
    "link-chain": [
        _member("PG_VERSION", b"15\n"),
        _member("d", kind=tarfile.DIRTYPE),
        _member("d/up", kind=tarfile.SYMTYPE, link=".."),
        _member("d/up2", kind=tarfile.SYMTYPE, link="up/.."),
        _member("pg_wal", kind=tarfile.SYMTYPE, link="d/up2/outside"),
    ],
}
REASONS = {
    "dotdot": "contains '..'",
    "absolute": "has an absolute path",
    "symlink-outside": "pointing outside",
    "link-chain": "symbolic link 'd/up2' -> 'up/..' goes above the destination",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_escaping_members_are_refused(file_backend: Backend, case: str) -> None:
    _plant_backup(file_backend, CASES[case])
    root = scratch_dir("evil")
    outside = root / "outside"
    outside.mkdir()
    chown_to_pg(outside)
    dest = root / "dest"
    proc = restore(file_backend, dest, "--backup", BACKUP_ID, check=False)
    assert proc.returncode == ExitCode.OTHER, proc.stdout + proc.stderr
    assert REASONS[case] in proc.stderr and "incomplete" in proc.stderr
    assert sorted(p.name for p in root.iterdir()) == ["dest", "outside"]
    assert list(outside.iterdir()) == []
    assert not Path("/tmp/cloudbk-escaped-abs").exists()
    assert not (root.parent / "escaped").exists()
    assert not (dest / "global" / "pg_control").exists() and not (dest / "recovery.signal").exists()
    assert not (dest / "pg_wal").is_symlink()


def _refused(proc: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in proc.stderr, proc.stderr


@pytest.mark.parametrize("name", ["postgresql.auto.conf", "recovery.signal"])
def test_a_link_where_restore_writes_its_own_files_is_refused(file_backend: Backend, name: str) -> None:
    members = [_member("PG_VERSION", b"15\n"), _member(name, kind=tarfile.SYMTYPE, link="PG_VERSION")]
    _plant_backup(file_backend, members)
    dest = scratch_dir("evil") / "dest"
    proc = restore(file_backend, dest, "--backup", BACKUP_ID, check=False)
    _refused(proc, ExitCode.OTHER, f"{name!r} is not a regular file", "restore writes this file itself", "HINT")
    assert not (dest / "global" / "pg_control").exists() and not (dest / "recovery.signal").exists()


def test_a_manifest_without_pg_control_is_refused_before_writing(file_backend: Backend) -> None:
    _plant_backup(file_backend, [_member("PG_VERSION", b"15\n")], pg_control=False)
    dest = scratch_dir("damaged") / "dest"
    proc = restore(file_backend, dest, "--backup", BACKUP_ID, check=False)
    _refused(proc, ExitCode.OTHER, f"backup {BACKUP_ID} lists no global/pg_control", "nothing was written")
    assert not dest.exists()


def test_a_destination_whose_parent_is_not_writable_is_refused(file_backend: Backend) -> None:
    _plant_backup(file_backend, [_member("PG_VERSION", b"15\n")])
    parent = scratch_dir("readonly")
    parent.chmod(0o555)
    proc = restore(file_backend, parent / "dest", "--backup", BACKUP_ID, check=False)
    _refused(proc, ExitCode.USAGE, f"{parent / 'dest'} cannot be created: {parent} is not writable", "HINT")
    assert list(parent.iterdir()) == []


def test_a_restore_failing_after_extraction_leaves_no_recovery_signal(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    (dest / "global" / "pg_control").mkdir(parents=True)  # renaming pg_control into place will fail
    (dest / PG_CONTROL_TMP).write_bytes(bytes(8192))
    with pytest.raises(OperationFailed, match=r"failed at .*pg_control") as failure:
        _finish(str(dest), {}, {"restore_command": "true"}, BACKUP_ID, None)
    assert "cannot start" in str(failure.value)
    assert not (dest / "recovery.signal").exists() and not (dest / "global" / "pg_control").is_file()
