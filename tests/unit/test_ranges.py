"""cloudbk.repo.ranges against a model: every range list over a small universe, compared with Python sets."""

from __future__ import annotations

import itertools

import pytest

from cloudbk.repo import ranges
from cloudbk.repo.ranges import Ranges

UNIVERSE = range(0, 7)
PAIRS = [[a, b] for a in UNIVERSE for b in UNIVERSE if a <= b]


def members(rs: Ranges) -> set[int]:
    return {n for a, b in rs for n in range(a, b + 1)}


def normal(rs: Ranges) -> bool:
    return all(a <= b for a, b in rs) and all(rs[i][1] + 1 < rs[i + 1][0] for i in range(len(rs) - 1))


def every_set() -> list[Ranges]:
    """Every subset of UNIVERSE, in normal form."""
    out = []
    for bits in range(1 << len(UNIVERSE)):
        out.append(ranges.runs(n for n in UNIVERSE if bits >> n & 1))
    return out


def test_merge_of_any_pairs_is_the_normal_form_of_their_union() -> None:
    for combo in itertools.chain.from_iterable(itertools.combinations(PAIRS, k) for k in range(4)):
        pairs = [list(p) for p in combo]
        merged = ranges.merge(pairs)
        assert normal(merged)
        assert members(merged) == members(pairs)
    assert ranges.merge([[5, 6], [1, 3], [4, 4]]) == [[1, 6]]


@pytest.mark.parametrize("first, last", PAIRS)
def test_add_remove_gaps_agree_with_sets(first: int, last: int) -> None:
    span = set(range(first, last + 1))
    for rs in every_set():
        added = [list(r) for r in rs]
        assert ranges.add(added, first, last) == (not span <= members(rs))
        assert normal(added) and members(added) == members(rs) | span

        removed = [list(r) for r in rs]
        ranges.remove(removed, first, last)
        assert normal(removed) and members(removed) == members(rs) - span

        missing = ranges.gaps(rs, first, last)
        assert normal(missing) and members(missing) == span - members(rs)


def test_runs_keep_the_order_given() -> None:
    assert ranges.runs([3, 4, 5, 9]) == [[3, 5], [9, 9]]
    assert ranges.runs([]) == []
    assert ranges.runs([7, 8, 2, 3]) == [[7, 8], [2, 3]]
