"""Azure driver behaviour beyond the shared contract: block sizes, lost commit responses, outages, credentials."""

from __future__ import annotations

import hashlib
import itertools
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from backends import Backend, selected
from services.azure import DEV_ACCOUNT, DEV_KEY, AzuriteService

from cloudbk.errors import AlreadyExists, NotFound, PermanentError, TransientError, UsageError
from cloudbk.storage import azure
from cloudbk.storage.base import CREATE_ONLY, IfVersion, Storage
from cloudbk.storage.registry import StorageOptions, open_driver

MiB = 1024 * 1024
GiB = 1024 * MiB
TiB = 1024 * GiB

AZURE = selected(("azure",))


# -- the block size schedule (pure) -----------------------------------------------------------------------


def test_block_sizes_grow_within_limits() -> None:
    sizes = [azure.block_size_for(n) for n in range(azure.MAX_BLOCKS)]
    assert sizes[0] == azure.DEFAULT_BLOCK_SIZE
    assert all(a <= b for a, b in itertools.pairwise(sizes))
    assert max(sizes) <= azure.MAX_BLOCK_SIZE
    # a stream of unknown length fits far beyond any tablespace we expect, with blocks kept small for long
    assert azure.max_object_size() == sum(sizes) >= 64 * TiB

    def block_size_at(total: int) -> int:
        stored = 0
        for size in sizes:
            stored += size
            if stored >= total:
                return size
        raise AssertionError(f"{total} bytes do not fit")

    assert block_size_at(100 * GiB) <= 32 * MiB
    assert block_size_at(1 * TiB) <= 256 * MiB


# -- against Azurite ----------------------------------------------------------------------------------------


@pytest.fixture
def driver(backend: Backend) -> Iterator[Storage]:
    s = backend.open_driver()
    yield s
    s.close()


def _committed_sizes(storage: Storage, key: str) -> list[int]:
    inner: Any = getattr(storage, "inner", storage)
    committed, uncommitted = inner._blob(key).get_block_list("all")
    assert not uncommitted
    return [block.size for block in committed]


@pytest.mark.parametrize("backend", AZURE, indirect=True)
def test_writer_follows_block_schedule(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(azure, "BLOCKS_PER_DOUBLING", 2)
    storage = backend.open()
    storage.inner.block_size = 1024  # type: ignore[attr-defined]
    data = bytes(range(256)) * 64  # 16 KiB in one write: the writer must still cut it block by block
    with storage.open_write("sched/k") as writer:
        writer.write(data)
        writer.write(b"tail")
        writer.commit()
    assert storage.get_bytes("sched/k") == data + b"tail"
    # 1024, 1024, 2048, 2048, 4096, 4096 = 14 KiB, then the rest (2 KiB + 4 bytes) as the last block
    assert _committed_sizes(storage, "sched/k") == [1024, 1024, 2048, 2048, 4096, 4096, 2052]


def _lose_first_response(monkeypatch: pytest.MonkeyPatch, writer: Any, method: str) -> None:
    """The first ``method`` call reaches the service, but its response is lost (a read timeout)."""
    from azure.core.exceptions import ServiceResponseError

    real = getattr(writer._client, method)
    calls = []

    def lossy(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        calls.append(method)
        if len(calls) == 1:
            raise ServiceResponseError("read timed out after the service stored the blob")
        return result

    monkeypatch.setattr(writer._client, method, lossy)


@pytest.mark.parametrize("backend", AZURE, indirect=True)
@pytest.mark.parametrize("size", [10, 2 * MiB + 3], ids=["put-blob", "block-list"])
def test_retried_commit_recognises_its_own_write(backend: Backend, monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    storage = backend.open()
    storage.inner.block_size = MiB  # type: ignore[attr-defined]
    data = b"x" * size
    method = "upload_blob" if size < MiB else "commit_block_list"

    writer: Any = storage.open_write("lost/k", CREATE_ONLY)
    _lose_first_response(monkeypatch, writer, method)
    writer.write(data)
    first = writer.commit()  # the retry meets If-None-Match; the blob is ours, so this is a success
    assert storage.stat("lost/k").version == first.version

    writer = storage.open_write("lost/k", IfVersion(first.version))
    _lose_first_response(monkeypatch, writer, method)
    writer.write(data + b"2")
    second = writer.commit()
    assert storage.stat("lost/k").version == second.version != first.version
    assert storage.get_bytes("lost/k") == data + b"2"

    with pytest.raises(AlreadyExists):  # a genuine conflict is still one
        storage.put_bytes("lost/k", b"other", CREATE_ONLY)


@pytest.mark.parametrize("backend", AZURE, indirect=True)
def test_read_interrupted_by_outage_resumes(backend: Backend) -> None:
    service = backend.service
    assert isinstance(service, AzuriteService)
    storage = backend.open(retry_deadline=30)
    data = hashlib.shake_256(b"resume").digest(20 * MiB)  # several GETs: the first 8 MiB, then 4 MiB chunks
    storage.put_bytes("resume/k", data)
    bare = backend.open_driver()
    received = bytearray()
    with storage.open_read("resume/k") as reader, bare.open_read("resume/k") as bare_reader:
        received += reader.read(9 * MiB)  # past the first GET
        bare_reader.read(9 * MiB)
        service.stop()
        restart = threading.Thread(target=lambda: (time.sleep(1.0), service.start()))
        try:
            with pytest.raises(TransientError):
                bare_reader.read()  # the driver itself: a mid-stream failure is transient
            restart.start()
            received += reader.read()  # the retry layer waits for the service and resumes at the offset
        finally:  # leave the session's service running, and no thread behind
            if restart.ident is not None:
                restart.join()
            else:
                service.start()
    assert bytes(received) == data


@pytest.mark.parametrize("backend", AZURE, indirect=True)
def test_missing_container_is_permanent_with_hint(backend: Backend) -> None:
    driver = open_driver("azure://no-such-container/p", backend.options())
    for op in (lambda: driver.stat("k"), lambda: driver.put_bytes("k", b"x"), lambda: list(driver.list())):
        with pytest.raises(PermanentError) as info:
            op()
        assert "no-such-container" in str(info.value)
        assert "create the container" in str(info.value)


@pytest.mark.parametrize("backend", AZURE, indirect=True)
def test_ranges_at_and_past_the_end(driver: Storage) -> None:
    driver.put_bytes("range/k", b"0123456789")
    driver.put_bytes("range/empty", b"")
    assert driver.get_bytes("range/empty") == b""
    for offset, length in ((10, None), (12, None), (10, 5), (3, 0)):
        with driver.open_read("range/k", offset, length) as reader:
            assert reader.read() == b""
    with pytest.raises(NotFound):
        driver.open_read("range/missing", 5)
    assert driver.get_bytes_versioned("range/k") == (b"0123456789", driver.stat("range/k").version)


def _env(backend: Backend, **changes: str) -> dict[str, str]:
    """The backend's environment with some variables changed; an empty value counts as unset."""
    return {**backend.env, **changes}


@pytest.mark.parametrize("backend", AZURE, indirect=True)
def test_connection_string_and_sas_token(backend: Backend) -> None:
    from azure.storage.blob import AccountSasPermissions, ResourceTypes, generate_account_sas

    endpoint = backend.env["CLOUDBK_ENDPOINT_URL"]
    connection = (
        f"DefaultEndpointsProtocol=http;AccountName={DEV_ACCOUNT};AccountKey={DEV_KEY};BlobEndpoint={endpoint};"
    )
    by_connection = _env(
        backend,
        AZURE_STORAGE_CONNECTION_STRING=connection,
        AZURE_STORAGE_ACCOUNT="",
        AZURE_STORAGE_KEY="",
        CLOUDBK_ENDPOINT_URL="",
    )
    backend.open(env=by_connection).put_bytes("creds/conn", b"c")

    sas = generate_account_sas(
        DEV_ACCOUNT,
        DEV_KEY,
        ResourceTypes(container=True, object=True),
        AccountSasPermissions(read=True, write=True, delete=True, list=True, create=True),
        expiry=time.time() + 3600,
    )
    by_sas = _env(backend, AZURE_STORAGE_SAS_TOKEN=sas, AZURE_STORAGE_KEY="")
    storage = backend.open(env=by_sas)
    assert storage.get_bytes("creds/conn") == b"c"
    assert [i.key for i in storage.list("creds/")] == ["creds/conn"]

    # a connection string with an endpoint override keeps the connection string's credential
    sas_connection = f"AccountName={DEV_ACCOUNT};SharedAccessSignature={sas}"
    by_sas_connection = _env(backend, AZURE_STORAGE_CONNECTION_STRING=sas_connection, AZURE_STORAGE_KEY="")
    assert backend.open(env=by_sas_connection).get_bytes("creds/conn") == b"c"

    signature = dict(p.split("=", 1) for p in sas.split("&"))["sig"]
    assert backend.unreachable_env is not None
    unreachable = {**by_sas, "CLOUDBK_ENDPOINT_URL": backend.unreachable_env["CLOUDBK_ENDPOINT_URL"]}
    with pytest.raises(TransientError) as info:
        backend.open(env=unreachable, retry_deadline=0.5).stat("creds/conn")
    assert signature not in str(info.value)


@pytest.mark.parametrize("backend", AZURE, indirect=True)
def test_missing_credentials_are_a_usage_error(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "azure.identity", None)  # as if azure-identity were not installed
    env = _env(backend, AZURE_STORAGE_KEY="")
    with pytest.raises(UsageError) as info:
        backend.open(env=env)
    assert "AZURE_STORAGE_KEY" in str(info.value)
    assert DEV_KEY not in str(info.value)

    no_account = StorageOptions(endpoint_url=None, environ={"AZURE_STORAGE_KEY": DEV_KEY})
    with pytest.raises(UsageError):
        open_driver(backend.url, no_account)
    with pytest.raises(UsageError):
        open_driver("azure://Bad_Container/p", backend.options())
