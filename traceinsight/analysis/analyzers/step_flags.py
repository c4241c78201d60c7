"""Anomalous steps of one rank.

Baselines are robust and local. A step is compared with the median of its neighbours on the
same rank (``window`` steps either side, outliers left out), so a warm-up phase or a slow
drift is not called an anomaly, while a single step that stands out from the steps around it
is. How far it must stand out follows the rank's own noise: the robust spread of the steps'
ratios to their baselines (1.4826 × MAD); a step is flagged when its ratio exceeds
``1 + sigmas × spread``, kept between ``min_ratio`` (+15%) and ``max_ratio`` (+50%: a step
half again as long as its neighbours is slow however noisy the run), and it is longer by at
least ``min_excess_ns``. +30% is flagged on a run whose steps vary by ±3%; +20% is not on one
that varies by ±7%. Steps at least ``min_ratio`` above the median of all their neighbours
are candidates, left out of every baseline and of the spread estimate. Where more than a
fifth of the steps would be flagged and they are alike (the longest within the flag ratio
of the shortest), they are a second mode of the run (every fourth step runs the optimizer),
and only steps that stand out from that mode too are kept. Steps are judged on
``judged_ns`` (:mod:`~traceinsight.analysis.analyzers.judged_durations`): the last step of
a rank on its marker and the GPU work it launched, not on its window. The thresholds:
:class:`~traceinsight.analysis.anomaly_options.AnomalyOptions`.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from traceinsight.analysis.anomaly_options import MAD_TO_SIGMA, AnomalyOptions
from traceinsight.analysis.descriptor import Analysis

__all__ = ["flag_steps"]


#: Above this share of flagged steps the slow steps are a mode of the run, not outliers.
MODE_SHARE = 0.2


def _robust_sigma(values: np.ndarray) -> float:
    if values.size == 0:
        return 0.0
    median = np.median(values)
    return float(MAD_TO_SIGMA * np.median(np.abs(values - median)))


def _local_median(durations: np.ndarray, window: int, usable: np.ndarray) -> np.ndarray:
    """The baseline of each step: the median of its usable neighbours within ``window`` steps
    on each side, taken per side, and the *higher* of the two sides where both have one.

    A step that stands out from both sides is a spike; one that is like the steps on one
    side is the edge of a phase (warm-up, a change of batch size), not an anomaly. Falls
    back to the median of all usable steps where no neighbour is usable.
    """
    n = durations.size
    fallback = np.median(durations[usable]) if usable.any() else np.median(durations)
    out = np.empty(n, dtype=np.float64)
    for i in range(n):  # steps per rank are few (tens to thousands): a plain loop is fine
        left = durations[max(0, i - window):i][usable[max(0, i - window):i]]
        right = durations[i + 1:i + 1 + window][usable[i + 1:i + 1 + window]]
        sides = [np.median(side) for side in (left, right) if side.size]
        out[i] = max(sides) if sides else fallback
    return out


def _threshold(ratios: np.ndarray, options: AnomalyOptions) -> float:
    """``1 + sigmas × spread``, kept between ``min_ratio`` and ``max_ratio``."""
    band = options.sigmas * _robust_sigma(ratios)
    return 1.0 + float(np.clip(band, options.min_ratio - 1.0, options.max_ratio - 1.0))


def flag_steps(steps: pl.DataFrame, options: AnomalyOptions = AnomalyOptions()) -> pl.DataFrame:
    """Add ``baseline_ns``, ``ratio``, ``threshold`` and ``anomalous`` to the step table (per rank).

    Two passes keep outliers out of their neighbours' baselines: steps that stand out from
    all their neighbours are candidates and are left out of every local median and of the
    spread estimate; every step is then judged against the median of its usable neighbours.
    Steps are judged on ``judged_ns`` where present (:func:`judged_durations`).

    Reads one rank's step table; returns it with the flag columns.

    Examples
    --------
    >>> flag_steps(breakdown.steps).filter("anomalous").select("rank", "step")  # doctest: +SKIP
    """
    frames = []
    column = "judged_ns" if "judged_ns" in steps.columns else "duration_ns"
    for _, rank_steps in steps.sort("rank", "step").group_by("rank", maintain_order=True):
        durations = rank_steps.get_column(column).to_numpy().astype(np.float64)
        if durations.size < 3:
            frames.append(rank_steps.with_columns(
                baseline_ns=pl.col(column).cast(pl.Float64), ratio=pl.lit(1.0),
                threshold=pl.lit(None, pl.Float64), anomalous=pl.lit(False)))
            continue
        # Pass 1: steps that stand out from all their neighbours are candidates. Pass 2: the
        # baseline of every step leaves the candidates out.
        raw = _local_median(durations, options.window, np.ones(durations.size, dtype=bool))
        usable = durations < options.min_ratio * raw
        if usable.sum() < 2:
            usable = np.ones(durations.size, dtype=bool)
        baseline = _local_median(durations, options.window, usable)
        ratio = durations / np.maximum(baseline, 1.0)
        threshold = _threshold(ratio[usable] if usable.any() else ratio, options)
        anomalous = (ratio >= threshold) & (durations - baseline >= options.min_excess_ns)
        slow = durations[anomalous]
        if slow.size >= 3 and slow.size > MODE_SHARE * durations.size \
                and slow.max() < threshold * slow.min():
            # Many slow steps alike (every fourth step runs the optimizer): a second mode of
            # the run, not outliers. Keep the steps that stand out from that mode too.
            anomalous &= durations >= threshold * np.median(slow)
        frames.append(rank_steps.with_columns(
            baseline_ns=pl.Series(baseline), ratio=pl.Series(ratio),
            threshold=pl.lit(float(threshold)), anomalous=pl.Series(anomalous)))
    if not frames:
        return steps.with_columns(
            baseline_ns=pl.lit(None, pl.Float64), ratio=pl.lit(None, pl.Float64),
            threshold=pl.lit(None, pl.Float64), anomalous=pl.lit(False))
    return pl.concat(frames, how="diagonal_relaxed")


ANALYSIS = Analysis(name="step flags", phase="rank 2", function=flag_steps, reads=("judged steps",),
                    returns="steps with baseline, ratio and flag")
