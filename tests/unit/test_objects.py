"""The one object codec: what it writes is what docs/format.md says, and what it opens is checked."""

from __future__ import annotations

import hashlib

import pytest

from cloudbk.errors import AlreadyExists, IntegrityError
from cloudbk.repo.compression import ALGORITHMS
from cloudbk.repo.envelope import MAGIC, read_header
from cloudbk.repo.objects import TAR, WAL, create_object, open_object, read_object
from cloudbk.storage.memory import MemoryStorage

NAME = "000000010000000000000003"
DATA = bytes(range(256)) * 4096  # 1 MiB


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _put(storage: MemoryStorage, key: str, data: bytes, algo: str = "zstd", checksum: bool = True) -> None:
    sink = create_object(storage, key, WAL, NAME, algo, *((_sha(data), len(data)) if checksum else (None, None)))
    for start in range(0, len(data), 100_000):
        sink.write(data[start : start + 100_000])
    stored = sink.commit()
    assert (stored.size, stored.sha256, stored.stored_size) == (len(data), _sha(data), storage.stat(key).size)


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_round_trip_through_every_compression(algo: str) -> None:
    storage = MemoryStorage()
    _put(storage, "k", DATA, algo)
    raw = storage.get_bytes("k")
    assert raw.startswith(MAGIC)
    chunks: list[bytes] = []
    stored = read_object(storage, "k", WAL, NAME, chunks.append)
    assert b"".join(chunks) == DATA and stored.header.compression == algo
    assert stored.stored_size == len(raw)
    with pytest.raises(AlreadyExists):  # create-only by default
        _put(storage, "k", DATA, algo)


def test_content_that_differs_from_its_header_is_not_stored() -> None:
    storage = MemoryStorage()
    sink = create_object(storage, "k", WAL, NAME, "zstd", _sha(DATA), len(DATA), source="/pg/wal/x")
    sink.write(DATA[:-1] + b"!")
    with pytest.raises(IntegrityError, match="/pg/wal/x changed"):
        sink.commit()
    assert not storage.exists("k")


def test_open_checks_kind_name_and_the_whole_content() -> None:
    storage = MemoryStorage()
    _put(storage, "k", DATA)
    with pytest.raises(IntegrityError, match="not tar stream"):
        open_object(storage, "k", TAR, NAME)
    with pytest.raises(IntegrityError, match="not WAL file 000000010000000000000004"):
        open_object(storage, "k", WAL, "000000010000000000000004")
    # a payload cut short: the header is intact, the content ends early
    raw = storage.get_bytes("k")
    storage.put_bytes("cut", raw[: len(raw) - 100])
    with pytest.raises(IntegrityError, match="corrupt"):
        read_object(storage, "cut", WAL, NAME)
    # reading only the head checks nothing yet and is fine
    with open_object(storage, "k", WAL, NAME) as source:
        assert source.read(64) == DATA[:64]


def test_expected_size_and_checksum_from_the_caller() -> None:
    storage = MemoryStorage()
    _put(storage, "t", DATA, checksum=False)
    with storage.open_read("t") as reader:
        header = read_header(reader, "t")
    assert header.sha256 is None and header.size is None
    with pytest.raises(IntegrityError, match="no checksum"):
        read_object(storage, "t", WAL, NAME)  # WAL objects must carry one
    with open_object(storage, "t", WAL, NAME, len(DATA), _sha(DATA)) as source:
        assert source.finish().sha256 == _sha(DATA)
    with (
        pytest.raises(IntegrityError, match="its manifest records"),
        open_object(storage, "t", WAL, NAME, len(DATA), _sha(b"other"), origin="its manifest") as source,
    ):
        source.finish()
