"""Whether the files can be ranks of one job, told as notes.

Files are paired only when they can be ranks of one job (:func:`job_identity_note`): equal
world sizes (``distributedInfo``), wall-clock windows that overlap by the files' own clock
origins (checked *before* any correction, which pairs of unrelated collectives would
otherwise invent), and shared collective sequence numbers where every file carries them.
Otherwise nothing is paired and one note names the files. Files holding fewer ranks than
their job get a note too (:func:`partial_job_note`): one rank of 64 cannot show waiting at
all; so do ranks that do not overlap in time once aligned (:func:`disjoint_ranks_note`).
"""

from __future__ import annotations

import os

import polars as pl

from traceinsight.analysis.alignment import Alignment


#: Files whose wall-clock windows are further apart than this were not recorded together
#: (clocks of one cluster agree far better; the margin covers hosts without time sync).
WINDOW_SLACK_NS = 10 * 1_000_000_000


def _file_name(path: str | None) -> str:
    return os.path.basename(path) if path else "?"


def job_identity_note(ranks: pl.DataFrame, steps: pl.DataFrame, comm: pl.DataFrame) -> str | None:
    """Why these files cannot be ranks of one job, or None when they can.

    Checked before any pairing, from what the files say about themselves: their world sizes
    (``distributedInfo``), their wall-clock windows where the files carry clock origins (on the
    files' own origins, before any correction: a correction measured from collectives that
    were never one collective would hide the gap), and the collective sequence numbers of a
    process group where every file carries them (one job's ranks share some).
    """
    if ranks.height < 2:
        return None
    rows = {r["rank"]: r for r in ranks.iter_rows(named=True)}
    sizes = {}
    for rank, row in rows.items():
        if row["world_size"] is not None:
            sizes.setdefault(row["world_size"], []).append(rank)
    if len(sizes) > 1:
        parts = "; ".join(
            f"world size {size}: rank(s) {', '.join(str(r) for r in members[:4])} "
            f"({', '.join(dict.fromkeys(_file_name(rows[r]['source']) for r in members[:4]))})"
            for size, members in sorted(sizes.items())
        )
        return f"these files are not one job ({parts}): no cross-rank waits or alignment are reported"
    origins = {r: row["clock_origin_ns"] for r, row in rows.items()}
    if steps.height and all(origin is not None for origin in origins.values()):
        spans = (
            steps.group_by("rank").agg(start=pl.col("start_ns").min(), end=pl.col("end_ns").max())
            .with_columns(origin=pl.col("rank").replace_strict(origins, default=0, return_dtype=pl.Int64))
            .select("rank", start=pl.col("start") + pl.col("origin"), end=pl.col("end") + pl.col("origin"))
            .sort("start", "rank")
        )
        # The wording of disjoint_ranks_note: the same finding, now made before pairing.
        if note := _disjoint_spans_note(spans, slack_ns=WINDOW_SLACK_NS):
            return note
    if comm.height and comm.get_column("comm_seq").is_not_null().any():
        numbered = comm.filter(pl.col("comm_seq").is_not_null())
        for (group,), part in numbered.group_by(["group"]):
            per_rank = part.group_by("rank").agg(pl.col("comm_seq").unique())
            if per_rank.height < 2:
                continue
            sets = [set(values) for values in per_rank.get_column("comm_seq").to_list()]
            if not set.intersection(*sets) and all(
                    min(a) > max(b) or min(b) > max(a) for a in sets for b in sets if a is not b):
                return (f"these files are not one job: the collectives of process group {group} carry "
                        "sequence numbers that no two files share; no cross-rank waits are reported")
    return None


def partial_job_note(ranks: pl.DataFrame) -> str | None:
    """A note when the files hold fewer ranks than the job they come from."""
    sizes = ranks.get_column("world_size").drop_nulls()
    if sizes.is_empty():
        return None
    world, loaded = int(sizes.max()), ranks.height
    if world <= loaded:
        return None
    if loaded == 1:
        return (f"this file is one rank of a {world}-rank job: waiting for other ranks cannot be measured "
                "from one rank, so cross_rank_wait is 0 because it was not measured (not because no rank "
                "waited); load the other ranks' files with it to measure waits")
    return (f"these files hold {loaded} of the job's {world} ranks: waits are measured among these only; a "
            "rank may also have waited for ranks that are not loaded")


def disjoint_ranks_note(steps: pl.DataFrame, alignment: Alignment) -> str | None:
    """A warning when some ranks do not overlap in time on the aligned clock (files of
    different runs, or a clock far off): waits between them would mean nothing.

    Only said where the clocks are known (aligned by origins or collectives)."""
    if alignment.method == "none" or steps.is_empty() or steps.get_column("rank").n_unique() < 2:
        return None
    spans = (
        steps.group_by("rank")
        .agg(start=pl.col("start_ns").min(), end=pl.col("end_ns").max())
        .with_columns(shift=pl.col("rank").replace_strict(alignment.offsets, default=0, return_dtype=pl.Int64))
        .select("rank", start=pl.col("start") + pl.col("shift"), end=pl.col("end") + pl.col("shift"))
        .sort("start", "rank")
    )
    return _disjoint_spans_note(spans, slack_ns=0)


def _disjoint_spans_note(spans: pl.DataFrame, *, slack_ns: int) -> str | None:
    """The first rank whose span (``rank, start, end``, sorted by start) begins more than
    ``slack_ns`` after every earlier one has ended, told as a note."""
    latest_rank, latest_end = None, None
    for rank, start, end in spans.iter_rows():
        if latest_end is not None and start > latest_end + slack_ns:
            return (
                f"ranks {latest_rank} and {rank} do not overlap in time: rank {rank} starts "
                f"{(start - latest_end) / 1e9:,.3f} s after rank {latest_rank} ends; were the files "
                "recorded in the same run? Cross-rank waits and comparisons are not meaningful"
            )
        if latest_end is None or end > latest_end:
            latest_rank, latest_end = rank, end
    return None
