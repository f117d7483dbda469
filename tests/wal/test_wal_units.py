"""wal-push / wal-fetch use cases against the in-memory backend: the fast paths and the failure modes."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import pytest
from backends import unique_prefix
from walhelpers import SYSID, segment_bytes, write_file, write_segment

from cloudbk.cli import wal_fetch
from cloudbk.cli.main import main
from cloudbk.errors import (
    AccessDenied,
    ArchiveNotConfigured,
    ConflictError,
    ExitCode,
    IndexUpdateFailed,
    IntegrityError,
    NotFound,
    OperationFailed,
    PermanentError,
    TransientError,
    UsageError,
)
from cloudbk.pg.walnames import parse_lsn
from cloudbk.repo import layout
from cloudbk.repo.compression import ALGORITHMS
from cloudbk.repo.envelope import Header
from cloudbk.repo.index import load_index
from cloudbk.repo.objects import WAL, create_object, read_object
from cloudbk.storage.base import Storage
from cloudbk.storage.memory import MemoryStorage
from cloudbk.storage.registry import StorageOptions, open_storage
from cloudbk.wal.fetch import fetch_wal
from cloudbk.wal.push import push_wal, stage_wal

SERVER = "main"
SEG3 = "000000010000000000000003"


@pytest.fixture
def url() -> str:
    return f"memory://{unique_prefix('walunit')}"


@pytest.fixture
def storage(url: str) -> Iterator[Storage]:
    s = open_storage(url, StorageOptions(retry_deadline=0.5))
    yield s
    s.close()


def driver(url: str) -> MemoryStorage:
    return MemoryStorage.named(url)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# -- push ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_push_then_fetch_round_trip(storage: Storage, tmp_path: Path, algo: str) -> None:
    src = write_segment(tmp_path, 1, 3)
    result = push_wal(storage, SERVER, str(src), algo)
    assert (result.name, result.size, result.already_archived, result.compression) == (SEG3, 16 << 20, False, algo)
    assert result.key == layout.wal_key(SERVER, SEG3) == "main/wal/00000001/000000010000000000000003"
    if algo != "none":
        assert result.stored_size < 1 << 20  # mostly zeros: compressed
    dest = tmp_path / "out" / "RECOVERYXLOG"
    dest.parent.mkdir()
    fetched = fetch_wal(storage, SERVER, SEG3, str(dest))
    assert dest.read_bytes() == src.read_bytes()
    assert (fetched.size, fetched.stored_size, fetched.compression) == (16 << 20, result.stored_size, algo)
    assert leftovers(dest.parent) == ["RECOVERYXLOG"]


def test_push_records_the_index(storage: Storage, tmp_path: Path) -> None:
    for segno in (3, 4, 6):
        push_wal(storage, SERVER, str(write_segment(tmp_path, 1, segno)), "zstd")
    label = write_file(tmp_path, "000000010000000000000003.00000028.backup", b"START WAL LOCATION: 0/3000028\n")
    push_wal(storage, SERVER, str(label), "zstd")
    history = write_file(tmp_path, "00000002.history", b"1\t0/5000090\tbefore 2026-01-01\n")
    push_wal(storage, SERVER, str(history), "zstd")
    partial = tmp_path / "000000010000000000000005.partial"
    partial.write_bytes(segment_bytes(1, 5))
    push_wal(storage, SERVER, str(partial), "zstd")

    index = load_index(storage, SERVER)
    assert index.system_identifier == str(SYSID)
    assert index.wal_segment_size == 16 << 20
    assert index.segments == {1: [[3, 4], [6, 6]]}
    assert [(e.timeline, e.switchpoint) for e in index.histories[2]] == [(1, parse_lsn("0/5000090"))]
    assert index.other_files == ["000000010000000000000003.00000028.backup", "000000010000000000000005.partial"]
    keys = [i.key for i in storage.list("main/wal/")]
    assert keys == [
        "main/wal/00000001/000000010000000000000003",
        "main/wal/00000001/000000010000000000000003.00000028.backup",
        "main/wal/00000001/000000010000000000000004",
        "main/wal/00000001/000000010000000000000005.partial",
        "main/wal/00000001/000000010000000000000006",
        "main/wal/history/00000002.history",
    ]


def test_duplicate_push_with_same_content_succeeds_without_writing(url: str, storage: Storage, tmp_path: Path) -> None:
    src = write_segment(tmp_path, 1, 3)
    push_wal(storage, SERVER, str(src), "zstd")
    before = storage.stat(layout.wal_key(SERVER, SEG3))
    again = push_wal(storage, SERVER, str(src), "lz4")  # a different codec does not matter: content does
    assert again.already_archived
    assert storage.stat(layout.wal_key(SERVER, SEG3)) == before


def test_duplicate_push_with_different_content_is_refused(storage: Storage, tmp_path: Path) -> None:
    src = write_segment(tmp_path, 1, 3)
    push_wal(storage, SERVER, str(src), "zstd")
    key = layout.wal_key(SERVER, SEG3)
    stored, version = storage.get_bytes(key), storage.stat(key).version
    other = tmp_path / "other"
    other.mkdir()
    forked = write_segment(other, 1, 3, seed="another cluster with the same system identifier")
    with pytest.raises(ConflictError) as err:
        push_wal(storage, SERVER, str(forked), "zstd")
    assert SEG3 in str(err.value) and "different content" in str(err.value)
    assert "two clusters" in str(err.value) and "promoted" in str(err.value)
    assert err.value.exit_code == ExitCode.OTHER
    assert storage.get_bytes(key) == stored and storage.stat(key).version == version


def test_history_file_is_never_overwritten(storage: Storage, tmp_path: Path) -> None:
    push_wal(storage, SERVER, str(write_file(tmp_path, "00000002.history", b"1\t0/5000090\tfirst\n")), "zstd")
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(ConflictError) as err:
        push_wal(storage, SERVER, str(write_file(other, "00000002.history", b"1\t0/7000000\tsecond\n")), "zstd")
    assert "never overwritten" in str(err.value)
    dest = tmp_path / "h"
    fetch_wal(storage, SERVER, "00000002.history", str(dest))
    assert dest.read_bytes() == b"1\t0/5000090\tfirst\n"


def test_segment_of_another_cluster_is_refused_before_writing(storage: Storage, tmp_path: Path) -> None:
    push_wal(storage, SERVER, str(write_segment(tmp_path, 1, 3)), "zstd")
    other = tmp_path / "other"
    other.mkdir()
    foreign = write_segment(other, 1, 4, sysid=SYSID + 1)
    with pytest.raises(ConflictError) as err:
        push_wal(storage, SERVER, str(foreign), "zstd")
    assert str(SYSID + 1) in str(err.value) and str(SYSID) in str(err.value)
    assert "--server" in str(err.value)
    assert not storage.exists(layout.wal_key(SERVER, "000000010000000000000004"))
    # under its own server name it is welcome
    push_wal(storage, "other-cluster", str(foreign), "zstd")


@pytest.mark.parametrize(
    ("name", "data", "error"),
    [
        ("not-a-wal-file", b"x", UsageError),
        (SEG3, segment_bytes(1, 3)[: 8 << 20], IntegrityError),  # truncated segment
        (SEG3, segment_bytes(1, 4), IntegrityError),  # holds another segment's WAL
        (SEG3, bytes(16 << 20), IntegrityError),  # no page header at all
    ],
)
def test_push_refuses_files_that_are_not_what_their_name_says(
    storage: Storage, tmp_path: Path, name: str, data: bytes, error: type[Exception]
) -> None:
    with pytest.raises(error):
        push_wal(storage, SERVER, str(write_file(tmp_path, name, data)), "zstd")
    assert list(storage.list("")) == []


def test_push_of_missing_file(storage: Storage, tmp_path: Path) -> None:
    with pytest.raises(OperationFailed, match="does not exist"):
        push_wal(storage, SERVER, str(tmp_path / SEG3), "zstd")


def test_push_survives_transient_faults(url: str, storage: Storage, tmp_path: Path) -> None:
    driver(url).inject("commit", times=2)
    driver(url).inject("open_read", times=1)
    push_wal(storage, SERVER, str(write_segment(tmp_path, 1, 3)), "zstd")
    assert load_index(storage, SERVER).has_segment(1, 3)


def test_push_fails_when_storage_stays_down_and_stores_nothing(url: str, storage: Storage, tmp_path: Path) -> None:
    driver(url).inject("commit", times=1000)
    with pytest.raises(TransientError):
        push_wal(storage, SERVER, str(write_segment(tmp_path, 1, 3)), "zstd")
    assert list(driver(url).list("")) == []


def test_index_update_failure_fails_the_push_but_keeps_the_segment(url: str, storage: Storage, tmp_path: Path) -> None:
    src = write_segment(tmp_path, 1, 3)
    # the first commit (the segment) succeeds; every later one (the index) fails until the deadline
    driver(url).inject("commit", after=1, times=1000)
    with pytest.raises(IndexUpdateFailed) as err:
        push_wal(storage, SERVER, str(src), "zstd")
    assert err.value.exit_code == ExitCode.STORAGE
    assert "stored durably" in str(err.value) and "retry" in str(err.value)
    assert storage.exists(layout.wal_key(SERVER, SEG3))
    assert not storage.exists(layout.index_key(SERVER))
    driver(url).faults.clear()
    # PostgreSQL's retry: the identical object is found and the index catches up
    assert push_wal(storage, SERVER, str(src), "zstd").already_archived
    assert load_index(storage, SERVER).has_segment(1, 3)


def test_push_over_a_corrupt_stored_object_is_refused(url: str, storage: Storage, tmp_path: Path) -> None:
    src = write_segment(tmp_path, 1, 3)
    push_wal(storage, SERVER, str(src), "zstd")
    key = layout.wal_key(SERVER, SEG3)
    damaged = _flip_last_byte(storage, key)
    with pytest.raises(IntegrityError, match="corrupt") as err:
        push_wal(storage, SERVER, str(src), "zstd")
    assert "nothing was overwritten" in str(err.value)
    assert storage.get_bytes(key) == damaged


# -- fetch -----------------------------------------------------------------------------------------------


def _flip_last_byte(storage: Storage, key: str) -> bytes:
    data = bytearray(storage.get_bytes(key))
    data[-10] ^= 0xFF
    storage.put_bytes(key, bytes(data))
    return bytes(data)


def _pushed(storage: Storage, tmp_path: Path, algo: str = "zstd") -> Path:
    src = write_segment(tmp_path, 1, 3)
    push_wal(storage, SERVER, str(src), algo)
    return src


def _assert_not_created(dest: Path) -> None:
    assert not dest.exists()
    assert leftovers(dest.parent) == [], "temporary files were left behind"


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    d = tmp_path / "pg_wal"
    d.mkdir()
    return d / "RECOVERYXLOG"


def test_fetch_absent_file_is_not_found(storage: Storage, tmp_path: Path, dest: Path) -> None:
    _pushed(storage, tmp_path)
    for name in ("000000010000000000000004", "00000002.history"):
        with pytest.raises(NotFound):
            fetch_wal(storage, SERVER, name, str(dest))
        _assert_not_created(dest)


def test_fetch_from_a_repository_without_archive_is_not_absent(storage: Storage, dest: Path) -> None:
    with pytest.raises(ArchiveNotConfigured) as err:
        fetch_wal(storage, SERVER, SEG3, str(dest))
    assert not isinstance(err.value, NotFound)
    assert "CLOUDBK_SERVER" in str(err.value)
    _assert_not_created(dest)


def test_partial_is_never_served_for_a_full_segment_name(storage: Storage, tmp_path: Path, dest: Path) -> None:
    push_wal(storage, SERVER, str(write_file(tmp_path, "00000001000000000000000A", segment_bytes(1, 10))), "zstd")
    partial = write_file(tmp_path, "000000010000000000000003.partial", segment_bytes(1, 3))
    push_wal(storage, SERVER, str(partial), "zstd")
    with pytest.raises(NotFound):
        fetch_wal(storage, SERVER, SEG3, str(dest))
    _assert_not_created(dest)
    # even a .partial object copied under the full name is recognised by its header and refused
    partial_key = layout.wal_key(SERVER, "000000010000000000000003.partial")
    storage.put_bytes(layout.wal_key(SERVER, SEG3), storage.get_bytes(partial_key))
    with pytest.raises(IntegrityError, match="not WAL file"):
        fetch_wal(storage, SERVER, SEG3, str(dest))
    _assert_not_created(dest)
    fetch_wal(storage, SERVER, "000000010000000000000003.partial", str(dest))
    assert dest.read_bytes() == partial.read_bytes()


@pytest.mark.parametrize("algo", ["zstd", "lz4", "gzip", "none"])
def test_fetch_of_corrupt_object_never_creates_dest(storage: Storage, tmp_path: Path, dest: Path, algo: str) -> None:
    _pushed(storage, tmp_path, algo)
    _flip_last_byte(storage, layout.wal_key(SERVER, SEG3))
    with pytest.raises(IntegrityError) as err:
        fetch_wal(storage, SERVER, SEG3, str(dest))
    assert layout.wal_key(SERVER, SEG3) in str(err.value)
    _assert_not_created(dest)


def _rewrite(storage: Storage, key: str, header: Header, payload: bytes) -> None:
    storage.put_bytes(key, header.encode() + payload)


def test_fetch_of_truncated_or_broken_zstd_frame(storage: Storage, tmp_path: Path, dest: Path) -> None:
    _pushed(storage, tmp_path)
    key = layout.wal_key(SERVER, SEG3)
    data = storage.get_bytes(key)
    middle = len(data) // 2
    flipped = data[:middle] + bytes([data[middle] ^ 0x55]) + data[middle + 1 :]
    # (a frame missing only its 4-byte trailing checksum still yields the whole content, which the SHA-256
    # proves intact; cuts that lose content are what matter)
    for broken in (data[:middle], data[:-2000], flipped, data[:60] + b"\x00" * 40 + data[100:]):
        storage.put_bytes(key, broken)
        with pytest.raises(IntegrityError):
            fetch_wal(storage, SERVER, SEG3, str(dest))
        _assert_not_created(dest)


def test_fetch_refuses_content_that_does_not_match_the_header(storage: Storage, tmp_path: Path, dest: Path) -> None:
    src = _pushed(storage, tmp_path, "none")
    key = layout.wal_key(SERVER, SEG3)
    good = src.read_bytes()
    lying = Header(kind="wal", name=SEG3, compression="none", sha256=sha(good), size=len(good))
    for payload in (good + b"extra", good[:-1] + b"\x01"):
        _rewrite(storage, key, lying, payload)
        with pytest.raises(IntegrityError):
            fetch_wal(storage, SERVER, SEG3, str(dest))
        _assert_not_created(dest)
    storage.put_bytes(key, b"not a cloudbk object at all" * 10)
    with pytest.raises(IntegrityError, match="not a cloudbk object"):
        fetch_wal(storage, SERVER, SEG3, str(dest))
    _assert_not_created(dest)


def test_fetch_of_a_stream_cut_short_is_an_integrity_error(
    url: str, storage: Storage, tmp_path: Path, dest: Path
) -> None:
    _pushed(storage, tmp_path, "none")
    driver(url).inject("read", after=3, truncate=True)
    with pytest.raises(IntegrityError):
        fetch_wal(storage, SERVER, SEG3, str(dest))
    _assert_not_created(dest)


def test_fetch_rides_out_transient_faults(url: str, storage: Storage, tmp_path: Path, dest: Path) -> None:
    src = _pushed(storage, tmp_path)
    driver(url).inject("open_read", times=2)
    driver(url).inject("read", after=2, times=2)
    fetch_wal(storage, SERVER, SEG3, str(dest))
    assert dest.read_bytes() == src.read_bytes()


def test_fetch_when_storage_stays_down(url: str, storage: Storage, tmp_path: Path, dest: Path) -> None:
    _pushed(storage, tmp_path)
    driver(url).inject("open_read", times=1000)
    with pytest.raises(TransientError):
        fetch_wal(storage, SERVER, SEG3, str(dest))
    _assert_not_created(dest)


def test_read_object_reports_sizes(storage: Storage, tmp_path: Path) -> None:
    src = _pushed(storage, tmp_path)
    key = layout.wal_key(SERVER, SEG3)
    stored = read_object(storage, key, WAL, SEG3)
    assert (stored.sha256, stored.size, stored.stored_size) == (sha(src.read_bytes()), 16 << 20, storage.stat(key).size)


# -- exit codes ------------------------------------------------------------------------------------------


def _datadir(tmp_path: Path, *signals: str) -> Path:
    d = tmp_path / "pgdata"
    d.mkdir()
    (d / "PG_VERSION").write_text("15\n")
    for s in signals:
        (d / s).touch()
    return d


ERRORS = {
    "absent": NotFound("x"),
    "storage": TransientError("x"),
    "denied": AccessDenied("x"),
    "permanent": PermanentError("x"),
    "corrupt": IntegrityError("x"),
    "usage": UsageError("x"),
    "not-configured": ArchiveNotConfigured("x"),
    "failed": OperationFailed("x"),
}


# Exit codes in standby mode and outside recovery: only "absent" is 1, storage failures are 2.
_OUTSIDE_ARCHIVE_RECOVERY = {
    "absent": 1,
    "storage": 2,
    "denied": 2,
    "permanent": 2,
    "corrupt": 4,
    "usage": 3,
    "not-configured": 3,
    "failed": 4,
}


@pytest.mark.parametrize(
    ("signals", "expected"),
    [
        (
            ("recovery.signal",),
            {
                "absent": 1,
                "storage": 126,
                "denied": 126,
                "permanent": 126,
                "corrupt": 126,
                "usage": 126,
                "not-configured": 126,
                "failed": 126,
            },
        ),
        (
            ("standby.signal",),
            _OUTSIDE_ARCHIVE_RECOVERY,
        ),
        (
            ("standby.signal", "recovery.signal"),  # standby.signal wins, as in PostgreSQL
            _OUTSIDE_ARCHIVE_RECOVERY,
        ),
        (
            (),
            _OUTSIDE_ARCHIVE_RECOVERY,
        ),
    ],
)
def test_fetch_exit_codes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signals: tuple[str, ...], expected: dict[str, int]
) -> None:
    monkeypatch.delenv("PGDATA", raising=False)
    monkeypatch.chdir(_datadir(tmp_path, *signals))
    got = {name: wal_fetch.exit_code_for(exc, None) for name, exc in ERRORS.items()}
    assert got == expected
    assert 143 not in got.values()


def test_fetch_mode_from_pgdata_when_cwd_is_not_a_data_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    datadir = _datadir(tmp_path, "recovery.signal")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("PGDATA", str(datadir))
    assert wal_fetch.exit_code_for(TransientError("x"), None) == ExitCode.FETCH_FATAL


def test_cli_fetch_exit_codes_in_process(
    url: str, storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _pushed(storage, tmp_path)
    monkeypatch.delenv("PGDATA", raising=False)
    datadir = _datadir(tmp_path, "recovery.signal")
    (datadir / "pg_wal").mkdir()
    monkeypatch.chdir(datadir)
    dest = "pg_wal/RECOVERYXLOG"
    assert main(["wal-fetch", "--repo", url, SEG3, dest]) == 0
    assert (datadir / dest).read_bytes() == src.read_bytes()
    os.unlink(datadir / dest)
    assert main(["wal-fetch", "--repo", url, "000000010000000000000009", dest]) == 1
    err = capsys.readouterr().err
    assert "INFO: 000000010000000000000009 is not in the archive" in err
    assert "ERROR" not in err
    # anything but "absent" stops a server in archive recovery, even a usage error
    assert main(["wal-fetch", "--repo", url, "--bogus-flag", SEG3, dest]) == 126
    assert main(["wal-fetch", SEG3, dest]) == 126  # no repository configured
    driver(url).inject("open_read", times=1000)
    assert main(["wal-fetch", "--repo", url, "--retry-deadline", "0.2", SEG3, dest]) == 126
    err = capsys.readouterr().err
    assert "exiting with 126" in err and "HINT" in err
    assert not os.path.exists(datadir / dest)
    os.unlink(datadir / "recovery.signal")
    assert main(["wal-fetch", "--repo", url, "--retry-deadline", "0.2", SEG3, dest]) == 2


def test_cli_push_logs_one_line(url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_segment(tmp_path, 1, 3)
    assert main(["wal-push", "--repo", url, str(src)]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"cloudbk wal-push: INFO: pushed {SEG3} (16.0 MiB -> ")
    assert "zstd) in " in lines[0]
    assert main(["wal-push", "--repo", url, str(src)]) == 0
    assert "already archived with identical content" in capsys.readouterr().err
    assert main(["wal-push", "--repo", url, "--verbose", str(src)]) == 0
    assert "DEBUG" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    forked = write_segment(other, 1, 3, seed="fork")
    assert main(["wal-push", "--repo", url, str(forked)]) == ExitCode.OTHER
    err = capsys.readouterr().err
    assert SEG3 in err and "HINT" in err


# -- the push-ahead worker's buffered push (read once, hashed once) -----------------------------------------


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_buffered_stage_stores_what_a_streamed_push_stores(storage: Storage, tmp_path: Path, algo: str) -> None:
    src = write_segment(tmp_path, 1, 3)
    staged = stage_wal(storage, SERVER, str(src), algo, buffer=threading.BoundedSemaphore(1))
    assert (staged.local.sha256, staged.local.size, staged.already_archived) == (sha(src.read_bytes()), 16 << 20, False)
    dest = tmp_path / "RECOVERYXLOG"
    fetch_wal(storage, SERVER, SEG3, str(dest))  # verifies the header's SHA-256 against the content
    assert dest.read_bytes() == src.read_bytes()
    # the same file again is an identical duplicate; a different one is a conflict, as for a streamed push
    assert stage_wal(storage, SERVER, str(src), algo, buffer=threading.BoundedSemaphore(1)).already_archived
    other = tmp_path / "other"
    other.mkdir()
    forked = write_segment(other, 1, 3, seed="forked")
    with pytest.raises(ConflictError):
        stage_wal(storage, SERVER, str(forked), algo, buffer=threading.BoundedSemaphore(1))


def test_buffered_stage_refuses_what_a_streamed_push_refuses(storage: Storage, tmp_path: Path) -> None:
    push_wal(storage, SERVER, str(write_segment(tmp_path, 1, 3)), "zstd")
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(ConflictError):  # another cluster's segment, before anything is written
        stage_wal(storage, SERVER, str(write_segment(other, 1, 4, sysid=SYSID + 1)), "zstd", buffer=nullcontext())
    assert not storage.exists(layout.wal_key(SERVER, "000000010000000000000004"))
    truncated = other / "000000010000000000000005"
    truncated.write_bytes(write_segment(other, 1, 5).read_bytes()[: 8 << 20])
    with pytest.raises(IntegrityError, match="truncated"):
        stage_wal(storage, SERVER, str(truncated), "zstd", buffer=nullcontext())


def test_an_unhashed_write_needs_the_checksum(storage: Storage) -> None:
    with pytest.raises(ValueError):
        create_object(storage, "k", WAL, "name", "zstd", hashing=False)
