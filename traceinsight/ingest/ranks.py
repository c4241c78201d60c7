"""Rank numbers unique across files: each file says its rank, and two files may say the same.

Shared by :func:`traceinsight.ingest.load` (one file per rank) and the reader of merged files
(one document per rank); the Ray engine renumbers models read in its actors the same way.
"""

from __future__ import annotations

import polars as pl

from traceinsight.model import TraceModel


def rank_mapping(claimed: list[list[int]]) -> tuple[list[dict[int, int]], bool]:
    """Per file, old rank -> new rank, and whether ranks had to be renumbered.

    Files normally say their rank (``distributedInfo.rank``, ``RANK`` in the environment).
    When two files claim the same rank, every rank is renumbered in file order.
    """
    flat = [rank for ranks in claimed for rank in ranks]
    if len(flat) == len(set(flat)):
        return [{rank: rank for rank in ranks} for ranks in claimed], False
    mappings, next_rank = [], 0
    for ranks in claimed:
        mapping = {}
        for old in ranks:
            mapping[old] = next_rank
            next_rank += 1
        mappings.append(mapping)
    return mappings, True


def renumber(model: TraceModel, mapping: dict[int, int]) -> TraceModel:
    """``model`` with its ranks renumbered by ``mapping`` (``rank_source`` says so)."""
    remap = pl.col("rank").replace_strict(mapping, return_dtype=pl.Int32)
    return TraceModel(
        intervals=model.intervals.with_columns(remap),
        samples=model.samples.with_columns(remap),
        ranks=model.ranks.with_columns(remap, rank_source=pl.lit("file order (ranks in files collided)")),
        warnings=model.warnings,
    )


def assign_ranks(models: list[TraceModel]) -> list[TraceModel]:
    """Make rank numbers unique across files (see :func:`rank_mapping`)."""
    mappings, changed = rank_mapping([m.ranks.get_column("rank").to_list() for m in models])
    if not changed:
        return models
    return [renumber(model, mapping) for model, mapping in zip(models, mappings)]
