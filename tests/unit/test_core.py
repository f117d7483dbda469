"""Pure pieces: WAL names and LSNs, keys, URLs, config precedence, envelope, compression, index ranges."""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import pytest
import yaml

from cloudbk.config import resolve
from cloudbk.errors import IntegrityError, UsageError
from cloudbk.pg import walnames as wal
from cloudbk.repo import layout
from cloudbk.repo.compression import ALGORITHMS, CompressingWriter, DecompressingReader
from cloudbk.repo.envelope import Header, read_header
from cloudbk.repo.index import Index, load_index, update_index
from cloudbk.repo.ranges import gaps
from cloudbk.storage.base import check_key
from cloudbk.storage.memory import MemoryStorage
from cloudbk.storage.registry import parse_url

REPO = Path(__file__).resolve().parents[2]


def test_wal_names_round_trip() -> None:
    n = wal.parse_wal_name("000000020000000A000000FF")
    assert (n.kind, n.timeline, n.segno()) == (wal.SEGMENT, 2, 10 * 256 + 255)
    assert wal.segment_name(2, n.segno()) == n.name
    assert wal.parse_wal_name("00000003.history").kind == wal.HISTORY
    assert wal.parse_wal_name("000000010000000000000003.partial").kind == wal.PARTIAL
    assert wal.parse_wal_name("000000010000000000000003.00000028.backup").kind == wal.BACKUP_LABEL
    # 64 MiB segments: 64 per "log"
    assert wal.segment_name(1, 65, 64 * 1024 * 1024) == "000000010000000100000001"
    for bad in ("00000001000000000000000", "../00000001.history", "000000010000000000000003.gz", ""):
        with pytest.raises(UsageError):
            wal.parse_wal_name(bad)


def test_lsn_math_and_history() -> None:
    assert wal.parse_lsn("16/B374D848") == 0x16B374D848
    assert wal.format_lsn(0x16B374D848) == "16/B374D848"
    assert wal.lsn_segno(wal.parse_lsn("0/3000028")) == 3
    with pytest.raises(UsageError):
        wal.parse_lsn("nope")
    entries = wal.parse_history("1\t0/3000000\tno recovery target specified\n\n2\t0/5000090\tbefore 2026\n")
    assert [(e.timeline, wal.format_lsn(e.switchpoint)) for e in entries] == [(1, "0/3000000"), (2, "0/5000090")]


def test_keys_are_validated_in_one_place() -> None:
    assert layout.wal_key("main", "000000010000000000000003") == "main/wal/00000001/000000010000000000000003"
    assert layout.wal_key("main", "00000002.history") == "main/wal/history/00000002.history"
    for bad in ("../x", "a//b", "/abs", "a/./b", "a\\b", "a\x00b", ""):
        with pytest.raises(UsageError):
            check_key(bad)
    for bad_server in ("", "../x", "a/b", "-x"):
        with pytest.raises(UsageError):
            layout.index_key(bad_server)


def test_repository_urls() -> None:
    assert parse_url("s3://bucket/some/prefix/").prefix == "some/prefix"
    assert parse_url("file:///var/lib/cloudbk").prefix == "/var/lib/cloudbk"
    assert parse_url("azure://container").container == "container"
    for bad in ("ftp://x/y", "s3:///prefix", "file://relative/path", "s3://b/p?x=1"):
        with pytest.raises(UsageError) as info:
            parse_url(bad)
        assert info.value.hint


def test_config_precedence_flags_env_file(tmp_path: Path) -> None:
    cfg = tmp_path / "cloudbk.toml"
    cfg.write_text(
        'repo = "file:///from/file"\nserver = "fromfile"\ncompression = "lz4"\n[retention]\nredundancy = 3\n'
    )
    env = {"CLOUDBK_CONFIG": str(cfg), "CLOUDBK_SERVER": "fromenv"}
    s = resolve({"compression": "gzip"}, env)
    assert (s.repo, s.server, s.compression) == ("file:///from/file", "fromenv", "gzip")
    assert s.sections["retention"]["redundancy"] == 3
    assert resolve({}, {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}).endpoint_url == "http://127.0.0.1:9"
    with pytest.raises(UsageError):
        resolve({"compression": "brotli"}, {})
    cfg.write_text('repo = "file:///x"\nbogus = 1\n')
    with pytest.raises(UsageError) as info:
        resolve({}, {"CLOUDBK_CONFIG": str(cfg)})
    assert "bogus" in str(info.value)
    with pytest.raises(UsageError):
        resolve({"config": str(tmp_path / "missing.toml")}, {})


def test_envelope_header_round_trip_and_garbage() -> None:
    header = Header(kind="wal", name="000000010000000000000001", compression="zstd", sha256="ab" * 32, size=16)
    stream = io.BytesIO(header.encode() + b"payload")
    assert read_header(stream, "k") == header
    assert stream.read() == b"payload"
    for garbage in (b"", b"CLOUDBK", b"NOTCLOUDBK" + b"\0" * 20, b"CLOUDBK\x01\xff\xff\xff\xff"):
        with pytest.raises(IntegrityError) as info:
            read_header(io.BytesIO(garbage), "some/key")
        assert "some/key" in str(info.value)


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_compression_round_trip_and_corruption(algo: str) -> None:
    data = os.urandom(50_000) + b"\0" * 3_000_000
    sink = io.BytesIO()
    writer = CompressingWriter(algo, sink)
    for i in range(0, len(data), 100_000):
        writer.write(data[i : i + 100_000])
    writer.finish()
    reader = DecompressingReader(algo, io.BytesIO(sink.getvalue()))
    assert reader.read() == data
    assert reader.sha256 == writer.sha256 and reader.size == writer.size == len(data)
    if algo != "none":
        assert writer.compressed_size < len(data) // 10
        broken = bytearray(sink.getvalue())
        broken[len(broken) // 2] ^= 0xFF
        try:
            out = DecompressingReader(algo, io.BytesIO(bytes(broken))).read()
        except IntegrityError:
            return
        assert out != data  # caught by the checksum at the caller


def test_index_ranges_merge_and_gaps() -> None:
    idx = Index(server="main")
    for segno in (5, 7, 6, 10, 1):
        idx.add_segments(1, segno)
    assert idx.segments[1] == [[1, 1], [5, 7], [10, 10]]
    assert not idx.add_segments(1, 6)
    assert idx.missing_segments(1, 1, 10) == [[2, 4], [8, 9]]
    assert gaps([], 3, 4) == [[3, 4]]
    idx.remove_segments(1, 1, 6)
    assert idx.segments[1] == [[7, 7], [10, 10]]
    again = Index.from_json(idx.to_json(), "k")
    assert again.segments == idx.segments
    with pytest.raises(IntegrityError) as info:
        Index.from_json(b"{not json", "main/index.json")
    assert "reindex" in str(info.value)


def test_index_concurrent_updates_lose_nothing() -> None:
    storage = MemoryStorage()

    def push(first: int) -> None:
        for segno in range(first, first + 25):
            update_index(storage, "main", lambda idx, s=segno: idx.add_segments(1, s))

    threads = [threading.Thread(target=push, args=(i * 25,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert load_index(storage, "main").segments == {1: [[0, 199]]}


def test_localstack_compose_file_parses() -> None:
    doc = yaml.safe_load((REPO / "localstack" / "docker-compose.yml").read_text())
    service = doc["services"]["localstack"]
    assert service["image"].startswith("localstack/localstack:")
    assert service["image"].split(":")[1] not in ("latest", "")
    assert any("ready.d" in v for v in service["volumes"])
    hook = REPO / "localstack" / "init" / "ready.d" / "create-bucket.sh"
    assert os.access(hook, os.X_OK)


def test_newer_formats_are_refused_with_a_hint_to_upgrade() -> None:
    from cloudbk.repo.manifest import Manifest

    newer = Header(kind="wal", name="000000010000000000000001", compression="none", format_version=99)
    with pytest.raises(IntegrityError) as info:
        read_header(io.BytesIO(newer.encode()), "main/wal/00000001/000000010000000000000001")
    assert "format version 99" in str(info.value) and "upgrade cloudbk" in str(info.value)
    index_doc = Index(server="main").to_json().replace(b'"format_version": 1', b'"format_version": 99')
    with pytest.raises(IntegrityError) as info:
        Index.from_json(index_doc, "main/index.json")
    assert "index main/index.json has format version 99" in str(info.value)
    with pytest.raises(IntegrityError) as info:
        Manifest.from_json(b'{"format_version": 99}', "main/backups/x/manifest.json")
    assert "manifest main/backups/x/manifest.json has format version 99" in str(info.value)
    assert "upgrade cloudbk" in str(info.value)
