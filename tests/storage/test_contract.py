"""The storage contract: every backend, against its real service, passes the same tests."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import replace

import pytest
from backends import CREDENTIAL_CHECKING, NETWORK_BACKENDS, Backend, race_create_only, selected

from cloudbk.errors import (
    AccessDenied,
    AlreadyExists,
    NotFound,
    PreconditionFailed,
    TransientError,
)
from cloudbk.storage.base import CREATE_ONLY, OVERWRITE, IfVersion, Storage

MiB = 1024 * 1024


@pytest.fixture
def storage(backend: Backend) -> Iterator[Storage]:
    s = backend.open()
    yield s
    s.close()


def _stream(total: int, seed: bytes = b"cloudbk") -> Iterator[bytes]:
    """Deterministic, incompressible-looking chunks without holding ``total`` bytes in memory."""
    block = hashlib.shake_256(seed).digest(MiB)
    n = 0
    counter = 0
    while n < total:
        chunk = hashlib.sha256(counter.to_bytes(8, "big")).digest() + block
        chunk = chunk[: min(len(chunk), total - n)]
        counter += 1
        n += len(chunk)
        yield chunk


def _upload(storage: Storage, key: str, total: int) -> str:
    digest = hashlib.sha256()
    with storage.open_write(key) as writer:
        for chunk in _stream(total):
            digest.update(chunk)
            writer.write(chunk)
        writer.commit()
    return digest.hexdigest()


def _download_digest(storage: Storage, key: str) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with storage.open_read(key) as reader:
        while True:
            chunk = reader.read(MiB)
            if not chunk:
                break
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


@pytest.mark.parametrize("size", [0, 1, 1000, 5 * MiB + 3])
def test_round_trip(storage: Storage, size: int) -> None:
    expected = _upload(storage, f"rt/{size}", size)
    assert _download_digest(storage, f"rt/{size}") == (expected, size)
    info = storage.stat(f"rt/{size}")
    assert info.size == size
    assert info.version


@pytest.mark.slow
def test_round_trip_200_mib_streamed(storage: Storage) -> None:
    size = 200 * MiB + 12345
    expected = _upload(storage, "big/object", size)
    assert _download_digest(storage, "big/object") == (expected, size)
    assert storage.stat("big/object").size == size


def test_ranged_reads(storage: Storage) -> None:
    data = bytes(range(256)) * 64
    storage.put_bytes("range/obj", data)
    with storage.open_read("range/obj", 100, 50) as r:
        assert r.read() == data[100:150]
    with storage.open_read("range/obj", 16000) as r:
        assert r.read() == data[16000:]
    with storage.open_read("range/obj", 0, 1) as r:
        assert r.read() == data[:1]


def test_overwrite_replaces_and_changes_version(storage: Storage) -> None:
    first = storage.put_bytes("ow/k", b"one")
    second = storage.put_bytes("ow/k", b"two", OVERWRITE)
    assert storage.get_bytes("ow/k") == b"two"
    assert first.version != second.version


def test_not_found(storage: Storage) -> None:
    with pytest.raises(NotFound):
        storage.stat("missing/key")
    with pytest.raises(NotFound):
        storage.open_read("missing/key")
    assert not storage.exists("missing/key")
    assert list(storage.list("missing/")) == []


def test_listing_is_sorted_paginated_and_prefix_filtered(backend: Backend, storage: Storage) -> None:
    keys = [f"ls/a/{i:03d}" for i in range(23)] + ["ls/a-other", "ls/b/x", "ls/ab"]
    for key in keys:
        storage.put_bytes(key, key.encode())
    storage.put_bytes("elsewhere/key", b"x")
    storage.capabilities = replace(storage.capabilities, list_page_size=5)  # more keys than one page
    listed = [info.key for info in storage.list("ls/a/")]
    assert listed == sorted(k for k in keys if k.startswith("ls/a/"))
    everything = [info.key for info in storage.list("ls/")]
    assert everything == sorted(keys)
    sizes = {info.key: info.size for info in storage.list("ls/")}
    assert sizes["ls/ab"] == len(b"ls/ab")


def test_batch_delete_including_missing_keys(storage: Storage) -> None:
    keys = [f"del/{i:03d}" for i in range(30)]
    for key in keys:
        storage.put_bytes(key, b"x")
    storage.capabilities = replace(storage.capabilities, delete_batch_size=7)
    storage.delete_many([*keys[:20], "del/missing-1", "del/missing-2"])
    assert [i.key for i in storage.list("del/")] == keys[20:]
    storage.delete_many([])
    storage.delete("del/missing-3")


def test_create_only_refuses_existing(storage: Storage) -> None:
    storage.put_bytes("co/k", b"first", CREATE_ONLY)
    with pytest.raises(AlreadyExists):
        storage.put_bytes("co/k", b"second", CREATE_ONLY)
    assert storage.get_bytes("co/k") == b"first"


def test_create_only_large_object_refuses_existing(backend: Backend, storage: Storage) -> None:
    size = max(backend.part_size, MiB) * 2 + 17  # multipart where the backend has parts
    _upload(storage, "co/big", 1000)
    with pytest.raises(AlreadyExists), storage.open_write("co/big", CREATE_ONLY) as writer:
        for chunk in _stream(size):
            writer.write(chunk)
        writer.commit()
    assert storage.stat("co/big").size == 1000


def test_create_only_race_has_exactly_one_winner(storage: Storage) -> None:
    won, lost = race_create_only(storage, "race/k", lambda i: f"writer-{i}".encode())
    assert len(won) + lost == 8
    assert len(won) == 1, won
    assert storage.get_bytes("race/k") == f"writer-{won[0]}".encode()


def test_if_version_mismatch_and_absent(storage: Storage) -> None:
    info = storage.put_bytes("cas/k", b"1")
    storage.put_bytes("cas/k", b"2", IfVersion(info.version))
    with pytest.raises(PreconditionFailed):
        storage.put_bytes("cas/k", b"3", IfVersion(info.version))
    assert storage.get_bytes("cas/k") == b"2"
    with pytest.raises(PreconditionFailed):
        storage.put_bytes("cas/absent", b"x", IfVersion(info.version))
    assert not storage.exists("cas/absent")


def test_compare_and_swap_counter_race(storage: Storage) -> None:
    key = "cas/counter"
    writers, increments = 8, 50
    errors: list[BaseException] = []

    def bump() -> None:
        try:
            for _ in range(increments):
                while True:
                    try:
                        data, version = storage.get_bytes_versioned(key)
                    except NotFound:
                        try:
                            storage.put_bytes(key, json.dumps({"n": 1}).encode(), CREATE_ONLY)
                            break
                        except AlreadyExists:
                            continue
                    value = json.loads(data)["n"] + 1
                    try:
                        storage.put_bytes(key, json.dumps({"n": value}).encode(), IfVersion(version))
                        break
                    except PreconditionFailed:
                        continue
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=bump) for _ in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert json.loads(storage.get_bytes(key))["n"] == writers * increments


def test_aborted_writer_leaves_nothing(backend: Backend, storage: Storage) -> None:
    size = max(backend.part_size, MiB) * 2 + 5  # past the first part: a multipart upload is under way
    writer = storage.open_write("abort/k")
    for chunk in _stream(size):
        writer.write(chunk)
    writer.abort()
    writer.abort()  # idempotent
    with pytest.raises(NotFound):
        storage.stat("abort/k")
    assert list(storage.list("abort/")) == []
    with storage.open_write("abort/ctx") as w:
        w.write(b"never committed")
    assert not storage.exists("abort/ctx")


@pytest.mark.parametrize("backend", selected(CREDENTIAL_CHECKING), indirect=True)
def test_access_denied_with_bad_credentials(backend: Backend) -> None:
    assert backend.bad_credentials_env is not None
    storage = backend.open(env=backend.bad_credentials_env, retry_deadline=2)
    with pytest.raises(AccessDenied):
        storage.put_bytes("denied/k", b"x")
    with pytest.raises(AccessDenied):
        storage.stat("denied/k")


@pytest.mark.parametrize("backend", selected(NETWORK_BACKENDS), indirect=True)
def test_unreachable_endpoint_is_transient(backend: Backend) -> None:
    assert backend.unreachable_env is not None
    storage = backend.open(env=backend.unreachable_env, retry_deadline=1.5)
    with pytest.raises(TransientError):
        storage.stat("any/key")
    with pytest.raises(TransientError):
        storage.put_bytes("any/key", b"x")
