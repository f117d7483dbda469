"""Sets of WAL segment numbers as ranges: the index's WAL archive, what retention protects, what recovery needs.

A :data:`Ranges` value is a list of inclusive ``[first, last]`` pairs, sorted, neither overlapping nor adjacent
(``[[1, 3], [5, 5]]``, never ``[[1, 3], [4, 5]]``), so two equal sets always have equal lists. Lists, not
tuples, because that is how they are stored in the index's JSON.
"""

from __future__ import annotations

from collections.abc import Iterable

Ranges = list[list[int]]


def merge(ranges: Iterable[Iterable[int]]) -> Ranges:
    """The normal form of any pairs ``[first, last]`` (in any order, overlapping or not): same segments."""
    merged: Ranges = []
    for a, b in sorted(list(r) for r in ranges):
        if merged and a <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return merged


def add(ranges: Ranges, first: int, last: int) -> bool:
    """Add [first, last] to ``ranges`` in place; True when any of it was new."""
    if any(a <= first and last <= b for a, b in ranges):
        return False
    ranges[:] = merge([*ranges, [first, last]])
    return True


def remove(ranges: Ranges, first: int, last: int) -> None:
    """Take [first, last] out of ``ranges`` in place."""
    out: Ranges = []
    for a, b in ranges:
        if b < first or a > last:
            out.append([a, b])
            continue
        if a < first:
            out.append([a, first - 1])
        if b > last:
            out.append([last + 1, b])
    ranges[:] = out


def gaps(ranges: Ranges, first: int, last: int) -> Ranges:
    """The sub-ranges of [first, last] that ``ranges`` does not cover."""
    missing: Ranges = []
    cursor = first
    for a, b in ranges:
        if b < cursor:
            continue
        if a > last:
            break
        if a > cursor:
            missing.append([cursor, min(a - 1, last)])
        cursor = max(cursor, b + 1)
        if cursor > last:
            break
    if cursor <= last:
        missing.append([cursor, last])
    return missing


def runs(numbers: Iterable[int]) -> Ranges:
    """Consecutive runs of ``numbers`` in the order given: ``[3, 4, 5, 9]`` -> ``[[3, 5], [9, 9]]``."""
    out: Ranges = []
    for n in numbers:
        if out and out[-1][1] == n - 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return out
