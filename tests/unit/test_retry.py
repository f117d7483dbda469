"""The one retry layer: recovers from transient faults, gives up at its deadline, never retries by text."""

from __future__ import annotations

import pytest

from cloudbk.errors import AccessDenied, NotFound, TransientError
from cloudbk.storage.backoff import RetryPolicy
from cloudbk.storage.memory import MemoryStorage
from cloudbk.storage.retry import RetryingStorage


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _storage(deadline: float = 10.0) -> tuple[MemoryStorage, RetryingStorage, FakeClock]:
    clock = FakeClock()
    inner = MemoryStorage()
    policy = RetryPolicy(deadline=deadline, sleep=clock.sleep, clock=clock.clock)
    return inner, RetryingStorage(inner, policy), clock


def test_recovers_from_transient_faults_on_every_operation() -> None:
    inner, storage, clock = _storage()
    for op in ("commit", "stat", "open_read", "list", "delete_many"):
        inner.inject(op, times=3)
    storage.put_bytes("k", b"value")
    assert storage.stat("k").size == 5
    assert storage.get_bytes("k") == b"value"
    assert [i.key for i in storage.list("")] == ["k"]
    storage.delete_many(["k"])
    assert not inner.exists("k")
    assert len(clock.sleeps) >= 14  # list waits out its first failure inside its restart probe
    assert all(f.fired == 3 for f in inner.faults)


def test_gives_up_after_deadline_with_transient_error() -> None:
    inner, storage, clock = _storage(deadline=2.0)
    inner.inject("stat", times=10_000)
    with pytest.raises(TransientError) as info:
        storage.stat("k")
    assert clock.now <= 2.0
    assert "still failing" in str(info.value)
    assert "--retry-deadline" in str(info.value)


def test_backoff_grows_and_is_capped() -> None:
    inner, storage, clock = _storage(deadline=100.0)
    inner.inject("stat", times=12)
    storage.put_bytes("k", b"x")
    storage.stat("k")
    assert clock.sleeps[-1] <= 5.0
    assert clock.sleeps[5] > clock.sleeps[0]


@pytest.mark.parametrize("error", [NotFound, AccessDenied])
def test_non_transient_errors_are_not_retried(error: type[Exception]) -> None:
    inner, storage, clock = _storage()
    inner.inject("stat", times=1, error=lambda key: error("no", key=key))
    with pytest.raises(error):
        storage.stat("k")
    assert clock.sleeps == []


def test_read_resumes_at_offset_after_mid_stream_fault() -> None:
    inner, storage, _ = _storage()
    data = bytes(range(256)) * 1000
    inner.put_bytes("k", data)
    inner.inject("read", after=2, times=2)  # the 3rd and 4th reads fail mid-stream
    with storage.open_read("k") as reader:
        out = b""
        while chunk := reader.read(1000):
            out += chunk
    assert out == data
    assert inner.calls["open_read"] == 3  # first open + two resumptions


def test_truncated_read_is_visible_as_short_data() -> None:
    inner, storage, _ = _storage()
    inner.put_bytes("k", b"x" * 10_000)
    inner.inject("read", after=1, truncate=True)
    with storage.open_read("k") as reader:
        assert len(reader.read()) < 10_000  # higher layers catch this by checksum and size


def test_listing_restarts_without_duplicates() -> None:
    inner, storage, _ = _storage()
    for i in range(20):
        inner.put_bytes(f"k/{i:02d}", b"x")
    inner.list_page_size = 3
    inner.inject("list", after=2, times=1)
    assert [i.key for i in storage.list("k/")] == [f"k/{i:02d}" for i in range(20)]
