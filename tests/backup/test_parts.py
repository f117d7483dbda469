"""The parallel PartWriter: order, bounded memory, concurrency limits, retries per part, failure aborts."""

from __future__ import annotations

import hashlib
import threading
import time

import pytest

from cloudbk.errors import PermanentError, TransientError
from cloudbk.storage.backoff import RetryPolicy
from cloudbk.storage.base import OVERWRITE, ObjectInfo
from cloudbk.storage.parts import PartWriter

PART = 64 * 1024


class FakeWriter(PartWriter):
    """Stores parts by number in memory; records concurrency and lets a test stall or fail uploads."""

    def __init__(self, parts_in_flight: int = 4, delay: float = 0.0, parallel: bool = True) -> None:
        self.parallel_parts = parallel
        super().__init__("k", OVERWRITE, PART, parts_in_flight)
        self.use_retry(RetryPolicy(deadline=5, initial_delay=0.001))  # as the retry layer does
        self.delay = delay
        self.stored: dict[int, tuple[int, bytes]] = {}
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0
        self.order: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail: dict[int, Exception] = {}  # part number -> error raised (once) when it is uploaded
        self.fail_always: dict[int, Exception] = {}
        self.cancelled_at: float | None = None
        self.part_ends: list[float] = []
        self.finished: bytes | None = None
        self.began = 0

    def _put_whole(self, data: bytes) -> ObjectInfo:
        self.finished = data
        return ObjectInfo(self.key, len(data), "1")

    def _begin(self) -> None:
        self.began += 1

    def _upload_part(self, number: int, offset: int, data: bytes) -> None:
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.order.append(number)
        try:
            self.gate.wait()
            time.sleep(self.delay)
            if number in self.fail_always:
                raise self.fail_always[number]
            if number in self.fail:
                raise self.fail.pop(number)
            with self.lock:
                self.stored[number] = (offset, data)
        finally:
            with self.lock:
                self.active -= 1
                self.part_ends.append(time.monotonic())

    def _finish(self, number: int, offset: int, data: bytes) -> ObjectInfo:
        assert self.active == 0, "the last part must come after every other part is stored"
        self.stored[number] = (offset, data)
        numbers = sorted(self.stored)
        assert numbers == list(range(len(numbers)))
        out = b""
        for n in numbers:
            off, chunk = self.stored[n]
            assert off == len(out)
            out += chunk
        self.finished = out
        return ObjectInfo(self.key, len(out), "1")

    def _cancel(self) -> None:
        self.cancelled_at = time.monotonic()


def _data(n: int) -> bytes:
    return hashlib.shake_256(str(n).encode()).digest(n)


def _write_in_odd_chunks(writer: PartWriter, data: bytes) -> None:
    sizes = [1, 7000, 65536, 100_003, 3, 200_000]
    pos = i = 0
    while pos < len(data):
        step = sizes[i % len(sizes)]
        writer.write(data[pos : pos + step])
        pos += step
        i += 1


def test_parts_assemble_in_order_whatever_finishes_first() -> None:
    data = _data(PART * 20 + 12345)
    w = FakeWriter(parts_in_flight=4, delay=0.01)
    _write_in_odd_chunks(w, data)
    info = w.commit()
    assert w.finished == data and info.size == len(data)
    assert w.began == 1
    assert 1 < w.max_active <= 4


def test_small_object_is_one_request() -> None:
    w = FakeWriter()
    w.write(b"x" * PART)  # exactly one part: still a single put
    w.commit()
    assert w.finished == b"x" * PART and w.began == 0 and not w.stored


def test_sequential_driver_gets_one_part_at_a_time_in_order() -> None:
    data = _data(PART * 8 + 1)
    w = FakeWriter(parts_in_flight=4, delay=0.005, parallel=False)
    _write_in_odd_chunks(w, data)
    w.commit()
    assert w.finished == data
    assert w.max_active == 1
    assert w.order == sorted(w.order)


def test_memory_is_bounded_by_parts_in_flight() -> None:
    """While uploads are stalled, write() blocks once the pool is full: a fast producer cannot run ahead."""
    w = FakeWriter(parts_in_flight=3)
    w.gate.clear()
    accepted = 0
    chunk = 10_000
    done = threading.Event()

    def produce() -> None:
        nonlocal accepted
        for _ in range(PART * 40 // chunk):
            w.write(b"y" * chunk)
            accepted += chunk
        done.set()

    producer = threading.Thread(target=produce)
    producer.start()
    time.sleep(0.5)
    assert not done.is_set()
    # in flight: 3 parts; in the buffer: at most one part plus one write
    assert accepted <= (3 + 1) * PART + chunk
    assert accepted >= 3 * PART
    w.gate.set()
    producer.join(timeout=30)
    assert done.is_set()
    w.commit()
    assert w.finished == b"y" * (PART * 40 // chunk * chunk)


def test_transient_part_failure_is_retried_for_that_part_only() -> None:
    data = _data(PART * 6 + 5)
    w = FakeWriter(parts_in_flight=3)
    w.fail[2] = TransientError("flaky", key="k")
    _write_in_odd_chunks(w, data)
    w.commit()
    assert w.finished == data
    assert w.order.count(2) == 2 and w.order.count(1) == 1


def test_failing_part_aborts_the_upload() -> None:
    data = _data(PART * 30)
    w = FakeWriter(parts_in_flight=2, delay=0.01)
    w.fail_always[3] = PermanentError("rejected", key="k")
    with pytest.raises(PermanentError, match="rejected"):
        _write_in_odd_chunks(w, data)
        w.commit()
    assert w.finished is None
    assert w.cancelled_at is not None
    assert all(end <= w.cancelled_at for end in w.part_ends), "a part ran after the upload was cancelled"
    assert max(w.order) < 3 + 2 + 2, "parts kept being uploaded after one failed"
    with pytest.raises(ValueError):
        w.write(b"more")


def test_abort_waits_for_running_parts_then_cancels() -> None:
    w = FakeWriter(parts_in_flight=4, delay=0.05)
    w.write(_data(PART * 5))
    w.abort()
    w.abort()  # idempotent
    assert w.cancelled_at is not None
    assert all(end <= w.cancelled_at for end in w.part_ends)
    assert w.finished is None


def test_commit_raises_error_of_a_part_that_failed_late() -> None:
    w = FakeWriter(parts_in_flight=4, delay=0.02)
    w.fail_always[4] = PermanentError("late", key="k")
    w.write(_data(PART * 5 + 10))  # parts 0..4 handed out; part 4 fails after write() returned
    with pytest.raises(PermanentError, match="late"):
        w.commit()
    assert w.finished is None and w.cancelled_at is not None
