"""Before/after comparison of two runs, with a verdict that knows the step-to-step noise.

Each side is the :class:`~traceinsight.analysis.findings.Findings` of one run (one or more
files), optionally restricted to a range of step numbers. Three families of quantities are
compared, each as *time per step*:

- **categories**: the step's total (``step``) and each breakdown category
  (:data:`~traceinsight.analysis.categories.CATEGORIES`) of the step window;
- **ranges**: per annotation name (``layer1.attention``), the summed CPU-side duration of its
  instances in the step;
- **kernels**: per kernel name (the short name), the summed GPU time of the kernels launched in
  the step, and how many were launched.

For every row the value per step is computed for each step of a side, then summarized by the
**median** over that side's steps. The noise is the spread *of that median*, not of single
steps: its standard error ``SE = 1.2533 · 1.4826 · MAD / sqrt(n)`` (``MAD``: median absolute
deviation of the side's ``n`` steps; normal errors). So the band narrows as a side has more
steps, and every row says how many steps it rests on (``steps_before``, ``steps_after``). A row
counts as changed only when all three hold:

- ``|Δ median| > k · sqrt(SE_before² + SE_after²)`` (``k`` = 3),
- ``|Δ median| >= min_relative · median_before`` (5 %; the after median for new rows),
- ``|Δ median| >= min_abs_ns`` (20 µs per step),

and the verdict is ``"slower"`` or ``"faster"`` by the sign of Δ; otherwise ``"unchanged"``.
With fewer than three steps on a side its MAD says little (``noise_known`` is then false) and
the two minimums decide alone. ``--fail-if-slower PCT`` uses the same verdict: it trips only
when the step row is ``"slower"`` *and* by more than PCT percent.

Ranks: each rank is summarized on its own; the row with ``rank`` null ("all") is the mean over
the side's ranks of the per-rank medians (its SE: ``sqrt(Σ SE_r²) / ranks``), so it always lies
among the per-rank rows. When both sides have the same two or more ranks (``by_rank`` auto),
the per-rank rows are given too, so a change on one rank (the straggler) is not averaged away.

Kernels present on one side only are listed as ``new`` / ``vanished``; ``launches_changed``
marks kernels whose launch count per step changed beyond its own spread.

Everything here returns polars frames or plain dicts and prints nothing;
:func:`diff_to_dict` is the JSON shape (``traceinsight diff --json``), documented there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import polars as pl

from traceinsight._version import __version__
from traceinsight.analysis.categories import CATEGORIES
from traceinsight.analysis.findings import Findings
from traceinsight.analysis.step_table import assign_to_steps
from traceinsight.errors import TraceInputError

__all__ = [
    "DiffOptions", "FindingsDiff", "diff_findings", "diff_to_dict", "restrict_steps", "slower_than",
    "EXIT_SLOWER", "STEP_ROW",
]

#: Exit status of ``traceinsight diff --fail-if-slower PCT`` when the median step got slower by
#: more than PCT percent.
EXIT_SLOWER = 3
#: Name of the step-total row in the category table.
STEP_ROW = "step"

_ROW_SCHEMA = {"rank": pl.Int32, "step": pl.Int64, "name": pl.String, "ns": pl.Int64, "count": pl.Int64}


@dataclass(frozen=True)
class DiffOptions:
    """Thresholds of the verdict (see the module docstring).

    Attributes
    ----------
    k
        Multiple of the noise (the combined standard errors of both medians) a change must exceed.
    min_relative
        Smallest change that counts, as a fraction of the before median.
    min_abs_ns
        Smallest change that counts, in ns per step.
    by_rank
        Also compare per rank: ``None`` (auto: when both sides have the same >= 2 ranks),
        ``True`` or ``False``.
    """

    k: float = 3.0
    min_relative: float = 0.05
    min_abs_ns: int = 20_000
    by_rank: bool | None = None


@dataclass
class FindingsDiff:
    """Result of :func:`diff_findings`.

    Attributes
    ----------
    before, after
        Per side: ``sources``, ``ranks``, ``gpus``, ``steps`` (numbers compared),
        ``step_source``, ``median_step_ms``, ``step_mad_ms``, ``launches_per_step``.
    categories, ranges, kernels
        One row per (rank, name), ``rank`` null for the average over ranks:
        ``before_ns, after_ns`` (medians per step), ``before_mad_ns, after_mad_ns``,
        ``delta_ns``, ``change_pct``, ``noise_ns``, ``verdict``; kernels also
        ``before_count, after_count`` (median launches per step), ``status``
        (``both``/``new``/``vanished``) and ``launches_changed``.
    summary
        ``median_step_ms_before/after``, ``step_change_pct``, ``step_verdict``, numbers of rows
        per verdict, of new and vanished kernels, of kernels whose launch count changed.
    options
        The thresholds used.
    """

    before: dict
    after: dict
    categories: pl.DataFrame
    ranges: pl.DataFrame
    kernels: pl.DataFrame
    summary: dict
    options: DiffOptions = field(default_factory=DiffOptions)

    @property
    def new_kernels(self) -> pl.DataFrame:
        """Kernels seen only after (average over ranks)."""
        return self.kernels.filter(pl.col("rank").is_null() & (pl.col("status") == "new"))

    @property
    def vanished_kernels(self) -> pl.DataFrame:
        """Kernels seen only before (average over ranks)."""
        return self.kernels.filter(pl.col("rank").is_null() & (pl.col("status") == "vanished"))


# --------------------------------------------------------------------------------------------
# One side: values per (rank, step, name)
# --------------------------------------------------------------------------------------------


def restrict_steps(findings: Findings, steps: tuple[int, int] | None) -> pl.DataFrame:
    """The step rows of ``findings`` whose number lies in ``steps`` (inclusive; all if None)."""
    table = findings.steps
    if steps is None:
        return table
    selected = table.filter(pl.col("step").is_between(steps[0], steps[1]))
    if selected.is_empty():
        numbers = table.get_column("step")
        have = f"{numbers.min()}-{numbers.max()}" if numbers.len() else "none"
        raise TraceInputError(f"no step in {steps[0]}-{steps[1]} (steps found: {have})")
    return selected


def _category_rows(steps: pl.DataFrame) -> pl.DataFrame:
    columns = {"duration_ns": STEP_ROW, **{f"{c}_ns": c for c in CATEGORIES}}
    return (
        steps.select("rank", "step", *columns)
        .unpivot(index=["rank", "step"], variable_name="name", value_name="ns")
        .with_columns(pl.col("name").replace_strict(columns), count=pl.lit(1, pl.Int64))
        .cast(_ROW_SCHEMA)
        .select(list(_ROW_SCHEMA))
    )


def _range_rows(findings: Findings, steps: pl.DataFrame) -> pl.DataFrame:
    instances = findings.range_instances
    if instances is None or instances.is_empty() or "step" not in instances.columns:
        return pl.DataFrame(schema=_ROW_SCHEMA)
    return (
        instances.join(steps.select("rank", "step"), on=["rank", "step"], how="semi")
        .group_by("rank", "step", "name")
        .agg(ns=pl.col("duration_ns").sum(), count=pl.len())
        .cast(_ROW_SCHEMA)
        .select(list(_ROW_SCHEMA))
    )


def _kernel_rows(findings: Findings, steps: pl.DataFrame) -> pl.DataFrame:
    gpu = findings.gpu
    if gpu is None or gpu.is_empty():
        return pl.DataFrame(schema=_ROW_SCHEMA)
    kernels = gpu.filter(pl.col("kind") == "kernel").select(
        "rank", "name", "start_ns", "end_ns", _when=pl.coalesce("launch_start_ns", "start_ns")
    )
    if kernels.is_empty():
        return pl.DataFrame(schema=_ROW_SCHEMA)
    # A kernel belongs to the step in which it was launched (its own start when no launch).
    return (
        assign_to_steps(kernels, steps, time_column="_when")
        .filter(pl.col("step").is_not_null())
        .group_by("rank", "step", "name")
        .agg(ns=(pl.col("end_ns") - pl.col("start_ns")).sum(), count=pl.len())
        .cast(_ROW_SCHEMA)
        .select(list(_ROW_SCHEMA))
    )


def _side_info(findings: Findings, steps: pl.DataFrame) -> dict:
    ranks = findings.ranks
    # As the "all" row of the step: the mean over ranks of each rank's median (and MAD).
    per_rank = steps.group_by("rank").agg(
        median=pl.col("duration_ns").median(),
        mad=(pl.col("duration_ns") - pl.col("duration_ns").median()).abs().median(),
    )
    median = per_rank.get_column("median").mean() if per_rank.height else None
    mad = per_rank.get_column("mad").mean() if per_rank.height else None
    launches = findings.launch_counts
    launches_per_step = None
    if launches is not None and launches.height and "launches" in launches.columns:
        chosen = launches.join(steps.select("rank", "step"), on=["rank", "step"], how="semi")
        if chosen.height:
            launches_per_step = round(float(
                chosen.group_by("step").agg(n=pl.col("launches").mean()).get_column("n").median()), 1)
    return {
        "sources": sorted({s for s in ranks.get_column("source").to_list() if s}) if ranks.height else [],
        "ranks": sorted(steps.get_column("rank").unique().to_list()),
        "gpus": sorted({g for names in ranks.get_column("gpu_names").to_list() for g in (names or [])})
        if ranks.height else [],
        "steps": sorted(steps.get_column("step").unique().to_list()),
        "step_source": findings.step_source,
        "median_step_ms": None if median is None else round(median / 1e6, 4),
        "step_mad_ms": None if mad is None else round(mad / 1e6, 4),
        "launches_per_step": launches_per_step,
    }


# --------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------


#: The standard error of a median of n normal samples is sqrt(pi/2)·sigma/sqrt(n), and sigma is
#: 1.4826·MAD: the spread of a side's median is SE_FACTOR·MAD/sqrt(n).
SE_FACTOR = 1.2533 * 1.4826


def _per_step(rows: pl.DataFrame, steps: pl.DataFrame, names: pl.Series) -> pl.DataFrame:
    """Value per (rank, step, name), zero where a name is absent from a step."""
    grid = steps.select("rank", "step").unique().join(pl.DataFrame({"name": names}), how="cross")
    full = grid.join(rows, on=["rank", "step", "name"], how="left").with_columns(
        pl.col("ns").fill_null(0), pl.col("count").fill_null(0)
    )
    return full.select("rank", "step", "name", pl.col("ns").cast(pl.Float64), pl.col("count").cast(pl.Float64))


def _summarize(per_step: pl.DataFrame) -> pl.DataFrame:
    """Per (rank, name): the median over steps and the spread *of that median* (its standard
    error, from the MAD of the steps), and per rank ``null`` the mean over ranks of both, so
    that the "all" row is the mean of the per-rank rows it summarizes."""
    n = pl.len()
    per_rank = per_step.group_by("rank", "name").agg(
        median=pl.col("ns").median(),
        mad=(pl.col("ns") - pl.col("ns").median()).abs().median(),
        count=pl.col("count").median(),
        count_mad=(pl.col("count") - pl.col("count").median()).abs().median(),
        total=pl.col("count").sum(),
        mean=pl.col("ns").mean(),
        mean_count=pl.col("count").mean(),
        steps=n,
    ).with_columns(
        se=SE_FACTOR * pl.col("mad") / pl.col("steps").sqrt(),
        count_se=SE_FACTOR * pl.col("count_mad") / pl.col("steps").sqrt(),
    )
    ranks = pl.col("rank").n_unique()
    overall = per_rank.group_by("name").agg(
        median=pl.col("median").mean(), mad=pl.col("mad").mean(), count=pl.col("count").mean(),
        count_mad=pl.col("count_mad").mean(), total=pl.col("total").sum(), mean=pl.col("mean").mean(),
        mean_count=pl.col("mean_count").mean(), steps=pl.col("steps").min(),
        se=(pl.col("se") ** 2).sum().sqrt() / ranks, count_se=(pl.col("count_se") ** 2).sum().sqrt() / ranks,
    ).with_columns(rank=pl.lit(None, pl.Int32))
    return pl.concat([overall.select(per_rank.columns), per_rank], how="vertical_relaxed")


def _compare(before_rows: pl.DataFrame, after_rows: pl.DataFrame, before_steps: pl.DataFrame,
             after_steps: pl.DataFrame, *, by_rank: bool, options: DiffOptions,
             with_counts: bool = False) -> pl.DataFrame:
    names = pl.concat([before_rows.get_column("name"), after_rows.get_column("name")]).unique().sort()
    before = _summarize(_per_step(before_rows, before_steps, names))
    after = _summarize(_per_step(after_rows, after_steps, names))
    if not by_rank:
        before, after = before.filter(pl.col("rank").is_null()), after.filter(pl.col("rank").is_null())
    joined = before.join(after, on=["rank", "name"], how="full", coalesce=True, suffix="_after", nulls_equal=True)
    fill = {c: pl.col(c).fill_null(0) for c in joined.columns if c not in ("rank", "name")}
    joined = joined.with_columns(**fill)
    delta = pl.col("median_after") - pl.col("median")
    reference = pl.when(pl.col("median") > 0).then(pl.col("median")).otherwise(pl.col("median_after"))
    noise = options.k * (pl.col("se") ** 2 + pl.col("se_after") ** 2).sqrt()
    significant = (
        (delta.abs() > noise)
        & (delta.abs() >= options.min_relative * reference)
        & (delta.abs() >= options.min_abs_ns)
    )
    out = joined.with_columns(
        before_ns=pl.col("median"),
        after_ns=pl.col("median_after"),
        before_mad_ns=pl.col("mad"),
        after_mad_ns=pl.col("mad_after"),
        delta_ns=delta,
        change_pct=pl.when(pl.col("median") > 0).then(100 * delta / pl.col("median")),
        noise_ns=noise,
        noise_known=(pl.col("steps") >= 3) & (pl.col("steps_after") >= 3),
        steps_before=pl.col("steps").cast(pl.Int64),
        steps_after=pl.col("steps_after").cast(pl.Int64),
        verdict=pl.when(significant & (delta > 0)).then(pl.lit("slower"))
        .when(significant & (delta < 0)).then(pl.lit("faster"))
        .otherwise(pl.lit("unchanged")),
    )
    columns = ["rank", "name", "before_ns", "after_ns", "delta_ns", "change_pct", "before_mad_ns",
               "after_mad_ns", "noise_ns", "noise_known", "steps_before", "steps_after", "verdict"]
    if with_counts:
        count_delta = pl.col("count_after") - pl.col("count")
        out = out.with_columns(
            before_count=pl.col("count"),
            after_count=pl.col("count_after"),
            # Mean per step: a kernel launched in a few steps only has a median of 0.
            before_mean_ns=pl.col("mean"),
            after_mean_ns=pl.col("mean_after"),
            before_mean_count=pl.col("mean_count"),
            after_mean_count=pl.col("mean_count_after"),
            status=pl.when((pl.col("total") == 0) & (pl.col("total_after") > 0)).then(pl.lit("new"))
            .when((pl.col("total") > 0) & (pl.col("total_after") == 0)).then(pl.lit("vanished"))
            .otherwise(pl.lit("both")),
            launches_changed=(count_delta != 0)
            & (count_delta.abs() > options.k * (pl.col("count_se") ** 2 + pl.col("count_se_after") ** 2).sqrt()),
        )
        columns += ["before_count", "after_count", "before_mean_ns", "after_mean_ns", "before_mean_count",
                    "after_mean_count", "status", "launches_changed"]
    order = pl.col("delta_ns").abs()
    # The name breaks ties (two kernels that changed by the same time), so that the order, and
    # with it the report, is the same on every run.
    return out.select(columns).sort(
        [pl.col("rank").is_not_null(), "rank", pl.col("verdict") == "unchanged", order, "name"],
        descending=[False, False, False, True, False],
        nulls_last=False,
    )


def diff_findings(
    before: Findings,
    after: Findings,
    *,
    steps_before: tuple[int, int] | None = None,
    steps_after: tuple[int, int] | None = None,
    options: DiffOptions = DiffOptions(),
) -> FindingsDiff:
    """Compare two analyzed runs (or two step ranges of one run).

    Parameters
    ----------
    before, after
        ``analyze(load(paths))`` of each side; they may be the same object.
    steps_before, steps_after
        Inclusive step-number ranges to compare (default: every step of the side).
    options
        Verdict thresholds.

    Returns
    -------
    FindingsDiff

    Examples
    --------
    >>> findings = analyze(traceinsight.load("h200_2rank_torch/"))  # doctest: +SKIP
    >>> result = diff_findings(findings, findings, steps_before=(16, 20), steps_after=(21, 23))  # doctest: +SKIP
    >>> result.ranges.filter(pl.col("verdict") == "slower").get_column("name").to_list()  # doctest: +SKIP
    ['layer1.attention', 'layer0.moe_dispatch', ...]
    """
    steps_b = restrict_steps(before, steps_before)
    steps_a = restrict_steps(after, steps_after)
    ranks_b = sorted(steps_b.get_column("rank").unique().to_list())
    ranks_a = sorted(steps_a.get_column("rank").unique().to_list())
    by_rank = options.by_rank
    if by_rank is None:
        by_rank = ranks_b == ranks_a and len(ranks_b) >= 2
    if by_rank and ranks_b != ranks_a:
        by_rank = False  # ranks differ: per-rank rows would compare different processes
    compare = dict(by_rank=by_rank, options=options)
    categories = _compare(_category_rows(steps_b), _category_rows(steps_a), steps_b, steps_a, **compare)
    ranges = _compare(_range_rows(before, steps_b), _range_rows(after, steps_a), steps_b, steps_a, **compare)
    kernels = _compare(_kernel_rows(before, steps_b), _kernel_rows(after, steps_a), steps_b, steps_a,
                       with_counts=True, **compare)
    # Keep the category rows in their natural order.
    order = {name: i for i, name in enumerate([STEP_ROW, *CATEGORIES])}
    categories = categories.with_columns(_o=pl.col("name").replace_strict(order, return_dtype=pl.Int32)).sort(
        [pl.col("rank").is_not_null(), "rank", "_o"], nulls_last=False
    ).drop("_o")
    info_b, info_a = _side_info(before, steps_b), _side_info(after, steps_a)
    summary = _summary(categories, ranges, kernels)
    summary["step_change_lines"] = change_lines(categories, ranges, kernels)
    return FindingsDiff(before=info_b, after=info_a, categories=categories, ranges=ranges, kernels=kernels,
                        summary=summary, options=options)


def _summary(categories: pl.DataFrame, ranges: pl.DataFrame, kernels: pl.DataFrame) -> dict:
    step = categories.filter(pl.col("rank").is_null() & (pl.col("name") == STEP_ROW))
    row = step.row(0, named=True) if step.height else None
    overall = lambda frame: frame.filter(pl.col("rank").is_null())  # noqa: E731
    verdicts = {}
    for label, frame in (("categories", categories), ("ranges", ranges), ("kernels", kernels)):
        counts = dict(overall(frame).group_by("verdict").len().iter_rows())
        verdicts[label] = {v: int(counts.get(v, 0)) for v in ("slower", "faster", "unchanged")}
    all_kernels = overall(kernels)
    per_rank = {}
    for label, frame in (("categories", categories), ("ranges", ranges), ("kernels", kernels)):
        ranked = frame.filter(pl.col("rank").is_not_null())
        counts = dict(ranked.group_by("verdict").len().iter_rows())
        per_rank[label] = {v: int(counts.get(v, 0)) for v in ("slower", "faster", "unchanged")}
    return {
        "median_step_ms_before": None if row is None else round(row["before_ns"] / 1e6, 4),
        "median_step_ms_after": None if row is None else round(row["after_ns"] / 1e6, 4),
        "step_change_pct": None if row is None or row["change_pct"] is None else round(row["change_pct"], 2),
        "step_verdict": None if row is None else row["verdict"],
        "step_noise_ms": None if row is None else round(row["noise_ns"] / 1e6, 4),
        "step_noise_known": None if row is None else bool(row["noise_known"]),
        "steps_before": None if row is None else int(row["steps_before"]),
        "steps_after": None if row is None else int(row["steps_after"]),
        "verdicts": verdicts,
        "verdicts_per_rank": per_rank,
        "new_kernels": all_kernels.filter(pl.col("status") == "new").height,
        "vanished_kernels": all_kernels.filter(pl.col("status") == "vanished").height,
        "launch_count_changes": all_kernels.filter(pl.col("launches_changed")).height,
        "changed": any(v["slower"] or v["faster"] for v in (*verdicts.values(), *per_rank.values()))
        or bool(all_kernels.filter(pl.col("status") != "both").height),
    }


def change_lines(categories: pl.DataFrame, ranges: pl.DataFrame, kernels: pl.DataFrame, *,
                 limit: int = 6) -> list[str]:
    """What changed, as plain sentences that the terminal and the HTML page both print: the
    counts of changed rows (mean over ranks, and per rank where compared), then the largest
    changed categories per rank (a change on one rank that the mean hides)."""
    lines = []
    for label, frame in (("Categories", categories.filter(pl.col("name") != STEP_ROW)), ("Ranges", ranges),
                         ("Kernels", kernels)):
        overall = frame.filter(pl.col("rank").is_null())
        if overall.is_empty():
            continue
        count = lambda f, v: f.filter(pl.col("verdict") == v).height  # noqa: E731
        text = (f"{label}: {count(overall, 'slower')} slower, {count(overall, 'faster')} faster, "
                f"{count(overall, 'unchanged')} unchanged of {overall.height} (mean over ranks)")
        ranked = frame.filter(pl.col("rank").is_not_null())
        if ranked.height:
            text += (f"; per rank {count(ranked, 'slower')} slower, {count(ranked, 'faster')} faster "
                     f"of {ranked.height} rows")
        lines.append(text)
    ranked = categories.filter(pl.col("rank").is_not_null() & (pl.col("verdict") != "unchanged")
                               & (pl.col("name") != STEP_ROW))
    for row in ranked.sort(pl.col("delta_ns").abs(), descending=True).head(limit).iter_rows(named=True):
        pct = "new" if row["change_pct"] is None else f"{row['change_pct']:+.0f}%"
        lines.append(f"rank {row['rank']} {row['name']}: {row['before_ns'] / 1e6:,.3f} -> "
                     f"{row['after_ns'] / 1e6:,.3f} ms per step ({pct}), {row['verdict']}")
    return lines


def slower_than(diff: FindingsDiff, percent: float) -> bool:
    """True when the median step is *slower* (the verdict the report prints: beyond the noise)
    and by more than ``percent`` percent: ``--fail-if-slower`` and the printout never disagree."""
    change = diff.summary.get("step_change_pct")
    return diff.summary.get("step_verdict") == "slower" and change is not None and change > percent


# --------------------------------------------------------------------------------------------
# JSON shape
# --------------------------------------------------------------------------------------------


def _ms(ns) -> float | None:
    return None if ns is None else round(float(ns) / 1e6, 4)


def _rows(frame: pl.DataFrame, *, limit: int | None = None, counts: bool = False) -> list[dict]:
    out = []
    for row in (frame if limit is None else frame.head(limit)).iter_rows(named=True):
        entry = {
            "name": row["name"],
            "rank": row["rank"],
            "before_ms": _ms(row["before_ns"]),
            "after_ms": _ms(row["after_ns"]),
            "delta_ms": _ms(row["delta_ns"]),
            "change_pct": None if row["change_pct"] is None else round(row["change_pct"], 2),
            "before_mad_ms": _ms(row["before_mad_ns"]),
            "after_mad_ms": _ms(row["after_mad_ns"]),
            "noise_ms": _ms(row["noise_ns"]),
            "noise_known": bool(row["noise_known"]),
            "steps_before": row["steps_before"],
            "steps_after": row["steps_after"],
            "verdict": row["verdict"],
        }
        if counts:
            entry.update(
                count_before=round(float(row["before_count"]), 2), count_after=round(float(row["after_count"]), 2),
                mean_before_ms=_ms(row["before_mean_ns"]), mean_after_ms=_ms(row["after_mean_ns"]),
                mean_count_before=round(float(row["before_mean_count"]), 2),
                mean_count_after=round(float(row["after_mean_count"]), 2),
                status=row["status"], launches_changed=bool(row["launches_changed"]),
            )
        out.append(entry)
    return out


def diff_to_dict(diff: FindingsDiff, *, max_rows: int | None = 500) -> dict:
    """The JSON-ready diff (``traceinsight diff --json``; the HTML report's diff section).

    Shape (times in ms per step, medians over each side's steps)::

        {"traceinsight_version": "0.1.0",
         "before": {"sources": [...], "ranks": [0, 1], "gpus": [...], "steps": [16, ..., 20],
                    "step_source": "marker", "median_step_ms": 12.3, "step_mad_ms": 0.2,
                    "launches_per_step": 400.0},
         "after": {... same keys ...},
         "options": {"k": 3.0, "min_relative": 0.05, "min_abs_ns": 20000, "by_rank": null},
         "summary": {"median_step_ms_before", "median_step_ms_after", "step_change_pct",
                     "step_verdict", "step_noise_ms", "step_noise_known", "steps_before",
                     "steps_after", "verdicts": {"categories"|"ranges"|"kernels":
                     {"slower": n, "faster": n, "unchanged": n}}, "verdicts_per_rank": {...},
                     "step_change_lines": [sentence, ...], "new_kernels": n,
                     "vanished_kernels": n, "launch_count_changes": n, "changed": bool},
         "categories": [row, ...],          # "step" (the total) and every breakdown category
         "ranges": [row, ...],
         "kernels": [row + {"count_before", "count_after", "status", "launches_changed"}, ...],
         "new_kernels": [kernel row, ...], "vanished_kernels": [kernel row, ...]}

    A row: ``{"name", "rank" (null: mean over ranks), "before_ms", "after_ms", "delta_ms",
    "change_pct" (null when before is 0), "before_mad_ms", "after_mad_ms", "noise_ms",
    "noise_known", "steps_before", "steps_after", "verdict": "slower"|"faster"|"unchanged"}``;
    kernel rows also ``mean_before_ms``/``mean_after_ms`` and ``mean_count_before/after`` (means
    per step: a kernel launched in some steps only has a median of 0). Rows are ordered: averages
    first, then per rank; changed rows before unchanged ones, larger changes first.
    ``max_rows`` caps the ranges and kernels lists (changed rows come first, so they are kept).
    """
    return {
        "traceinsight_version": __version__,
        "before": diff.before,
        "after": diff.after,
        "options": asdict(diff.options),
        "summary": diff.summary,
        "categories": _rows(diff.categories),
        "ranges": _rows(diff.ranges, limit=max_rows),
        "kernels": _rows(diff.kernels, limit=max_rows, counts=True),
        "new_kernels": _rows(diff.new_kernels, counts=True),
        "vanished_kernels": _rows(diff.vanished_kernels, counts=True),
    }
