"""The one retry layer: recovers from transient faults, gives up at its deadline, never retries by text."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from cloudbk.errors import (
    AccessDenied,
    IntegrityError,
    NotFound,
    OperationFailed,
    PreconditionFailed,
    StorageError,
    TransientError,
)
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


@pytest.mark.parametrize("length", [None, 9_000])
def test_truncated_read_against_a_known_length_is_an_integrity_error(length: int | None) -> None:
    inner, storage, _ = _storage()
    inner.put_bytes("k", b"x" * 10_000)
    inner.inject("read", after=1, truncate=True)  # the stream ends early without an error
    with pytest.raises(IntegrityError, match="short") as info, storage.open_read("k", 0, length) as reader:
        reader.read()
    assert info.value.key == "k"
    assert inner.calls["open_read"] == 1  # not resumed: a silent end is not a transient fault


def test_listing_restarts_without_duplicates() -> None:
    inner, storage, _ = _storage()
    for i in range(20):
        inner.put_bytes(f"k/{i:02d}", b"x")
    inner.capabilities = replace(inner.capabilities, list_page_size=3)
    inner.inject("list", after=2, times=1)
    assert [i.key for i in storage.list("k/")] == [f"k/{i:02d}" for i in range(20)]


@pytest.mark.parametrize("deadline", [5.0, 10.0])
def test_short_deadline_is_used_to_its_end_not_given_up_early(deadline: float) -> None:
    inner, storage, clock = _storage(deadline=deadline)
    inner.inject("stat", times=10_000)  # fails instantly, every time
    with pytest.raises(TransientError):
        storage.stat("k")
    # the last backoff is cut short so one more attempt happens just before the deadline, not at half of it
    assert deadline - 0.2 <= clock.now <= deadline


def test_last_attempt_gets_the_time_the_previous_one_took() -> None:
    clock = FakeClock()
    policy = RetryPolicy(deadline=5.0, sleep=clock.sleep, clock=clock.clock)
    starts: list[float] = []

    def slow_failure() -> None:
        starts.append(clock.now)
        clock.now += 1.5  # each attempt takes 1.5 s before failing
        raise TransientError("503")

    with pytest.raises(TransientError):
        policy.call(slow_failure, "stat k")
    # no backoff ate into the last attempt's time: it started right away with what was left, as late as
    # the deadline allowed, and no attempt started after the deadline
    assert len(starts) == 4 and all(b - a <= 1.5 + 0.2 for a, b in itertools.pairwise(starts))
    assert starts[-1] < 5.0 <= clock.now


def test_one_deadline_across_resumes_of_a_read() -> None:
    clock = FakeClock()
    inner = MemoryStorage()
    policy = RetryPolicy(deadline=3.0, sleep=clock.sleep, clock=clock.clock)
    storage = RetryingStorage(inner, policy)
    inner.put_bytes("k", b"x" * 100_000)

    def slow_failure(key: str) -> Exception:
        clock.now += 0.5  # each failing read takes half a second
        return TransientError("connection reset", key=key)

    inner.inject("read", after=1, times=10_000, error=slow_failure)  # every read after the first fails
    with pytest.raises(TransientError), storage.open_read("k") as reader:
        while reader.read(1000):
            pass
    assert clock.now <= 3.0 + 0.5 + 0.5  # not 3 s per resume, forever


def test_one_deadline_across_restarts_of_a_listing() -> None:
    clock = FakeClock()
    inner = MemoryStorage()
    policy = RetryPolicy(deadline=3.0, sleep=clock.sleep, clock=clock.clock)
    storage = RetryingStorage(inner, policy)
    for i in range(5):
        inner.put_bytes(f"k/{i}", b"x")
    inner.capabilities = replace(inner.capabilities, list_page_size=1)
    inner.inject("list", after=1, times=10_000)
    with pytest.raises(TransientError):
        list(storage.list("k/"))
    assert clock.now <= 3.0


def test_stall_watch_counts_only_time_spent_waiting() -> None:
    from cloudbk.storage.deadline import Deadline, Stalled, StallWatch

    clock = FakeClock()
    budget = Deadline(10.0, clock=clock.clock, running=False)
    watch = StallWatch(budget, floor=1000.0, window=2.0, key="k")
    with watch.reading():
        clock.now += 1.0
        watch.progress(100)
    clock.now += 100.0  # the consumer is busy: not the server's fault
    with watch.reading():
        clock.now += 0.5
        watch.progress(2000)  # 2100 bytes in 1.5 s of waiting: a healthy window, starts afresh
    with pytest.raises(Stalled), watch.reading():
        for _ in range(3):
            clock.now += 1.0
            watch.progress(10)
    assert not budget.running


def test_a_zero_deadline_makes_one_attempt_with_default_timeouts() -> None:
    """``--retry-deadline 0`` means "no retries", not "fail before trying": reads, listings and whole calls
    each get one attempt, and the waits inside keep their default timeouts."""
    from cloudbk.storage import deadline

    inner, storage, _ = _storage(deadline=0.0)
    inner.put_bytes("k", b"data")
    with storage.whole_call():
        assert deadline.request_timeout(60.0) == 60.0
        assert storage.get_bytes("k") == b"data"
        assert [i.key for i in storage.list("")] == ["k"]
    fault = inner.inject("stat", times=1)
    with pytest.raises(TransientError):
        storage.stat("k")
    assert fault is not None


def test_lost_races_are_retried_with_the_same_backoff_until_the_deadline() -> None:
    clock = FakeClock()
    policy = RetryPolicy(deadline=2.0, initial_delay=0.01, max_delay=0.5, sleep=clock.sleep, clock=clock.clock)
    attempts: list[float] = []

    def lose() -> None:
        attempts.append(clock.now)
        raise PreconditionFailed("changed", key="idx")

    def give_up(exc: PreconditionFailed, n: int, seconds: float) -> Exception:
        return StorageError(f"{n} conflicts in {seconds:.1f}s", key=exc.key)

    with pytest.raises(StorageError) as info:
        policy.retry(lose, (PreconditionFailed,), give_up)
    assert isinstance(info.value.__cause__, PreconditionFailed) and info.value.key == "idx"
    assert len(attempts) > 3 and 1.8 <= clock.now <= 2.0
    # non-matching errors pass straight through; a win returns at once
    with pytest.raises(NotFound):
        policy.retry(lambda: (_ for _ in ()).throw(NotFound("gone")), (PreconditionFailed,), give_up)
    assert policy.retry(lambda: 7, (PreconditionFailed,), give_up) == 7


def test_poll_waits_until_ready_or_the_deadline() -> None:
    clock = FakeClock()
    policy = RetryPolicy(deadline=10.0, sleep=clock.sleep, clock=clock.clock)
    checks = iter([False, False, True])
    policy.poll(lambda: next(checks), lambda n, s: AssertionError("gave up"))
    assert 0 < clock.now < 1
    began = clock.now
    with pytest.raises(OperationFailed, match="not ready"):
        policy.poll(lambda: False, lambda n, s: OperationFailed(f"not ready after {n} checks"))
    assert 9.8 <= clock.now - began <= 10.0
