"""Waiting versus transfer at each matched collective.

A rank *arrives* when its kernel starts (its GPU reached the collective);
``wait = last arrival - own arrival`` is time spent spinning for the others,
``transfer = end - last arrival``; the last to arrive is the straggler. Times are on the
common clock (:mod:`traceinsight.analysis.alignment`).
"""

from __future__ import annotations

import polars as pl

from traceinsight.analysis.alignment import Alignment
from traceinsight.analysis.descriptor import Analysis

__all__ = ["match_waits"]


def match_waits(comm: pl.DataFrame, alignment: Alignment) -> pl.DataFrame:
    """Per matched collective and rank: arrival, wait, transfer and straggler (common clock),
    from the enriched collectives of all ranks (:func:`enrich_collectives`).

    Reads the paired collectives of every rank and the alignment; returns one row per
    (collective, rank).

    Returns
    -------
    polars.DataFrame
        ``key, step, group, label, rank, phase, start_ns, end_ns`` (own clock),
        ``arrival_ns, end_aligned_ns`` (common clock), ``last_arrival_ns, straggler,
        wait_ns, transfer_ns, participants, rows_sent, rows_received``.
    """
    if comm.is_empty():
        return pl.DataFrame()
    if not alignment.trusted:
        return pl.DataFrame()
    offsets = pl.col("rank").replace_strict(alignment.offsets, default=0, return_dtype=pl.Int64)
    matched = comm.filter(pl.col("key").is_not_null()).with_columns(
        arrival_ns=pl.col("start_ns") + offsets,
        end_aligned_ns=pl.col("end_ns") + offsets,
        participants=pl.col("rank").n_unique().over("key"),
    ).filter(pl.col("participants") >= 2)
    if matched.is_empty():
        return matched
    last = matched.sort(["arrival_ns", "rank"], descending=[True, False]).group_by("key").agg(
        last_arrival_ns=pl.col("arrival_ns").first(),
        straggler=pl.col("rank").first(),
        collective_end_ns=pl.col("end_aligned_ns").max(),
    )
    return (
        matched.join(last, on="key")
        .with_columns(
            # A rank can only wait while its kernel runs; clip to the kernel's own span.
            wait_ns=pl.min_horizontal(
                pl.col("last_arrival_ns") - pl.col("arrival_ns"), pl.col("end_ns") - pl.col("start_ns")
            ).clip(lower_bound=0),
            transfer_ns=(pl.col("end_aligned_ns") - pl.max_horizontal("last_arrival_ns", "arrival_ns")).clip(lower_bound=0),
        )
        .select(
            "key", "step", "group", "label", "rank", "phase", "start_ns", "end_ns", "arrival_ns",
            "end_aligned_ns", "last_arrival_ns", "collective_end_ns", "straggler", "wait_ns",
            "transfer_ns", "participants", "rows_sent", "rows_received", "payload_nelems",
        )
        .sort("arrival_ns", "rank", "key")
    )


ANALYSIS = Analysis(name="waits", phase="job 1", function=match_waits, reads=("paired collectives", "alignment"),
                    returns="arrival, wait and transfer per (collective, rank)", field="collectives")
