"""Base backup pieces without a server: what is copied from PGDATA, vanishing files, the bounded WAL wait."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from cloudbk.backup.take import wait_for_wal
from cloudbk.backup.volumes import Counter, Piece, VolumeWriter
from cloudbk.errors import OperationFailed, UsageError
from cloudbk.pg.datadir import scan_data_directory, scan_tablespace
from cloudbk.pg.walnames import segment_name
from cloudbk.progress import NoProgress
from cloudbk.repo import layout
from cloudbk.repo.compression import DecompressingReader
from cloudbk.repo.envelope import read_header
from cloudbk.repo.index import Index, update_index
from cloudbk.storage.memory import MemoryStorage


def _touch(root: Path, rel: str, data: bytes = b"x") -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _fake_pgdata(tmp_path: Path) -> Path:
    root = tmp_path / "pgdata"
    for rel in [
        "PG_VERSION", "postgresql.conf", "postgresql.auto.conf", "postmaster.pid", "postmaster.opts",
        "backup_label", "tablespace_map", "global/pg_control", "global/1262", "global/pg_internal.init",
        "base/1/1259", "base/1/1259_fsm", "base/1/1259_vm", "base/1/16400", "base/1/16400.1", "base/1/16400_fsm",
        "base/1/16400_init", "base/1/t3_16500", "base/1/pg_internal.init", "base/pgsql_tmp/pgsql_tmp123.0",
        "pg_wal/000000010000000000000001", "pg_wal/archive_status/000000010000000000000001.ready",
        "pg_replslot/slot1/state", "pg_stat_tmp/global.stat", "pg_subtrans/0000", "pg_notify/0000",
        "pg_xact/0000", "pg_logical/replorigin_checkpoint",
    ]:  # fmt: skip
        _touch(root, rel)
    (root / "pg_tblspc").mkdir()
    os.symlink("/srv/tablespace", root / "pg_tblspc" / "16385")
    return root


def test_pgdata_scan_leaves_out_what_postgresql_says_to(tmp_path: Path) -> None:
    entries = {e.rel: e.kind for e in scan_data_directory(str(_fake_pgdata(tmp_path)))}
    files = {rel for rel, kind in entries.items() if kind == "f"}
    assert files == {
        "PG_VERSION", "postgresql.conf", "postgresql.auto.conf", "global/1262", "base/1/1259", "base/1/1259_fsm",
        "base/1/1259_vm", "base/1/16400_init", "pg_xact/0000", "pg_logical/replorigin_checkpoint",
    }  # fmt: skip
    # directories whose contents are left out are still there, empty
    for directory in ("pg_wal", "pg_wal/archive_status", "pg_replslot", "pg_stat_tmp", "pg_subtrans", "pg_tblspc"):
        assert entries[directory] == "d"
    assert "pg_tblspc/16385" not in entries  # recreated from tablespace_map
    assert "base/pgsql_tmp" not in entries


def test_pgdata_scan_follows_links_and_records_them(tmp_path: Path) -> None:
    root = _fake_pgdata(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    _touch(elsewhere, "log/server.log")
    _touch(elsewhere, "wal/000000010000000000000002")
    _touch(elsewhere, "stat/global.stat")
    _touch(elsewhere, "conf/extra.conf")
    os.symlink(elsewhere / "log", root / "log")
    os.symlink(elsewhere / "stat", root / "stat_link")
    os.symlink("../elsewhere/conf/extra.conf", root / "extra.conf")
    os.symlink("/nonexistent/x", root / "dangling")
    os.symlink("log/server.log", root / "current_logfiles.tmp")  # excluded, link or not
    entries = {e.rel: (e.kind, e.target) for e in scan_data_directory(str(root))}
    assert entries["log"] == ("d", str(elsewhere / "log")) and entries["log/server.log"] == ("f", "")
    assert entries["extra.conf"] == ("f", "../elsewhere/conf/extra.conf")
    assert entries["dangling"] == ("l", "/nonexistent/x")
    assert "current_logfiles.tmp" not in entries
    assert entries["stat_link"][0] == "d" and entries["stat_link/global.stat"][0] == "f"
    # pg_wal's content is never copied, wherever it lives; a link to another disk is recorded, empty
    shutil.rmtree(root / "pg_wal")
    os.symlink(elsewhere / "wal", root / "pg_wal")
    entries = {e.rel: (e.kind, e.target) for e in scan_data_directory(str(root))}
    assert entries["pg_wal"] == ("d", str(elsewhere / "wal")) and entries["pg_wal/archive_status"][0] == "d"
    assert not any(rel.startswith("pg_wal/0") for rel in entries)


def test_pgdata_scan_refuses_a_link_loop(tmp_path: Path) -> None:
    root = _fake_pgdata(tmp_path)
    os.symlink("..", root / "base" / "up")
    with pytest.raises(UsageError, match="leads back into a directory that contains it"):
        scan_data_directory(str(root))
    os.unlink(root / "base" / "up")
    os.symlink("/", root / "everything")  # found at once, not after walking the whole file system
    with pytest.raises(UsageError, match="everything -> /"):
        scan_data_directory(str(root))


def test_tablespace_scan_copies_this_major_version_only(tmp_path: Path) -> None:
    root = tmp_path / "ts"
    _touch(root, "PG_15_202209061/16384/16390")
    _touch(root, "PG_14_202107181/16384/16390")
    rels = {e.rel for e in scan_tablespace(str(root), "PG_15_")}
    assert rels == {"PG_15_202209061", "PG_15_202209061/16384", "PG_15_202209061/16384/16390"}


def test_file_vanishing_during_the_backup_is_left_out(tmp_path: Path) -> None:
    root = _fake_pgdata(tmp_path)
    entries = scan_data_directory(str(root))
    os.unlink(root / "base" / "1" / "1259")  # dropped after the scan, before it was copied
    storage = MemoryStorage()
    upload = VolumeWriter(storage, "main/backups/x/base.tar.zst", "base.tar.zst", "zstd", 0, Counter(NoProgress()))
    for entry in entries:
        upload.add(Piece(entry))
    tar = upload.finish()
    assert "base/1/1259" not in {f.path for f in tar.files}
    assert "base/1/1259_fsm" in {f.path for f in tar.files}
    with storage.open_read("main/backups/x/base.tar.zst") as obj:
        header = read_header(obj, "k")
        assert header.kind == "tar" and header.sha256 is None
        data = DecompressingReader(header.compression, obj).read()
    assert len(data) == tar.size
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        assert "base/1/1259" not in tf.getnames()


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_wal_wait_finds_segments_in_the_index_or_by_key() -> None:
    storage = MemoryStorage()

    def add(index: Index) -> bool:
        index.add_segments(1, 5)
        return True

    update_index(storage, "main", add)
    # segment 6 is stored but the index does not list it yet (its wal-push has not updated the index)
    storage.put_bytes(layout.wal_key("main", segment_name(1, 6)), b"segment")
    clock = FakeClock()
    wait_for_wal(storage, "main", 1, 5, 6, 16 * 1024 * 1024, 10, sleep=clock.sleep, clock=clock)
    assert clock.now == 0.0


def test_wal_wait_is_bounded_and_says_what_to_check() -> None:
    storage = MemoryStorage()
    clock = FakeClock()
    with pytest.raises(OperationFailed) as err:
        wait_for_wal(
            storage, "main", 1, 5, 6, 16 * 1024 * 1024, 30, diagnose=lambda: "pg_stat_archiver: failing",
            sleep=clock.sleep, clock=clock,
        )  # fmt: skip
    assert 29.8 <= clock.now <= 30  # the last check just before the deadline (the shared retry mechanism)
    text = str(err.value)
    assert segment_name(1, 5) in text and "archive_command" in text and "pg_stat_archiver: failing" in text
