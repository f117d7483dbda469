"""S3 driver behaviour beyond the shared contract: part sizes, listing order, multipart details, outages."""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import pytest
from backends import Backend, selected

from cloudbk.errors import AccessDenied, AlreadyExists, PermanentError, PreconditionFailed, TransientError
from cloudbk.storage import s3, s3writer
from cloudbk.storage.base import CREATE_ONLY, OVERWRITE, IfVersion, ObjectInfo, WriteMode
from cloudbk.storage.registry import StorageOptions, open_driver, open_storage

MiB = s3writer.MiB
S3 = selected(("s3-moto", "s3-seaweedfs"))
SEAWEEDFS = selected(("s3-seaweedfs",))
MOTO = selected(("s3-moto",))


def _driver(backend: Backend) -> s3.S3Storage:
    driver = backend.open_driver()
    assert isinstance(driver, s3.S3Storage)
    return driver


def _in_progress_uploads(backend: Backend, key: str) -> list[Any]:
    service: Any = backend.service
    client = service.client()
    try:
        full = backend.url.split("/", 3)[3] + "/" + key
        response = client.list_multipart_uploads(Bucket=service.bucket, Prefix=full)
        return list(response.get("Uploads", []))
    finally:
        client.close()


# -- part sizes (pure) ------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", [s3writer.MIN_PART_SIZE, s3writer.DEFAULT_PART_SIZE, 64 * MiB])
def test_part_sizes_fit_the_largest_object_in_max_parts(base: int) -> None:
    sizes = [s3writer.part_size_for(n, base) for n in range(s3writer.MAX_PARTS)]
    assert sizes[: s3writer.PARTS_PER_STEP] == [base] * s3writer.PARTS_PER_STEP
    assert all(a <= b for a, b in itertools.pairwise(sizes))
    assert min(sizes) >= s3writer.MIN_PART_SIZE and max(sizes) <= s3writer.MAX_PART_SIZE
    assert sum(sizes) >= s3writer.MAX_OBJECT_SIZE


def test_part_size_stays_small_for_realistic_objects() -> None:
    def largest_part(total: int) -> int:
        written, number = 0, 0
        while written < total:
            size = s3writer.part_size_for(number)
            written, number = written + size, number + 1
        return size

    assert largest_part(200 * MiB) == s3writer.DEFAULT_PART_SIZE
    assert largest_part(100 * 1024 * MiB) <= 160 * MiB  # a 100 GiB tablespace
    assert largest_part(s3writer.MAX_OBJECT_SIZE) <= 1200 * MiB


class _RecordingWriter(s3writer.S3Writer):
    """The S3 writer with its requests replaced by a record of the parts it cut (from the upload threads)."""

    def __init__(self, storage: s3.S3Storage, key: str, mode: WriteMode) -> None:
        super().__init__(storage, key, mode)
        self.parts: dict[int, tuple[int, int]] = {}  # number -> (offset, size)
        self.in_flight: list[int] = []  # parts_in_flight as each part was cut

    def _begin(self) -> None:
        self._upload_id = "recorded"

    def _upload_part(self, number: int, offset: int, data: bytes) -> None:
        with self._lock:
            self.parts[number] = (offset, len(data))

    def _send(self, part: bytes) -> None:
        self.in_flight.append(self.parts_in_flight)
        super()._send(part)

    def _finish(self, number: int, offset: int, data: bytes) -> ObjectInfo:
        self._upload_part(number, offset, data)
        return ObjectInfo(self.key, offset + len(data), '"recorded"')


def test_writer_cuts_growing_parts_with_bounded_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3writer, "PARTS_PER_STEP", 2)
    monkeypatch.setattr(s3writer, "PART_GROWTH", 4 * MiB)
    monkeypatch.setattr(s3writer, "IN_FLIGHT_BYTES", 20 * MiB)
    # no request is made: the client only needs to be built
    storage = open_driver("s3://bucket/p", StorageOptions(endpoint_url="http://127.0.0.1:9", environ={}))
    assert isinstance(storage, s3.S3Storage)
    storage.part_size = s3writer.MIN_PART_SIZE
    writer = _RecordingWriter(storage, "k", OVERWRITE)
    chunk = b"x" * MiB
    for _ in range(100):
        writer.write(chunk)
        assert len(writer._buffer) <= writer.part_size + len(chunk)
    info = writer.commit()
    sizes = [writer.parts[n][1] for n in range(len(writer.parts))]
    offsets = [writer.parts[n][0] for n in range(len(writer.parts))]
    assert info.size == 100 * MiB == sum(sizes)
    assert offsets == [sum(sizes[:n]) for n in range(len(sizes))]
    assert sizes[:6] == [5 * MiB, 5 * MiB, 9 * MiB, 9 * MiB, 13 * MiB, 13 * MiB]
    # 20 MiB of parts in flight: 4 x 5 MiB, then 2 (never fewer) as parts grow
    assert writer.in_flight[:6] == [4, 4, 2, 2, 2, 2]


# -- against the services ---------------------------------------------------------------------------------

TRICKY = ["a!x/y", "a-other", "a.txt", "a/000", "a/001", "a/002", "a/003", "a0", "ab", "b/x", "b-", "c"]


@pytest.mark.parametrize("backend", S3, indirect=True)
def test_listing_order_with_names_that_sort_before_the_slash(backend: Backend) -> None:
    # '!', '-' and '.' sort before '/': a flat S3 listing puts "a-other" before "a/000"; a filer-backed store
    # walking its directory tree does not. The driver must return S3 order either way, across pages.
    storage = _driver(backend)
    for key in TRICKY:
        storage.put_bytes(f"tricky/{key}", b"x")
    expected = sorted(f"tricky/{k}" for k in TRICKY)
    strategies = [True, False] if backend.name == "s3-moto" else [True]  # SeaweedFS pages flat lists as a tree
    for by_directory, page_size in itertools.product(strategies, [1, 2, 3, 1000]):
        storage.list_by_directory = by_directory
        storage.capabilities = replace(storage.capabilities, list_page_size=page_size)
        assert [i.key for i in storage.list("tricky/")] == expected, (by_directory, page_size)
        assert [i.key for i in storage.list("tricky/a")] == [k for k in expected if k.startswith("tricky/a")]


@pytest.mark.parametrize("backend", S3, indirect=True)
def test_versions_agree_between_commit_stat_list_and_read(backend: Backend) -> None:
    storage = _driver(backend)
    committed = storage.put_bytes("ver/k", b"payload")
    data, version = storage.get_bytes_versioned("ver/k")
    assert data == b"payload"
    assert committed.version == version == storage.stat("ver/k").version
    assert [i.version for i in storage.list("ver/")] == [version]
    assert version.startswith('"') and version.endswith('"')
    storage.put_bytes("ver/k", b"next", IfVersion(version.strip('"')))  # an unquoted ETag is accepted too


@pytest.mark.parametrize("backend", S3, indirect=True)
def test_parts_uploaded_concurrently_out_of_order(backend: Backend) -> None:
    storage = _driver(backend)
    size = s3writer.DEFAULT_PART_SIZE
    parts = [bytes([i]) * size for i in range(4)] + [b"tail"]
    writer = storage.open_write("par/k")
    assert isinstance(writer, s3writer.S3Writer)
    writer._begin()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: writer._upload_part(i, i * size, parts[i]), [3, 1, 2, 0]))
    info = writer._finish(4, 4 * size, parts[4])
    assert info.size == 4 * size + 4
    assert storage.get_bytes("par/k") == b"".join(parts)


@pytest.mark.parametrize("backend", S3, indirect=True)
def test_aborted_and_refused_uploads_leave_no_upload_in_progress(backend: Backend) -> None:
    storage = backend.open()
    writer = storage.open_write("mp/aborted")
    writer.write(b"a" * (2 * backend.part_size + 1))
    writer.abort()
    assert _in_progress_uploads(backend, "mp/aborted") == []
    storage.put_bytes("mp/taken", b"first")
    with pytest.raises(AlreadyExists):
        storage.put_bytes("mp/taken", b"b" * (2 * backend.part_size + 1), CREATE_ONLY)
    assert _in_progress_uploads(backend, "mp/taken") == []


@pytest.mark.parametrize("backend", SEAWEEDFS, indirect=True)  # moto ignores If-Match on CompleteMultipartUpload
def test_if_version_on_a_multipart_upload(backend: Backend) -> None:
    storage = backend.open()
    big = b"v" * (backend.part_size + 10)
    first = storage.put_bytes("cas/big", b"one")
    second = storage.put_bytes("cas/big", big, IfVersion(first.version))
    with pytest.raises(PreconditionFailed):
        storage.put_bytes("cas/big", big + b"!", IfVersion(first.version))
    assert storage.stat("cas/big").version == second.version
    with pytest.raises(PreconditionFailed):
        storage.put_bytes("cas/big-absent", big, IfVersion(first.version))


@pytest.mark.parametrize("backend", MOTO, indirect=True)  # SeaweedFS creates a missing bucket on first write
def test_missing_bucket_is_permanent_with_a_hint(backend: Backend) -> None:
    url = backend.url.replace("s3://cloudbk-test/", "s3://cloudbk-no-such-bucket/")
    storage = open_storage(url, backend.options(retry_deadline=1))
    with pytest.raises(PermanentError) as info:
        storage.put_bytes("k", b"x")
    assert "cloudbk-no-such-bucket" in str(info.value) and "HINT: create bucket" in str(info.value)
    with pytest.raises(PermanentError):
        list(storage.list(""))
    with pytest.raises(PermanentError) as info:  # HEAD's 404 has no code: the driver asks about the bucket
        storage.stat("k")
    assert "bucket cloudbk-no-such-bucket does not exist" in str(info.value)


@pytest.mark.parametrize("backend", SEAWEEDFS, indirect=True)
def test_default_credential_chain_is_used_without_explicit_keys(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    service: Any = backend.service
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    options = StorageOptions(endpoint_url=service.endpoint_url, environ={}, retry_deadline=1)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", service.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(AccessDenied):
        open_storage(backend.url, options).stat("chain/k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", service.secret_key)
    storage = open_storage(backend.url, options)
    storage.put_bytes("chain/k", b"via the environment chain")
    assert storage.get_bytes("chain/k") == b"via the environment chain"


@pytest.mark.parametrize("backend", SEAWEEDFS, indirect=True)  # moto forgets its objects when restarted
def test_reads_across_a_server_restart(backend: Backend) -> None:
    service: Any = backend.service
    size = 64 * MiB
    data = hashlib.shake_256(b"restart").digest(size)
    retrying = backend.open()
    retrying.put_bytes("restart/k", data)
    bare = backend.open_driver()
    bare_reader = bare.open_read("restart/k")
    resuming_reader = retrying.open_read("restart/k")
    head = bare_reader.read(MiB)
    resumed = bytearray(resuming_reader.read(MiB))
    assert head == resumed == data[:MiB]
    service.kill()  # a crash: a graceful stop would wait for these downloads to finish
    service.start()
    with pytest.raises(TransientError):  # the bare driver translates the dropped connection ...
        while bare_reader.read(MiB):
            pass
    while chunk := resuming_reader.read(MiB):  # ... and the retry layer resumes at the right offset
        resumed += chunk
    assert hashlib.sha256(resumed).digest() == hashlib.sha256(data).digest()


@pytest.mark.parametrize("backend", S3, indirect=True)
def test_one_storage_shared_by_threads(backend: Backend) -> None:
    storage = backend.open()
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for j in range(10):
                storage.put_bytes(f"threads/{i}/{j}", f"{i}-{j}".encode())
                assert storage.get_bytes(f"threads/{i}/{j}") == f"{i}-{j}".encode()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(list(storage.list("threads/"))) == 160
