"""Interval algebra on numpy arrays of integer nanoseconds.

A *set* here is a pair ``(starts, ends)`` of int64 arrays describing disjoint, sorted,
half-open intervals ``[start, end)``. Everything is vectorized: no Python loop per interval.
"""

from __future__ import annotations

import numpy as np

IntervalSet = tuple[np.ndarray, np.ndarray]

EMPTY: IntervalSet = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))


def merge(starts, ends) -> IntervalSet:
    """Union of possibly overlapping intervals, as a disjoint sorted set.

    >>> merge([5, 0, 2], [6, 3, 4])
    (array([0, 5]), array([4, 6]))
    """
    starts = np.asarray(starts, dtype=np.int64)
    ends = np.asarray(ends, dtype=np.int64)
    keep = ends > starts
    starts, ends = starts[keep], ends[keep]
    if starts.size == 0:
        return EMPTY
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], ends[order]
    running_end = np.maximum.accumulate(ends)
    # A new block starts where an interval begins after everything before it has ended.
    new_block = np.empty(starts.size, dtype=bool)
    new_block[0] = True
    new_block[1:] = starts[1:] > running_end[:-1]
    block_starts = starts[new_block]
    block_last = np.flatnonzero(np.append(new_block[1:], True))
    return block_starts, running_end[block_last]


def complement(a: IntervalSet, lo: int, hi: int) -> IntervalSet:
    """The parts of ``[lo, hi)`` not covered by ``a``."""
    starts, ends = clip(a, lo, hi)
    gap_starts = np.concatenate([[lo], ends])
    gap_ends = np.concatenate([starts, [hi]])
    keep = gap_ends > gap_starts
    return gap_starts[keep].astype(np.int64), gap_ends[keep].astype(np.int64)


def clip(a: IntervalSet, lo: int, hi: int) -> IntervalSet:
    """``a`` restricted to ``[lo, hi)``."""
    starts, ends = a
    starts = np.maximum(starts, lo)
    ends = np.minimum(ends, hi)
    keep = ends > starts
    return starts[keep], ends[keep]


def intersect(a: IntervalSet, b: IntervalSet) -> IntervalSet:
    """Intersection of two disjoint sorted sets.

    Each interval of ``a`` meets a contiguous run of ``b`` (found by binary search); the
    pairs are expanded and clipped, so the cost is O((n + m) log m + pairs).
    """
    a_starts, a_ends = a
    b_starts, b_ends = b
    if a_starts.size == 0 or b_starts.size == 0:
        return EMPTY
    first = np.searchsorted(b_ends, a_starts, side="right")
    last = np.searchsorted(b_starts, a_ends, side="left")
    counts = np.maximum(last - first, 0)
    owner = np.repeat(np.arange(a_starts.size), counts)
    if owner.size == 0:
        return EMPTY
    offsets = np.arange(owner.size) - np.repeat(np.cumsum(counts) - counts, counts)
    partner = first[owner] + offsets
    starts = np.maximum(a_starts[owner], b_starts[partner])
    ends = np.minimum(a_ends[owner], b_ends[partner])
    keep = ends > starts
    # Pairs come out in order of a, then b: already sorted and disjoint.
    return starts[keep], ends[keep]


def subtract(a: IntervalSet, b: IntervalSet) -> IntervalSet:
    """``a`` minus ``b`` for disjoint sorted sets."""
    a_starts, a_ends = a
    if a_starts.size == 0 or b[0].size == 0:
        return a_starts.copy(), a_ends.copy()
    lo = int(min(a_starts[0], b[0][0]))
    hi = int(max(a_ends[-1], b[1][-1]))
    return intersect(a, complement(b, lo, hi))


def holding(starts: np.ndarray, ends: np.ndarray, points) -> np.ndarray:
    """For each point, the index of the interval that starts last at or before it, if the
    point lies before that interval's end; -1 otherwise.

    ``starts`` must be sorted; the intervals may overlap (step windows may), in which case
    only the latest-starting one is looked at.

    >>> holding(np.array([0, 10]), np.array([5, 20]), np.array([-1, 3, 7, 10, 25]))
    array([-1,  0, -1,  1, -1])
    """
    points = np.asarray(points)
    if starts.size == 0:
        return np.full(points.shape, -1, dtype=np.int64)
    index = np.searchsorted(starts, points, side="right") - 1
    inside = (index >= 0) & (points < ends[np.clip(index, 0, None)])
    return np.where(inside, index, -1)


def covered(a: IntervalSet, points: np.ndarray) -> np.ndarray:
    """For each point, whether it lies inside an interval of ``a`` (half-open)."""
    return holding(*a, points) >= 0


def covered_length_before(a: IntervalSet, points: np.ndarray) -> np.ndarray:
    """Total length of ``a`` that lies before each point (a cumulative measure)."""
    starts, ends = a
    points = np.asarray(points, dtype=np.int64)
    if starts.size == 0:
        return np.zeros(points.shape, dtype=np.int64)
    cumulative = np.concatenate([[0], np.cumsum(ends - starts)])
    index = np.searchsorted(starts, points, side="right") - 1
    safe = np.clip(index, 0, None)
    partial = np.minimum(points, ends[safe]) - starts[safe]
    return np.where(index >= 0, cumulative[safe] + partial, 0)


def overlap_per_window(a: IntervalSet, window_starts, window_ends) -> np.ndarray:
    """Length of ``a`` inside each window ``[window_start, window_end)``."""
    window_starts = np.asarray(window_starts, dtype=np.int64)
    window_ends = np.asarray(window_ends, dtype=np.int64)
    return covered_length_before(a, window_ends) - covered_length_before(a, window_starts)


def total(a: IntervalSet) -> int:
    """Total covered length."""
    return int((a[1] - a[0]).sum())
