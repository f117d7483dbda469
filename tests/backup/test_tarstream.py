"""Streaming tar: round trip with checksums, files that shrink while copied, and members that must be refused."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest

from cloudbk.backup.tarextract import SafeExtractor
from cloudbk.backup.tarstream import PipeSink, TarWriter, check_member
from cloudbk.errors import IntegrityError, UnsafeMember
from cloudbk.repo.manifest import FileEntry


class Buffer(io.BytesIO):
    pass


def _write_tree(tmp_path: Path) -> tuple[bytes, dict[str, FileEntry]]:
    src = tmp_path / "src"
    src.mkdir()
    long_name = "d" * 60 + "/" + "f" * 120
    (src / ("d" * 60)).mkdir()
    (src / long_name).write_bytes(b"long" * 1000)
    (src / "empty").write_bytes(b"")
    (src / "big").write_bytes(os.urandom(3 * 1024 * 1024 + 7))
    out = Buffer()
    tw = TarWriter(out)
    entries: dict[str, FileEntry] = {}
    tw.add_dir("d" * 60, 0o750)
    for rel in (long_name, "empty", "big"):
        fd = os.open(src / rel, os.O_RDONLY)
        try:
            entry, short = tw.add_file(rel, fd, os.fstat(fd).st_size, 0o640, 1_700_000_000)
        finally:
            os.close(fd)
        assert short == 0
        entries[rel] = entry
    tw.add_symlink("inside-link", "big")
    entries["conf"] = tw.add_bytes("conf", b"setting = 1\n")
    tw.close()
    return out.getvalue(), entries


def test_round_trip_with_checksums(tmp_path: Path) -> None:
    data, entries = _write_tree(tmp_path)
    dest = tmp_path / "dest"
    dest.mkdir()
    result, sha, size = SafeExtractor(str(dest), entries).extract(io.BytesIO(data))
    assert size == len(data) and sha == hashlib.sha256(data).hexdigest()
    assert set(result.files) == set(entries)
    for rel, entry in entries.items():
        assert result.files[rel] == entry
        if rel != "conf":
            assert (dest / rel).read_bytes() == (tmp_path / "src" / rel).read_bytes()
    assert (dest / "conf").read_bytes() == b"setting = 1\n"
    assert os.readlink(dest / "inside-link") == "big"
    assert (dest / "big").stat().st_mode & 0o777 == 0o640
    assert (dest / ("d" * 60)).stat().st_mode & 0o777 == 0o750
    # the tar is a standard one: tar tools read it too
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        assert sorted(m.name for m in tf.getmembers() if m.isfile()) == sorted(entries)


def test_file_that_shrinks_while_copied_is_padded(tmp_path: Path) -> None:
    path = tmp_path / "rel"
    path.write_bytes(b"a" * 10_000)
    out = Buffer()
    tw = TarWriter(out)
    fd = os.open(path, os.O_RDONLY)
    try:
        entry, short = tw.add_file("rel", fd, 20_000, 0o600, 0)  # the header promised more than is there now
    finally:
        os.close(fd)
    tw.close()
    assert short == 10_000 and entry.size == 20_000
    dest = tmp_path / "d"
    dest.mkdir()
    result, _, _ = SafeExtractor(str(dest), {"rel": entry}).extract(io.BytesIO(out.getvalue()))
    assert (dest / "rel").read_bytes() == b"a" * 10_000 + bytes(10_000)
    assert result.files["rel"].sha256 == entry.sha256


def test_checksum_mismatch_is_refused(tmp_path: Path) -> None:
    data, entries = _write_tree(tmp_path)
    entries["big"] = FileEntry("big", entries["big"].size, "0" * 64)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(IntegrityError, match="does not match its checksum"):
        SafeExtractor(str(dest), entries).extract(io.BytesIO(data))


def test_file_not_in_manifest_is_refused(tmp_path: Path) -> None:
    data, entries = _write_tree(tmp_path)
    del entries["empty"]
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(IntegrityError, match="not in the backup's manifest"):
        SafeExtractor(str(dest), entries).extract(io.BytesIO(data))


def test_truncated_stream_is_refused(tmp_path: Path) -> None:
    data, entries = _write_tree(tmp_path)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(IntegrityError):
        SafeExtractor(str(dest), entries).extract(io.BytesIO(data[: len(data) // 2]))


def _evil_tar(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tf:
        for info, payload in members:
            tf.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return out.getvalue()


def _file(name: str, payload: bytes = b"pwned") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    return info, payload


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


def _special(name: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    return info, None


EVIL = {
    "dotdot": [_file("../escaped")],
    "nested-dotdot": [_file("a/../../escaped")],
    "absolute": [_file("/tmp/escaped-abs")],
    "symlink-out": [_link("evil", "../outside"), _file("evil/escaped")],
    "symlink-absolute": [_link("evil", "/etc")],
    "hardlink-out": [_link("evil", "../outside/victim", tarfile.LNKTYPE)],
    "device": [_special("dev", tarfile.CHRTYPE)],
    "fifo": [_special("fifo", tarfile.FIFOTYPE)],
}


@pytest.mark.parametrize("case", sorted(EVIL))
def test_unsafe_members_are_refused_and_nothing_escapes(tmp_path: Path, case: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"precious")
    dest = tmp_path / "root" / "dest"
    dest.mkdir(parents=True)
    data = _evil_tar(_file("harmless", b"ok"), *EVIL[case])
    with pytest.raises(UnsafeMember):
        SafeExtractor(str(dest)).extract(io.BytesIO(data))
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]
    assert (outside / "victim").read_bytes() == b"precious"
    assert not (tmp_path / "root" / "escaped").exists() and not (tmp_path / "escaped").exists()
    assert not Path("/tmp/escaped-abs").exists()
    assert [p.name for p in dest.iterdir()] == ["harmless"]


def test_writing_through_a_symlink_inside_is_refused(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    data = _evil_tar(_special("sub", tarfile.DIRTYPE), _link("link", "sub"), _file("link/file"))
    with pytest.raises(UnsafeMember, match="through a symbolic link"):
        SafeExtractor(str(dest)).extract(io.BytesIO(data))
    assert not (dest / "sub" / "file").exists()


def test_check_member_accepts_what_backups_hold() -> None:
    assert check_member(_file("./base/1/1259")[0]) == "base/1/1259"
    assert check_member(_link("pg_wal_link", "pg_wal")[0]) == "pg_wal_link"
    assert check_member(_link("a/b/c", "../d")[0]) == "a/b/c"
    with pytest.raises(UnsafeMember):
        check_member(_link("a/b", "../../d")[0])


class _SlowSink:
    def __init__(self, fail_at: int | None = None) -> None:
        self.chunks: list[bytes] = []
        self.fail_at = fail_at

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self.fail_at is not None and len(self.chunks) >= self.fail_at:
            raise OSError("disk on fire")
        self.chunks.append(bytes(data))
        return len(data)


def test_pipe_sink_copies_chunks_in_order() -> None:
    sink = _SlowSink()
    pipe = PipeSink(sink, depth=2)
    buf = bytearray(b"a" * 10)
    for i in range(50):
        buf[:] = bytes([65 + i % 26]) * 10
        pipe.write(memoryview(buf))  # the producer reuses its buffer: the pipe must have copied it
    pipe.close()
    assert b"".join(sink.chunks) == b"".join(bytes([65 + i % 26]) * 10 for i in range(50))


def test_pipe_sink_surfaces_the_consumer_error() -> None:
    pipe = PipeSink(_SlowSink(fail_at=3), depth=2)
    with pytest.raises(OSError, match="disk on fire"):
        for _ in range(100):
            pipe.write(b"x" * 100)
        pipe.close()
    pipe.abort()  # safe after a failure
