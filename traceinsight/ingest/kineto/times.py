"""Times: every row on the rank's clock in integer nanoseconds, with no digit lost.

``ts``/``dur`` are microseconds in every era. With ``baseTimeNanoseconds`` ``ts`` is
relative and the epoch time is ``base + round(ts * 1000)`` (as Kineto and HTA define it); the
rank's ``clock_origin_ns`` is the base and ``start_ns = round(ts * 1000)``. Without it ``ts``
is absolute epoch µs; the origin is the earliest event floored to a whole µs. Absolute stamps
with a fraction (``1712195495519689.047``) have more digits than a float64 keeps, so such
files are decoded once more with ``decimal.Decimal`` timestamps to keep every nanosecond.

:func:`_needs_exact_times` tells when float64 lost digits; :func:`_exact_columns` turns the
``Decimal`` stamps of a second decode (of the whole text,
:func:`~.whole_file._exact_times`, or chunk by chunk, :class:`~.streaming._ExactTimesStream`)
into ``exact_start``/``exact_dur``; :func:`_timestamps` puts every row on the rank's clock.
"""

from __future__ import annotations

import decimal
import math
import re
from typing import TYPE_CHECKING, Any

import msgspec
import polars as pl

if TYPE_CHECKING:  # an annotation only: columns imports this module
    from traceinsight.ingest.kineto.columns import _Prepared

#: Above this many µs a float64 can no longer hold a timestamp's nanosecond digits.
_FLOAT_EXACT_LIMIT_US = 2**53 / 1000
#: An absolute epoch time in µs is at least this large (the year 2001); relative ones are not.
_EPOCH_MIN_US = 1e15
#: Larger ``ts`` (µs; the year 2116 as epoch time) or ``dur`` (73 years) values are garbage:
#: their nanoseconds would overflow int64 arithmetic.
_MAX_TS_US = 2.0**62 / 1000
_MAX_DUR_US = 2.0**61 / 1000
_MAX_EXACT_NS = 2**62


#: A ``ts`` written with a non-zero fraction.
_FRACTIONAL_STAMP = re.compile(rb'"ts"[ \t\r\n]*:[ \t\r\n]*-?[0-9]+\.[0-9]*[1-9]')


def _needs_exact_times(ts: pl.Series, text: bytes | bytearray | msgspec.Raw | None = None) -> bool:
    """True when float64 lost nanoseconds: absolute epoch µs written with a fraction.

    Near 1.7e15 a float64 step is 0.25 µs, so most fractional stamps still show one; the
    ``text`` they were decoded from, where given, shows every one.
    """
    ts = ts.drop_nulls()
    if ts.is_empty() or ts.abs().max() < _FLOAT_EXACT_LIMIT_US:
        return False
    if (ts != ts.floor()).any():
        return True
    return text is not None and _FRACTIONAL_STAMP.search(memoryview(text)) is not None


def _exact_columns(events: list[Any], exact_events: list[Any], kept: list[Any]) -> dict[str, pl.Series] | None:
    """The kept events' exact times, from ``exact_events`` decoded from the same text as
    ``events`` (one per event, in order); None if they do not line up."""
    if len(exact_events) != len(events):
        return None
    kept_ids = {id(event) for event in kept}
    thousand = decimal.Decimal(1000)
    starts: list[int | None] = []
    durations: list[int | None] = []

    def nanoseconds(value: decimal.Decimal, limit: int) -> int | None:
        if not value.is_finite():
            return None
        number = int((value * thousand).to_integral_value())
        return number if -limit < number < limit else None

    for event, exact in zip(events, exact_events):
        if id(event) in kept_ids:
            starts.append(None if exact.ts is None else nanoseconds(exact.ts, _MAX_EXACT_NS))
            durations.append(
                0 if exact.dur is None else nanoseconds(exact.dur, _MAX_EXACT_NS // 2)
            )
    return {
        "exact_start": pl.Series(starts, dtype=pl.Int64),
        "exact_dur": pl.Series(durations, dtype=pl.Int64),
    }


def _usable_ts(ts: pl.Series | pl.Expr) -> pl.Series | pl.Expr:
    """Timestamps that are numbers small enough for int64 nanoseconds."""
    return ts.is_finite() & (ts.abs() < _MAX_TS_US)


def _timestamps(
    frame: pl.DataFrame,
    base: int | None,
    prepared: _Prepared,
    warnings: list[str],
) -> tuple[pl.DataFrame, int | None]:
    """Add ``start_ns``/``end_ns`` on the rank's clock; return its origin (epoch ns).

    Events without a usable ``ts`` or ``dur`` (not a number, or so large that nanoseconds
    overflow int64) keep a null time and are dropped by :func:`guard.valid_intervals`,
    which says how many; a missing ``dur`` is zero. Negative durations give an end before
    the start and are dropped the same way.
    """
    usable = _usable_ts(pl.col("ts"))
    frame = frame.with_columns(
        ts=pl.when(usable).then(pl.col("ts")),
        dur=pl.when(pl.col("dur").is_null())
        .then(pl.lit(0.0))
        .when(pl.col("dur").is_finite() & (pl.col("dur").abs() < _MAX_DUR_US))
        .then(pl.col("dur")),
    )
    ts = pl.col("ts")
    dur_ns = (pl.col("dur") * 1000).round(0).cast(pl.Int64, strict=False)
    origin_ns: int | None
    if base is not None:
        # As the Kineto writer and HTA define it: epoch ns = base + round(ts * 1000).
        frame = frame.with_columns(
            start_ns=(ts * 1000).round(0).cast(pl.Int64, strict=False), dur_ns=dur_ns
        )
        origin_ns = base
    elif "exact_start" in frame.columns:
        first = prepared.first_exact
        origin_ns = 0 if first is None else first // 1000 * 1000
        frame = frame.with_columns(start_ns=pl.col("exact_start") - origin_ns, dur_ns=pl.col("exact_dur"))
    else:
        # Over every complete event, before rows that are no interval were dropped.
        first = prepared.first_ts
        origin_us = 0 if first is None else math.floor(first)
        # Subtract in µs first: what is left is small, so ×1000 stays exact in float64.
        frame = frame.with_columns(
            start_ns=((ts - origin_us) * 1000).round(0).cast(pl.Int64, strict=False),
            dur_ns=dur_ns,
        )
        origin_ns = origin_us * 1000
        if first is not None and first < _EPOCH_MIN_US:
            origin_ns = None
            warnings.append(
                "timestamps are relative and the file has no baseTimeNanoseconds, "
                "so the wall-clock time of the trace is unknown"
            )
    frame = frame.with_columns(end_ns=pl.col("start_ns") + pl.col("dur_ns"))
    return frame.drop("ts", "dur", "dur_ns", "exact_start", "exact_dur", strict=False), origin_ns
