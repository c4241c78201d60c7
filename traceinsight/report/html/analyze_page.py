"""The analysis report (``analyze --html``): summary, step durations and breakdown,
cross-rank waiting, anomaly cards with their step timelines, CPU gaps, kernels and ranges.

:func:`render_html` assembles the sections in :func:`~.shell.page_shell`.
"""

from __future__ import annotations

import datetime as _dt
import statistics
from collections import Counter

import numpy as np
import polars as pl

from traceinsight._version import __version__
from traceinsight.analysis.categories import CATEGORIES
from traceinsight.analysis.places import anomaly_range
from traceinsight.analysis.timeline import report_anomalies, typical_steps
from traceinsight.report.records import anomaly_records, imbalance_records, straggler_records
from traceinsight.report.html.figure import Figure, trace
from traceinsight.report.html.shell import CATEGORY_COLORS, MAX_TABLE_ROWS, _AXIS, _BASE_LAYOUT, Cell, _layout, _ms
from traceinsight.report.html.shell import _Page, _signed_ms, _table, esc, num_cell, page_shell, text_cell

#: Colors of timeline rows: GPU work and gaps take the color of their category.
KIND_COLORS = {
    "annotation": "#6B7A99",
    "launch": "#9A9A9A",
    "cuda_api": "#C9C9C9",
    "sync": CATEGORY_COLORS["host_sync"],
    "cpu_gap": CATEGORY_COLORS["cpu_gap"],
    "kernel": CATEGORY_COLORS["gpu_compute"],
    "comm_kernel": CATEGORY_COLORS["communication"],
    "memcpy": CATEGORY_COLORS["gpu_memory"],
    "memset": CATEGORY_COLORS["gpu_memory"],
}
KIND_LABELS = {
    "annotation": "range",
    "launch": "launch call",
    "cuda_api": "other CUDA API",
    "sync": "sync call",
    "cpu_gap": "CPU gap",
    "kernel": "kernel",
    "comm_kernel": "comm. kernel",
    "memcpy": "memcpy/memset",
    "memset": "memcpy/memset",
}
RANK_COLORS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd",
)
ANOMALY_COLOR = "#111111"
HIGHLIGHT_SPAN = "rgba(255, 196, 0, 0.13)"
HIGHLIGHT_FILL = "rgba(255, 160, 0, 0.45)"
HIGHLIGHT_LINE = "#A67C00"

#: Up to this many ranks the step durations are lines; beyond, a rank × step heatmap.
LINE_RANKS = 16
#: Beyond LINE_RANKS ranks, the breakdown selector offers this many ranks (those with the
#: most anomalous steps, then the slowest), besides the mean and the slowest rank of each step.
BREAKDOWN_RANKS = 8
#: At most this many anomaly cards (the rest are listed in a table).
MAX_CARDS = 30
#: Headline sentences in the summary.
MAX_HEADLINES = 8


def _f32(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def _cat_ms(frame: pl.DataFrame) -> dict[str, np.ndarray]:
    return {c: frame.get_column(f"{c}_ns").cast(pl.Float64).to_numpy() / 1e6 for c in CATEGORIES}


# ----------------------------------------------------------------------------- summary

class _Lookups:
    """The rows of the findings that the headlines and anomaly cards read, as Python values.

    A card reads a few rows (its step, its rank's typical step, its range instances, its
    step's largest CPU gap); a polars query for each costs more than the card's drawing, so
    the rows of the anomalies' ranks are fetched once, in a few whole-frame queries.
    """

    def __init__(self, findings, anomalies: list[dict]) -> None:
        ranks = sorted({a["rank"] for a in anomalies if a.get("rank") is not None})
        names = sorted({anomaly_range(a) for a in anomalies} - {None, ""})
        steps = findings.steps.filter(pl.col("rank").is_in(ranks)) if ranks else findings.steps.head(0)
        self.step_rows: dict[int, list[dict]] = {}
        self.step_row: dict[tuple[int, int], dict] = {}
        for row in steps.iter_rows(named=True):
            self.step_rows.setdefault(row["rank"], []).append(row)
            self.step_row.setdefault((row["rank"], row["step"]), row)
        self.typical = typical_steps(findings) if ranks else {}
        instances = findings.range_instances
        self.has_instances = bool(instances.height)
        if ranks and names and instances.height:
            instances = instances.filter(pl.col("rank").is_in(ranks) & pl.col("name").is_in(names))
        else:
            instances = instances.head(0)
        self.instances: dict[tuple[int, str], list[dict]] = {}
        for row in instances.iter_rows(named=True):
            self.instances.setdefault((row["rank"], row["name"]), []).append(row)
        self.largest_gap: dict[tuple[int, int], dict] = {}
        gaps = findings.cpu_gaps
        pairs = {(a["rank"], a["step"]) for a in anomalies if a.get("rank") is not None and a.get("step") is not None}
        if pairs and gaps.height and "step" in gaps.columns:
            wanted = pl.DataFrame({"rank": [r for r, _ in pairs], "step": [s for _, s in pairs]},
                                  schema={"rank": gaps.schema["rank"], "step": gaps.schema["step"]})
            largest = (gaps.join(wanted, on=["rank", "step"], how="semi").sort("duration_ns", descending=True)
                       .group_by("rank", "step", maintain_order=True).first())
            self.largest_gap = {(row["rank"], row["step"]): row for row in largest.iter_rows(named=True)}
        #: the bars of each timeline frame drawn so far (see :func:`_timeline_figure`)
        self.drawn: dict[int, dict] = {}

    def instance(self, anomaly: dict) -> dict | None:
        """The range instance a range anomaly names (same rank, range and start)."""
        for row in self.instances.get((anomaly["rank"], anomaly_range(anomaly)), []):
            if row["start_ns"] == anomaly.get("start_ns"):
                return row
        return None


def _ratio_of(anomaly: dict, lookups: _Lookups) -> float | None:
    if anomaly.get("kind", "step") == "step":
        typical = anomaly.get("typical_ms") or 0
        return anomaly["duration_ms"] / typical if typical else None
    if "start_ns" not in anomaly:
        return None
    row = lookups.instance(anomaly)
    if row is None:
        return None
    return row["duration_ns"] / row["typical_ns"] if row.get("typical_ns") else None


def headline(anomaly: dict, findings, lookups: _Lookups | None = None) -> str:
    """One sentence (plain text, not escaped) for an anomaly."""
    ratio = _ratio_of(anomaly, lookups or _Lookups(findings, [anomaly]))
    excess = anomaly.get("excess_ms") or 0.0
    times = f"{ratio:.1f}x " if ratio else ""
    if anomaly.get("kind", "step") == "step":
        return (f"step {anomaly['step']} on rank {anomaly['rank']} was {times}slower (+{_ms(excess)} ms): "
                f"{anomaly['where']}, {anomaly['cause']}")
    return (f"{anomaly['where']} in step {anomaly['step']} on rank {anomaly['rank']} took {times}its typical "
            f"time (+{_ms(excess)} ms): {anomaly['cause']}")


def _summary(findings, page: _Page, anomalies: list[dict], lookups: _Lookups, *, show_host: bool) -> str:
    steps = findings.steps
    ranks = findings.ranks.sort("rank") if findings.ranks.height else findings.ranks
    n_ranks = ranks.height or steps.get_column("rank").n_unique()
    per_rank = steps.group_by("rank").agg(n=pl.len(), lo=pl.col("start_ns").min(), hi=pl.col("end_ns").max())
    span_ms = float((per_rank.get_column("hi") - per_rank.get_column("lo")).max() or 0) / 1e6
    gpus: Counter = Counter()
    for names in (ranks.get_column("gpu_names").to_list() if "gpu_names" in ranks.columns else []):
        for name in names or []:
            gpus[name] += 1
    gpu_text = ", ".join(f"{n} × {name}" for name, n in gpus.most_common()) or "unknown"
    recorded = ""
    if "clock_origin_ns" in ranks.columns and ranks.height and steps.height:
        origin = ranks.get_column("clock_origin_ns").drop_nulls()
        if origin.len():
            first = int(origin.min()) + int(steps.get_column("start_ns").min())
            when = _dt.datetime.fromtimestamp(first / 1e9, tz=_dt.timezone.utc)
            recorded = f"<dt>recorded</dt><dd>{esc(when.strftime('%Y-%m-%d %H:%M:%S UTC'))}</dd>"
    steps_per_rank = per_rank.get_column("n")
    marker = ""
    if findings.step_pattern:
        marker = f' <code title="{esc(findings.step_pattern, 400)}">{esc(findings.step_pattern, 40)}</code>'
    steps_text = (f"{steps.height} step windows (from step markers{marker})" if findings.step_source == "marker"
                  else f"{steps.height} step window(s) ({esc(findings.step_source)})")
    if findings.step_source == "whole trace":
        steps_text = "no step markers: the whole trace is one step window per rank"
    elif n_ranks > 1 and steps_per_rank.len():
        lo, hi = steps_per_rank.min(), steps_per_rank.max()
        steps_text += f", {lo} per rank" if lo == hi else f", {lo}–{hi} per rank"
    n_anomalous = int(steps.get_column("anomalous").sum()) if "anomalous" in steps.columns else 0
    facts = (
        f"<dl class=\"facts\"><dt>ranks</dt><dd>{n_ranks}</dd><dt>GPUs</dt><dd>{esc(gpu_text)}</dd>"
        f"<dt>steps</dt><dd>{steps_text}</dd>"
        f"<dt>time span</dt><dd>{_ms(span_ms)} ms of steps per rank (longest)</dd>{recorded}"
        f"<dt>anomalies</dt><dd>{n_anomalous} anomalous step(s), "
        f"{findings.anomalies.filter(pl.col('kind') == 'range').height} anomalous range instance(s)</dd></dl>"
    )

    lines = []
    totals = {c: float(steps.get_column(f"{c}_ns").sum() or 0) for c in CATEGORIES}
    whole = sum(totals.values()) or 1.0
    busy = totals["gpu_compute"] / whole
    worst = max((c for c in CATEGORIES if c != "gpu_compute"), key=lambda c: totals[c])
    lines.append(f"The GPUs computed during {busy:.0%} of step time; the largest other share is "
                 f"{worst} ({totals[worst] / whole:.0%}).")
    for anomaly in anomalies[:MAX_HEADLINES]:
        lines.append(headline(anomaly, findings, lookups) + ".")
    if not anomalies:
        lines.append("No step and no range instance stood out from its neighbours.")
    elif len(anomalies) > MAX_HEADLINES:
        lines.append(f"… and {len(anomalies) - MAX_HEADLINES} more anomalies (see below).")
    if findings.waits.height:
        frame = findings.waits
        top = frame.group_by("waiting_for_rank").agg(ms=pl.col("wait_ms").sum()).sort("ms", descending=True).row(0)
        lines.append(f"Ranks waited {_ms(float(frame.get_column('wait_ms').sum()))} ms in all for other ranks; "
                     f"most for rank {top[0]} ({_ms(top[1])} ms).")
    headline_html = "<ol class=\"headlines\">" + "".join(f"<li>{esc(line, 600)}</li>" for line in lines) + "</ol>"

    # Overall breakdown: one bar for all ranks (and one per rank up to LINE_RANKS ranks).
    labels = ["all ranks"]
    shares = {c: [totals[c] / whole * 100] for c in CATEGORIES}
    rank_ids = sorted(steps.get_column("rank").unique().to_list())
    if 1 < len(rank_ids) <= LINE_RANKS:
        for rank in rank_ids:
            sub = steps.filter(pl.col("rank") == rank)
            sub_totals = {c: float(sub.get_column(f"{c}_ns").sum() or 0) for c in CATEGORIES}
            sub_whole = sum(sub_totals.values()) or 1.0
            labels.append(f"rank {rank}")
            for c in CATEGORIES:
                shares[c].append(sub_totals[c] / sub_whole * 100)
    fig = Figure()
    for c in CATEGORIES:
        fig.add_trace(trace("bar",
            y=labels, x=[round(v, 2) for v in shares[c]], orientation="h", name=c,
            marker=dict(color=CATEGORY_COLORS[c], line=dict(width=0)),
            hovertemplate=f"{c}: %{{x:.1f}}%% of step time<extra>%{{y}}</extra>",
        ))
    _layout(fig, barmode="stack", legend=dict(orientation="h", yref="container", y=1, yanchor="top", x=0,
                                               traceorder="normal"),
            margin=dict(l=80, r=20, t=36, b=50))
    fig.update_xaxes(title_text="share of step time (%)", range=[0, 100])
    fig.update_yaxes(autorange="reversed", showgrid=False)
    overview = page.figure(fig, height=120 + 28 * len(labels), modebar=False)

    rank_rows = []
    for row in ranks.iter_rows(named=True):
        cells = [num_cell(row["rank"], "{:d}"), text_cell(row.get("format")),
                 text_cell(", ".join(row.get("gpu_names") or []) or "?"), text_cell(row.get("rank_source")),
                 num_cell((row.get("clock_offset_ns") or 0) / 1e3, "{:,.1f}"),
                 text_cell(row.get("source"), 100)]
        if show_host:
            cells.append(text_cell(row.get("hostname")))
        rank_rows.append(cells)
    headers = ["rank", "format", "GPU", "rank from", "clock offset (µs)", "file"] + (["host"] if show_host else [])
    note = f"{len(rank_rows)} ranks, first {MAX_TABLE_ROWS * 2} shown." if len(rank_rows) > MAX_TABLE_ROWS * 2 else ""
    rank_table = _table(headers, rank_rows[: MAX_TABLE_ROWS * 2], numeric={0, 4}, note=note)
    warnings = ""
    if findings.warnings:  # first: they change how everything below reads
        notes = list(dict.fromkeys(findings.warnings))
        warnings = ("<div class=\"warnings\"><h3>Notes on the input</h3><ul>"
                    + "".join(f"<li>{esc(w, 400)}</li>" for w in notes[:50]) + "</ul></div>")
    return (f'<section id="summary"><h2>Summary</h2>{warnings}{facts}<h3>Headline findings</h3>{headline_html}'
            f'<h3>Where the step time went</h3>{overview}'
            f'<details><summary>Ranks ({n_ranks})</summary>{rank_table}</details></section>')


# ----------------------------------------------------------------------------- steps

#: A step longer than this many times the median makes the step chart logarithmic and cuts the
#: breakdown chart's axis (the outlier's bar is marked with its total).
OUTLIER_RATIO = 5.0


def single_step(findings) -> bool:
    """True when every rank has one step window (the whole trace): a chart over steps would
    have one point per line; the report draws a breakdown bar per rank instead."""
    steps = findings.steps
    return bool(steps.height) and int(steps.group_by("rank").len().get_column("len").max()) == 1


def _outliers(durations_ms: np.ndarray) -> tuple[bool, float]:
    """(whether the spread is large, the median) of step durations."""
    values = durations_ms[np.isfinite(durations_ms)]
    # _median (statistics.median), not np.median: the same value, without np.median importing
    # numpy.ma (20 ms of a report that takes a few hundred).
    median = _median(values.tolist())
    if values.size < 3:
        return False, median
    return bool(median > 0 and values.max() > OUTLIER_RATIO * median), median


def _log_ticks(low: float, high: float) -> list[float]:
    """1-2-5 ticks from below ``low`` to above ``high`` (a log axis labelled in plain ms)."""
    ticks = []
    for exponent in range(int(np.floor(np.log10(max(low, 1e-6)))), int(np.ceil(np.log10(max(high, 1e-6)))) + 1):
        ticks += [m * 10.0 ** exponent for m in (1, 2, 5)]
    inside = [t for t in ticks if low / 2 <= t <= high * 2]
    return [round(t, 6) for t in inside]


def _single_step(findings, page: _Page) -> str:
    """One step window per rank: one stacked bar per rank, in ms (no chart over steps)."""
    steps = findings.steps.sort("rank")
    shown = steps.head(MAX_TABLE_ROWS)
    labels = [f"rank {r}" for r in shown.get_column("rank").to_list()]
    fig = Figure()
    cats = _cat_ms(shown)
    for c in CATEGORIES:
        fig.add_trace(trace("bar",
            y=labels, x=np.round(cats[c], 3), orientation="h", name=c,
            marker=dict(color=CATEGORY_COLORS[c], line=dict(width=0)),
            hovertemplate=f"{c}: %{{x:.2f}} ms<extra>%{{y}}</extra>",
        ))
    _layout(fig, barmode="stack", legend=dict(orientation="h", yref="container", y=1, yanchor="top", x=0,
                                               traceorder="normal"), margin=dict(l=80, r=20, t=36, b=50))
    fig.update_xaxes(title_text="ms (the whole step window)", rangemode="tozero")
    fig.update_yaxes(autorange="reversed", showgrid=False, type="category")
    total = float(steps.get_column("duration_ns").max() or 0) / 1e6
    note = (f"Each rank's trace is one step window ({esc(findings.step_source)}; longest {_ms(total)} ms): "
            "there is no step-to-step chart, only where the window's time went.")
    if steps.height > shown.height:
        note += f" First {shown.height} of {steps.height} ranks shown."
    return (f'<section id="steps"><h2>The step window</h2><p class="note">{note}</p>'
            f"{page.figure(fig, height=110 + 30 * len(labels))}</section>")


def _step_durations(findings, page: _Page) -> str:
    if single_step(findings):
        return _single_step(findings, page)
    steps = findings.steps.sort("rank", "step")
    rank_ids = sorted(steps.get_column("rank").unique().to_list())
    anomalous = steps.filter(pl.col("anomalous")) if "anomalous" in steps.columns else steps.head(0)
    spread, median = _outliers(steps.get_column("duration_ns").to_numpy() / 1e6)
    fig = Figure()
    if len(rank_ids) <= LINE_RANKS:
        with_hover = steps.height <= 20_000
        few_steps = steps.get_column("step").n_unique() <= 200
        for i, rank in enumerate(rank_ids):
            sub = steps.filter(pl.col("rank") == rank)
            cats = _cat_ms(sub)
            points = dict(
                x=sub.get_column("step").to_numpy(), y=_f32(sub.get_column("duration_ns").to_numpy() / 1e6),
                mode="lines+markers" if few_steps else "lines", name=f"rank {rank}",
                line=dict(color=RANK_COLORS[i % len(RANK_COLORS)], width=1.5), marker=dict(size=5),
            )
            if with_hover:
                points["customdata"] = np.round(np.column_stack([cats[c] for c in CATEGORIES]), 3).astype(np.float32)
                lines = "".join(f"<br>{c}: %{{customdata[{j}]:.2f}} ms" for j, c in enumerate(CATEGORIES))
                points["hovertemplate"] = f"rank {rank} · step %{{x}}: <b>%{{y:.2f}} ms</b>{lines}<extra></extra>"
            else:
                points["hovertemplate"] = f"rank {rank} · step %{{x}}: %{{y:.2f}} ms<extra></extra>"
            fig.add_trace(trace("scatter", **points))
        if anomalous.height:
            fig.add_trace(trace("scatter",
                x=anomalous.get_column("step").to_numpy(),
                y=_f32(anomalous.get_column("duration_ns").to_numpy() / 1e6),
                mode="markers", name="anomalous step",
                marker=dict(symbol="circle-open", size=15, color=ANOMALY_COLOR, line=dict(width=2.5)),
                customdata=np.column_stack([anomalous.get_column("rank").to_numpy(),
                                            anomalous.get_column("ratio").fill_null(0).to_numpy()]).astype(np.float32),
                hovertemplate="anomalous: step %{x} on rank %{customdata[0]:.0f}, %{y:.1f} ms "
                              "(%{customdata[1]:.1f}x its neighbours)<extra></extra>",
            ))
        _layout(fig, legend=dict(orientation="h", y=1.02, yanchor="bottom", x=0), hovermode="closest",
                margin=dict(l=70, r=20, t=30, b=50))
        fig.update_xaxes(title_text="step")
        height = 420
        explain = "One line per rank; circles mark the anomalous steps. Hover a point for its breakdown."
        if spread:
            longest = float(steps.get_column("duration_ns").max()) / 1e6
            durations = steps.get_column("duration_ns").to_numpy() / 1e6
            fig.update_yaxes(title_text="step duration (ms, log scale)", type="log",
                             tickvals=_log_ticks(float(durations[durations > 0].min()), longest),
                             ticktext=[f"{v:,g}" for v in _log_ticks(float(durations[durations > 0].min()), longest)])
            explain += (f" Log scale: the longest step ({_ms(longest)} ms) is {longest / median:.0f}× the median "
                        f"({_ms(median)} ms), which would flatten every other step on a linear axis.")
        else:
            fig.update_yaxes(title_text="step duration (ms)", rangemode="tozero")
    else:
        step_ids = sorted(steps.get_column("step").unique().to_list())
        column = {s: j for j, s in enumerate(step_ids)}
        row_of = {r: i for i, r in enumerate(rank_ids)}
        z = np.full((len(rank_ids), len(step_ids)), np.nan, dtype=np.float32)
        r_idx = np.array([row_of[r] for r in steps.get_column("rank").to_list()])
        s_idx = np.array([column[s] for s in steps.get_column("step").to_list()])
        z[r_idx, s_idx] = steps.get_column("duration_ns").to_numpy() / 1e6
        fig.add_trace(trace("heatmap",
            z=np.round(z, 2), x=step_ids, y=rank_ids, colorscale="Viridis",
            colorbar=dict(title=dict(text="ms"), thickness=12),
            hovertemplate="rank %{y} · step %{x}: %{z:.2f} ms<extra></extra>", name="step duration",
        ))
        if anomalous.height:
            fig.add_trace(trace("scatter",
                x=anomalous.get_column("step").to_numpy(), y=anomalous.get_column("rank").to_numpy(),
                mode="markers", name="anomalous step",
                marker=dict(symbol="circle-open", size=9, color="#ff2a2a", line=dict(width=2)),
                hovertemplate="anomalous: step %{x} on rank %{y}<extra></extra>",
            ))
        _layout(fig, legend=dict(orientation="h", y=1.02, yanchor="bottom", x=0), hovermode="closest",
                margin=dict(l=70, r=20, t=30, b=50))
        fig.update_xaxes(title_text="step", showgrid=False)
        fig.update_yaxes(title_text="rank", showgrid=False, autorange="reversed")
        height = max(360, min(900, 14 * len(rank_ids) + 120))
        explain = (f"{len(rank_ids)} ranks: colour is the step duration (ms) of each rank and step; "
                   "red circles mark the anomalous steps.")
    return (f'<section id="steps"><h2>Step durations</h2><p class="note">{explain}</p>'
            f"{page.figure(fig, height=height)}</section>")


def _breakdown_views(findings) -> list[tuple[str, pl.DataFrame]]:
    steps = findings.steps
    columns = [f"{c}_ns" for c in CATEGORIES]
    rank_ids = sorted(steps.get_column("rank").unique().to_list())
    flag = pl.col("anomalous") if "anomalous" in steps.columns else pl.lit(False)
    views: list[tuple[str, pl.DataFrame]] = []
    if len(rank_ids) > 1:
        mean = steps.group_by("step").agg([pl.col(c).mean() for c in columns] + [flag.any().alias("anomalous")])
        views.append(("mean of ranks", mean))
    if len(rank_ids) > LINE_RANKS:
        slowest = (steps.sort("duration_ns", descending=True).group_by("step", maintain_order=True).first()
                   .select("step", *columns, flag.alias("anomalous")))
        views.append(("slowest rank of each step", slowest))
        counts = (steps.group_by("rank").agg(n=flag.sum(), total=pl.col("duration_ns").sum())
                  .sort(["n", "total"], descending=True))
        chosen = sorted(counts.head(BREAKDOWN_RANKS).get_column("rank").to_list())
    else:
        chosen = rank_ids
    for rank in chosen:
        views.append((f"rank {rank}", steps.filter(pl.col("rank") == rank).select("step", *columns,
                                                                                  flag.alias("anomalous"))))
    return views


def _step_breakdown(findings, page: _Page) -> str:
    if single_step(findings):
        return ""  # drawn as one bar per rank in the step section
    steps = findings.steps
    step_ids = sorted(steps.get_column("step").unique().to_list())
    base = pl.DataFrame({"step": step_ids}, schema={"step": steps.schema["step"]})
    views = _breakdown_views(findings)

    def arrays(frame: pl.DataFrame) -> list[list]:
        full = base.join(frame, on="step", how="left")
        out = []
        for c in CATEGORIES:
            values = full.get_column(f"{c}_ns").cast(pl.Float64) / 1e6
            out.append([None if v is None else round(v, 2) for v in values.to_list()])
        totals = full.select(pl.sum_horizontal([pl.col(f"{c}_ns") for c in CATEGORIES]) / 1e6).to_series()
        marks = [round(t, 2) if a else None
                 for t, a in zip(totals.to_list(), full.get_column("anomalous").fill_null(False).to_list())]
        out.append(marks)
        return out

    data = [arrays(frame) for _, frame in views]
    fig = Figure()
    for j, c in enumerate(CATEGORIES):
        fig.add_trace(trace("bar", x=step_ids, y=data[0][j], name=c, marker=dict(color=CATEGORY_COLORS[c], line=dict(width=0)),
                             hovertemplate=f"{c}: %{{y:.2f}} ms<extra></extra>"))
    fig.add_trace(trace("scatter", x=step_ids, y=data[0][-1], mode="markers", name="anomalous step",
                             marker=dict(symbol="triangle-down", size=11, color=ANOMALY_COLOR),
                             hovertemplate="anomalous step (total %{y:.2f} ms)<extra></extra>"))
    menus = []
    if len(views) > 1:
        menus = [dict(
            type="dropdown", direction="down", x=1, xanchor="right", y=1.02, yanchor="bottom",
            showactive=True, bgcolor="#f4f4f4", bordercolor="#999",
            buttons=[dict(label=label, method="restyle", args=[{"y": data[i]}]) for i, (label, _) in enumerate(views)],
        )]
    _layout(fig, barmode="stack", bargap=0.15 if len(step_ids) < 200 else 0, hovermode="x unified",
            legend=dict(orientation="h", y=1.02, yanchor="bottom", x=0, traceorder="normal"),
            updatemenus=menus or None,
            margin=dict(l=70, r=20, t=50, b=50))
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(title_text="time in step (ms)", rangemode="tozero")
    cut_note = ""
    totals = np.array([sum(v or 0 for v in column) for column in zip(*data[0][:len(CATEGORIES)])], dtype=float)
    spread, median = _outliers(totals)
    if spread:
        # A broken axis: the top is set by the ordinary steps; a taller bar is cut at the top and
        # marked with its total, so one outlier does not flatten every other step.
        ordinary = totals[totals <= OUTLIER_RATIO * median]
        top = float(ordinary.max()) * 1.25 if ordinary.size else float(totals.max())
        fig.update_yaxes(range=[0, top], autorange=False, title_text="time in step (ms, axis cut)")
        cut = [(step, total) for step, total in zip(step_ids, totals) if total > top]
        for step, total in cut[:40]:
            fig.add_annotation(x=step, y=top, yref="y", text=f"⇡ {_ms(total)} ms", showarrow=False,
                               yanchor="bottom", font=dict(size=10, color="#B00020"), bgcolor="rgba(255,255,255,0.85)")
        fig.update_layout(margin=dict(l=70, r=20, t=70, b=50))
        cut_note = (f" The axis is cut at {_ms(top)} ms: {len(cut)} step(s) run past it (marked ⇡ with their "
                    f"total, up to {_ms(float(totals.max()))} ms) so that the ordinary steps stay readable.")
    shown = ", ".join(label for label, _ in views[:6]) + (" …" if len(views) > 6 else "")
    note = "Each step's window split into the categories of the JSON report (they sum to the step's duration)"
    note += (f"; views: {esc(shown)} (choose with the menu at the top right of the figure)" if len(views) > 1
             else f" ({esc(shown)})")
    note += "; triangles mark anomalous steps." + cut_note
    return (f'<section id="breakdown"><h2>Where each step\'s time went</h2><p class="note">{note}</p>'
            f"{page.figure(fig, height=460)}</section>")


# ----------------------------------------------------------------------------- multi-rank

def _waits(findings, page: _Page) -> str:
    n_ranks = findings.steps.get_column("rank").n_unique() if findings.steps.height else 0
    if findings.waits.is_empty():
        if n_ranks > 1:
            return ('<section id="waits"><h2>Cross-rank waiting</h2><p class="note">These findings hold no '
                    f"cross-rank wait measurements.</p>{_alignment_note(findings)}</section>")
        return ""
    frame = findings.waits.with_columns(
        pl.col("wait_ms").cast(pl.Float64), pl.col("rank").cast(pl.Int64), pl.col("step").cast(pl.Int64),
        pl.col("waiting_for_rank").cast(pl.Int64),
        pl.col("phase").cast(pl.String).fill_null("?"), pl.col("collective").cast(pl.String).fill_null("?"),
    )
    rank_ids = sorted(set(frame.get_column("rank").to_list()) | set(frame.get_column("waiting_for_rank").to_list())
                      | set(findings.steps.get_column("rank").to_list()))
    # A collective outside every step window has no step ("step": null): it counts in the
    # phase and rank tables, not in the per-step map.
    in_steps = frame.filter(pl.col("step").is_not_null())
    step_ids = sorted(set(in_steps.get_column("step").to_list())
                      | set(findings.steps.get_column("step").drop_nulls().to_list()))
    per_cell = in_steps.group_by("rank", "step").agg(ms=pl.col("wait_ms").sum())
    row_of = {r: i for i, r in enumerate(rank_ids)}
    col_of = {s: j for j, s in enumerate(step_ids)}
    z = np.zeros((len(rank_ids), len(step_ids)), dtype=np.float32)
    for rank, step, ms in per_cell.iter_rows():
        z[row_of[rank], col_of[step]] = ms
    stragglers = (in_steps.group_by("step", "waiting_for_rank").agg(ms=pl.col("wait_ms").sum())
                  .sort(["step", "ms"], descending=[False, True]).group_by("step", maintain_order=True).first())
    fig = Figure()
    fig.add_trace(trace("heatmap",
        z=np.round(z, 3), x=step_ids, y=rank_ids, name="wait",
        colorscale=[[0, "#ffffff"], [0.15, "#f3d6e8"], [1, CATEGORY_COLORS["cross_rank_wait"]]],
        colorbar=dict(title=dict(text="wait (ms)"), thickness=12),
        hovertemplate="rank %{y} waited %{z:.2f} ms in step %{x}<extra></extra>",
    ))
    fig.add_trace(trace("scatter",
        x=stragglers.get_column("step").to_numpy(), y=stragglers.get_column("waiting_for_rank").to_numpy(),
        customdata=_f32(stragglers.get_column("ms").to_numpy()), mode="markers", name="straggler (waited for)",
        marker=dict(symbol="star", size=11 if len(step_ids) <= 200 else 6, color=ANOMALY_COLOR,
                    line=dict(width=1, color="#ffffff")),
        hovertemplate="step %{x}: straggler rank %{y} (others waited %{customdata:.2f} ms for it)<extra></extra>",
    ))
    _layout(fig, legend=dict(orientation="h", y=1.02, yanchor="bottom", x=0), hovermode="closest",
            margin=dict(l=70, r=20, t=30, b=50))
    fig.update_xaxes(title_text="step", showgrid=False)
    fig.update_yaxes(title_text="rank", showgrid=False, autorange="reversed", dtick=1 if len(rank_ids) <= 32 else None)
    height = max(300, min(900, 22 * len(rank_ids) + 140)) if len(rank_ids) <= 32 else max(360, min(900, 12 * len(rank_ids) + 140))

    phases = (
        frame.group_by("phase").agg(
            n=pl.len(), total=pl.col("wait_ms").sum(), mean=pl.col("wait_ms").mean(), max=pl.col("wait_ms").max(),
            collectives=pl.col("collective").unique().sort().head(3),
            n_collectives=pl.col("collective").n_unique(),
        ).sort("total", descending=True)
    )
    waiter = (frame.group_by("phase", "rank").agg(ms=pl.col("wait_ms").sum()).sort(["phase", "ms"], descending=[False, True])
              .group_by("phase", maintain_order=True).first())
    waited = (frame.group_by("phase", "waiting_for_rank").agg(ms=pl.col("wait_ms").sum())
              .sort(["phase", "ms"], descending=[False, True]).group_by("phase", maintain_order=True).first())
    phases = phases.join(waiter.rename({"rank": "waiter", "ms": "waiter_ms"}), on="phase", how="left").join(
        waited.rename({"ms": "waited_ms"}), on="phase", how="left").sort("total", descending=True)
    rows = []
    for r in phases.head(MAX_TABLE_ROWS).iter_rows(named=True):
        more = r["n_collectives"] - len(r["collectives"])
        rows.append([
            text_cell(r["phase"]), text_cell(", ".join(r["collectives"]) + (f" (+{more})" if more > 0 else "")),
            num_cell(r["n"], "{:d}"), num_cell(r["total"]), num_cell(r["mean"], "{:.3f}"), num_cell(r["max"]),
            num_cell(r["waiter"], "{:d}"), num_cell(r["waiter_ms"]),
            num_cell(r["waiting_for_rank"], "{:d}"), num_cell(r["waited_ms"]),
        ])
    phase_table = _table(
        ["phase", "collective", "waits", "total wait ms", "mean ms", "max ms", "rank that waited most", "its ms",
         "rank waited for most", "its ms"], rows, numeric={2, 3, 4, 5, 6, 7, 8, 9},
        note=f"{phases.height} phases, first {MAX_TABLE_ROWS} shown." if phases.height > MAX_TABLE_ROWS else "")
    per_rank = (
        pl.DataFrame({"rank": rank_ids}, schema={"rank": pl.Int64})
        .join(frame.group_by("rank").agg(waited=pl.col("wait_ms").sum()), on="rank", how="left")
        .join(frame.group_by("waiting_for_rank").agg(caused=pl.col("wait_ms").sum()).rename({"waiting_for_rank": "rank"}),
              on="rank", how="left")
        .join(stragglers.group_by("waiting_for_rank").agg(n=pl.len()).rename({"waiting_for_rank": "rank"}),
              on="rank", how="left")
        .with_columns(pl.col("waited", "caused").fill_null(0.0), pl.col("n").fill_null(0))
        .sort("caused", descending=True)
    )
    rank_rows = [[num_cell(r["rank"], "{:d}"), num_cell(r["waited"]), num_cell(r["caused"]), num_cell(r["n"], "{:d}")]
                 for r in per_rank.head(MAX_TABLE_ROWS * 2).iter_rows(named=True)]
    rank_table = _table(["rank", "waited for others (ms)", "others waited for it (ms)", "straggler in steps"],
                        rank_rows, numeric={0, 1, 2, 3})
    return (f'<section id="waits"><h2>Cross-rank waiting</h2>{_alignment_note(findings)}<p class="note">Colour: the '
            f"time each rank spent waiting for another rank to arrive at a collective, summed per step (ms). Stars: "
            f"the straggler of each step, the rank the others waited for longest.</p>{page.figure(fig, height=height)}"
            f"<h3>Waiting per phase</h3>{phase_table}<h3>Per rank</h3>{rank_table}{_straggler_reasons(findings)}"
            f"{_imbalance(findings, page)}</section>")


def _alignment_note(findings) -> str:
    """One line on the clock alignment, where the multi-rank analysis reports one."""
    alignment = getattr(findings, "alignment", None)
    if alignment is None or not getattr(alignment, "offsets", None):
        return ""
    offsets = [abs(v) for v in alignment.offsets.values() if v is not None]
    if getattr(alignment, "method", None) == "none" and not getattr(alignment, "trusted", True):
        notes = [w for w in getattr(alignment, "notes", []) or []]
        return f'<p class="note">{esc("Clocks not aligned and no waits reported: " + "; ".join(notes), 600)}</p>'
    text = (f"Clocks aligned by {getattr(alignment, 'method', '?')} from {getattr(alignment, 'matched', 0)} "
            f"matched collectives; largest offset {max(offsets, default=0) / 1e3:,.1f} µs")
    p50, p95 = getattr(alignment, "residual_p50_ns", None), getattr(alignment, "residual_p95_ns", None)
    if p50 is not None and p95 is not None:
        text += f", residual spread p50 {p50 / 1e3:,.1f} µs, p95 {p95 / 1e3:,.1f} µs"
    pairing = getattr(alignment, "pairing", "none")
    if pairing and pairing != "none":
        text += f"; collectives paired by {pairing}"
    if not getattr(alignment, "trusted", True):
        text += "; no waits reported (the files are not one job, or their collectives could not be paired)"
    return f'<p class="note">{esc(text, 400)}.</p>' + _alignment_per_rank(alignment)


def _alignment_per_rank(alignment) -> str:
    """Method, offset and residual of each rank's clock alignment."""
    per_rank = getattr(alignment, "per_rank", None) or {}
    if not per_rank:
        return ""
    rows = []
    for rank in sorted(per_rank):
        info = per_rank[rank]
        p50, worst = info.get("residual_p50_ns"), info.get("residual_max_ns")
        rows.append([num_cell(rank, "{:d}"), text_cell(info.get("method")),
                     num_cell(alignment.offsets.get(rank, 0) / 1e3, "{:,.1f}"),
                     num_cell(alignment.corrections.get(rank, 0) / 1e3, "{:,.1f}"),
                     num_cell(info.get("matched"), "{:d}"),
                     num_cell(None if p50 is None else p50 / 1e3, "{:,.1f}"),
                     num_cell(None if worst is None else worst / 1e3, "{:,.1f}")])
    return "<h3>Clock alignment per rank</h3>" + _table(
        ["rank", "method", "offset µs", "correction µs", "matched collectives", "residual p50 µs",
         "residual max µs"], rows, numeric={0, 2, 3, 4, 5, 6})


def _rank_key(value) -> tuple:
    text = str(value)
    return (0, int(text), "") if text.lstrip("-").isdigit() else (1, 0, text)


def _straggler_reasons(findings) -> str:
    """Why the straggler of each costly collective was late (``findings.stragglers``), largest wait first."""
    reasons = straggler_records(findings.stragglers)
    if not reasons:
        return ""
    reasons = sorted(reasons, key=lambda r: -(r.get("max_wait_ms") or 0))
    rows = []
    for r in reasons[:25]:
        sent = dict(sorted((r.get("rows_sent") or {}).items(), key=lambda kv: _rank_key(kv[0])))
        before = dict(sorted((r.get("before_ms") or {}).items(), key=lambda kv: _rank_key(kv[0])))
        rows.append([
            num_cell(r.get("step"), "{}"), text_cell(r.get("phase"), 60), text_cell(r.get("collective"), 40),
            num_cell(r.get("straggler"), "{}"), num_cell(r.get("max_wait_ms")), text_cell(r.get("reason")),
            num_cell(r.get("reason_excess_ms")),
            text_cell(", ".join(f"{k}: {_ms(v)}" for k, v in list(before.items())[:8]), 120),
            text_cell(", ".join(f"{k}: {v}" for k, v in list(sent.items())[:8]) if sent else "–", 120),
        ])
    note = f"{len(reasons)} in all; the 25 largest shown." if len(reasons) > 25 else ""
    return "<h3>Why the stragglers were late</h3>" + _table(
        ["step", "phase", "collective", "straggler", "max wait ms", "reason", "reason excess ms",
         "ms before it, per rank", "tokens sent in the payload all-to-all, per rank"], rows, numeric={0, 3, 4, 6}, note=note)


def _imbalance(findings, page: _Page) -> str:
    """Measured step time against the modeled and the balanced estimate (``findings.imbalance``)."""
    rows = [r for r in imbalance_records(findings.imbalance)
            if r.get("step") is not None and r.get("modeled_ms") is not None]
    if not rows:
        return ""
    rows.sort(key=lambda r: r["step"])
    steps = [r["step"] for r in rows]
    # Top: the step time measured and as modeled; bottom: the saving itself (modeled minus
    # balanced), on its own scale, so a 2 ms saving on a 60 ms step is not a hair's breadth.
    fig = Figure(rows=2, vertical_spacing=0.08, row_heights=[0.55, 0.45])
    for key, label, color, dash in (("measured_ms", "measured", "#222222", "solid"),
                                    ("modeled_ms", "modeled: max(attention)+max(dispatch)+experts+max(combine)",
                                     CATEGORY_COLORS["gpu_compute"], "dash")):
        values = [r.get(key) for r in rows]
        if all(v is None for v in values):
            continue
        fig.add_trace(trace("scatter", x=steps, y=values, mode="lines+markers" if len(steps) <= 200 else "lines",
                                 name=label, line=dict(color=color, dash=dash, width=1.8), marker=dict(size=4),
                                 hovertemplate=f"{label.split(':')[0]}: %{{y:.2f}} ms<extra>step %{{x}}</extra>"),
                      row=1, col=1)
    savings = [r.get("saving_ms") or 0.0 for r in rows]
    modeled = [r.get("modeled_ms") or 0.0 for r in rows]
    fig.add_trace(trace("bar", x=steps, y=savings, name="saving with balanced load (ms)",
                         marker=dict(color=CATEGORY_COLORS["communication"], line=dict(width=0)),
                         customdata=[round(100 * v / m, 1) if m else 0 for v, m in zip(savings, modeled)],
                         hovertemplate="saving: %{y:.2f} ms (%{customdata:.1f}% of the modeled step)"
                                       "<extra>step %{x}</extra>"), row=2, col=1)
    _layout(fig, legend=dict(orientation="h", y=1.02, yanchor="bottom", x=0), hovermode="x unified",
            margin=dict(l=70, r=20, t=40, b=50), bargap=0.2)
    fig.update_xaxes(title_text="step", row=2, col=1)
    fig.update_yaxes(title_text="step time (ms)", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text="saving (ms)", rangemode="tozero", row=2, col=1)
    saving = sum(savings)
    worst = max(range(len(rows)), key=lambda i: savings[i]) if rows else 0
    return (f"<h3>Load imbalance</h3><p class=\"note\">The MoE critical path of each step as modeled from its "
            f"phases (top), and below it what balancing the load across ranks would save, per step: "
            f"{_ms(saving)} ms in all over {len(rows)} steps, most in step {rows[worst]['step']} "
            f"({_ms(savings[worst])} ms).</p>{page.figure(fig, height=460)}")


# ----------------------------------------------------------------------------- anomalies

def _typical_categories(lookups: _Lookups, rank: int, step: int) -> dict[str, float]:
    """Median time of each category over the rank's other unflagged steps (or its other steps)."""
    others = [row for row in lookups.step_rows.get(rank, []) if row["step"] != step]
    normal = [row for row in others if row.get("anomalous") is False] or others
    return {c: _median([row[f"{c}_ns"] for row in normal]) / 1e6 for c in CATEGORIES}


def _median(values: list) -> float:
    """The median of the values that are not null (0 when there is none), as polars takes it."""
    present = [v for v in values if v is not None]
    return float(statistics.median(present)) if present else 0.0


def _compare_bars(rows: list[tuple[str, dict[str, float]]]) -> str:
    """Stacked HTML bars (prints without JavaScript), scaled to the longest row."""
    longest = max((sum(v.values()) for _, v in rows), default=0) or 1.0
    out = ['<div class="compare">']
    for label, values in rows:
        total = sum(values.values())
        segments = []
        for c in CATEGORIES:
            share = values.get(c, 0.0) / longest * 100
            if share <= 0:
                continue
            segments.append(f'<span class="seg" style="width:{share:.3f}%;background:{CATEGORY_COLORS[c]}" '
                            f'title="{esc(c)}: {_ms(values[c])} ms"></span>')
        out.append(f'<div class="crow"><span class="clabel">{esc(label)}</span><span class="cbar">{"".join(segments)}'
                   f'</span><span class="ctotal">{_ms(total)} ms</span></div>')
    out.append("</div>")
    return "".join(out)


def _highlight(lookups: _Lookups, anomaly: dict, rank: int, step: int, *, own: bool) -> dict | None:
    """The ``where`` range instance of a step and the lag to its first GPU work, in ms from the step start."""
    where = anomaly_range(anomaly)
    window = lookups.step_row.get((rank, step))
    if not lookups.has_instances or not where or window is None:
        return None
    w0 = window["start_ns"]
    match = [row for row in lookups.instances.get((rank, where), []) if row["step"] == step]
    if own and anomaly.get("kind") == "range" and "start_ns" in anomaly:
        match = [row for row in match if row["start_ns"] == anomaly["start_ns"]] or match
    if not match:
        return _largest_gap(lookups, rank, step, w0) if own else None
    # the instance that waited longest for its first GPU work, then the longest
    row = max(match, key=lambda r: (-1 if r["first_gpu_lag_ns"] is None else r["first_gpu_lag_ns"], r["duration_ns"]))
    start, end = (row["start_ns"] - w0) / 1e6, (row["end_ns"] - w0) / 1e6
    if row.get("first_gpu_start_ns") is None:
        return {"x0": start, "x1": end, "lag": None,
                "text": f"{where} ({_ms(end - start)} ms), no GPU work launched in it"}
    lag = max((row["first_gpu_start_ns"] - row["start_ns"]) / 1e6, 0.0)
    return {"x0": start, "x1": end, "lag": (start, start + lag),
            "text": f"{where} ({_ms(end - start)} ms); darker: the {_ms(lag)} ms before its first GPU work"}


def _largest_gap(lookups: _Lookups, rank: int, step: int, w0: int) -> dict | None:
    """Where no range instance is named: the step's largest CPU gap."""
    row = lookups.largest_gap.get((rank, step))
    if row is None:
        return None
    start, end = (row["start_ns"] - w0) / 1e6, (row["end_ns"] - w0) / 1e6
    return {"x0": start, "x1": end, "lag": None,
            "text": f"the step's largest CPU gap ({_ms(end - start)} ms, {row.get('cause') or 'unknown'})"}


def _axis(extra: dict) -> dict:
    return {**_AXIS, **extra}


def _panel_bars(frame: pl.DataFrame) -> dict:
    """What a timeline frame draws: its lanes in order, the end of its last bar, and per kind
    of bar (in :data:`KIND_COLORS` order) the bars' lane index, start, length, busy share,
    hover text and label, ready for a trace."""
    lane, order = frame.get_column("lane").to_list(), frame.get_column("lane_order").to_list()
    first: dict = {}
    for name, rank in zip(lane, order):
        first.setdefault(name, rank)
    lanes = sorted(first, key=lambda name: first[name])
    index = {name: k for k, name in enumerate(lanes)}
    lane_index = np.asarray([index[name] for name in lane], dtype=np.int16)
    kind = frame.get_column("kind").cast(pl.String).to_numpy()
    name, detail = frame.get_column("name").to_numpy(), frame.get_column("detail").to_numpy()
    start = frame.get_column("start_ms").cast(pl.Float64).to_numpy()
    end = frame.get_column("end_ms").cast(pl.Float64).to_numpy()
    busy = (frame.get_column("busy").cast(pl.Float64).to_numpy() if "busy" in frame.columns
            else np.ones(frame.height))
    busy = np.where(np.isnan(busy), 1.0, busy)
    bars = {}
    for key in KIND_COLORS:
        mask = kind == key
        if not mask.any():
            continue
        names, starts, ends, shares = name[mask].tolist(), start[mask], end[mask], busy[mask]
        hover = [
            f"{esc(n, 120)}<br>{s:.3f}–{e:.3f} ms ({e - s:.3f} ms)" + (f"<br>{esc(d, 160)}" if d else "")
            for n, s, e, d in zip(names, starts, ends, detail[mask].tolist())
        ]
        if shares.min() < 0.999:
            hover = [h + f"<br>GPU/thread busy {b:.0%} of this block" if b < 0.999 else h
                     for h, b in zip(hover, shares)]
        bars[key] = {"y": lane_index[mask], "x": _f32(np.maximum(ends - starts, 0.0)), "base": _f32(starts),
                     "opacity": np.round(0.15 + 0.85 * np.clip(shares, 0, 1), 3).astype(np.float32),
                     "hovertext": hover, "text": [esc(n, 60) for n in names] if key == "annotation" else None}
    return {"lanes": lanes, "x_max": float(end.max()) if end.size else 0.0, "bars": bars}


def _timeline_figure(panels: list[tuple[str, pl.DataFrame, dict | None]],
                     drawn: dict[int, dict] | None = None) -> tuple[dict, int]:
    """Horizontal-bar timelines, one panel per step, as a plotly figure dict.

    Built as a plain ``{"data", "layout"}`` dict: its subplots and shapes are laid out here.
    ``drawn`` keeps each frame's bars (:func:`_panel_bars`) by ``id``, for the next figure
    that shows the same step: a rank's typical step is in every card of that rank.
    """
    drawn = {} if drawn is None else drawn
    columns = []
    for _, frame, _ in panels:
        if id(frame) not in drawn:
            drawn[id(frame)] = _panel_bars(frame)
        columns.append(drawn[id(frame)])
    # One x-scale for every panel (the anomalous and the typical step), so lengths compare.
    x_max = max((c["x_max"] for c in columns), default=0) or 1.0
    lane_lists = [c["lanes"] for c in columns]
    plot_px = [len(lanes) * 24 + 30 for lanes in lane_lists]
    gap_px = 110  # x-axis title of the panel above + the two-line title of the next
    height = int(sum(plot_px) + gap_px * (len(panels) - 1) + 44 + 100)
    inner = height - 44 - 100
    data: list[dict] = []
    shapes: list[dict] = []
    annotations: list[dict] = []
    layout: dict = {}
    shown: set[str] = set()
    top = 1.0
    kinds = list(KIND_COLORS)
    for i, ((title, _, light), lanes, panel) in enumerate(zip(panels, lane_lists, columns), start=1):
        suffix = "" if i == 1 else str(i)
        bottom = max(top - plot_px[i - 1] / inner, 0.0)
        for kind, bars in panel["bars"].items():
            label = KIND_LABELS[kind]
            trace = {
                "type": "bar", "orientation": "h", "xaxis": f"x{suffix}", "yaxis": f"y{suffix}",
                "y": bars["y"], "x": bars["x"], "base": bars["base"], "width": 0.72,
                "name": label, "legendgroup": label, "legendrank": 100 + kinds.index(kind),
                "showlegend": label not in shown,
                # a merged block is shaded by how busy it was: faint = mostly gaps, solid = busy
                "marker": {"color": KIND_COLORS[kind], "line": {"width": 0}, "opacity": bars["opacity"]},
                "hovertext": bars["hovertext"], "hoverinfo": "text",
            }
            if bars["text"] is not None:  # range bars carry their names
                trace.update(text=bars["text"], textposition="inside",
                             insidetextanchor="start", textangle=0, textfont={"size": 10, "color": "#ffffff"},
                             constraintext="none", cliponaxis=True)
            data.append(trace)
            shown.add(label)
        layout[f"xaxis{suffix}"] = _axis({"domain": [0, 1], "anchor": f"y{suffix}", "range": [0, x_max * 1.01],
                                          "title": {"text": "ms since step start (same scale in every panel)"
                                                    if len(panels) > 1 else "ms since step start"},
                                          **({"matches": "x"} if suffix else {})})
        layout[f"yaxis{suffix}"] = _axis({"domain": [bottom, top], "anchor": f"x{suffix}",
                                          "tickvals": list(range(len(lanes))), "ticktext": [esc(x, 42) for x in lanes],
                                          "autorange": "reversed", "showgrid": False})
        text = esc(title, 160) + (f"<br><span style='color:#7a5b00'>shaded: {esc(light['text'], 160)}</span>"
                                  if light else "")
        annotations.append({"text": text, "xref": "paper", "yref": "paper", "x": 0, "y": top, "xanchor": "left",
                            "yanchor": "bottom", "showarrow": False, "font": {"size": 12}, "align": "left"})
        if light:
            shapes.append({"type": "rect", "xref": f"x{suffix}", "yref": f"y{suffix} domain", "x0": light["x0"],
                           "x1": light["x1"], "y0": 0, "y1": 1, "fillcolor": HIGHLIGHT_SPAN, "layer": "below",
                           "line": {"color": HIGHLIGHT_LINE, "width": 1, "dash": "dot"}})
            if light["lag"]:
                shapes.append({"type": "rect", "xref": f"x{suffix}", "yref": f"y{suffix} domain",
                               "x0": light["lag"][0], "x1": light["lag"][1], "y0": 0, "y1": 1,
                               "fillcolor": HIGHLIGHT_FILL, "layer": "below",
                               "line": {"color": HIGHLIGHT_LINE, "width": 1.5}})
        top = bottom - gap_px / inner
    layout.update(_BASE_LAYOUT)
    layout.update({
        "barmode": "overlay", "hovermode": "closest", "shapes": shapes, "annotations": annotations,
        "uniformtext": {"minsize": 8, "mode": "hide"},  # a range name that does not fit its bar is left out
        "legend": {"orientation": "h", "yref": "container", "y": 0, "yanchor": "bottom", "xref": "container",
                   "x": 0, "font": {"size": 11}},
        "margin": {"l": 235, "r": 20, "t": 44, "b": 100},
    })
    return {"data": data, "layout": layout}, height


def _anomaly_card(number: int, anomaly: dict, lookups: _Lookups, timelines: dict, page: _Page) -> str:
    rank, step = anomaly["rank"], anomaly["step"]
    kind = anomaly.get("kind", "step")
    excess = anomaly.get("excess_ms") or 0.0
    ratio = _ratio_of(anomaly, lookups)
    times = f"{ratio:.1f}× " if ratio else ""
    if kind == "step":
        title = f"Step {step} on rank {rank}: {times}slower than typical ({_signed_ms(excess)} ms)"
    else:
        title = f"Range “{anomaly['where']}” in step {step} on rank {rank}: {times}its typical time ({_signed_ms(excess)} ms)"
    category = anomaly.get("category", "")
    chip = CATEGORY_COLORS.get(category, "#888")
    facts = [
        ("where", f"<code>{esc(anomaly.get('where'), 300)}</code>"),
        ("cause", f'<span class="pill" style="border-color:{chip}"><span class="dot" style="background:{chip}"></span>'
                  f"{esc(anomaly.get('cause'))}</span>"),
        ("category", f"{esc(category)}" + (f" ({_signed_ms(anomaly['category_excess_ms'])} ms against typical)"
                                           if anomaly.get("category_excess_ms") is not None else "")),
    ]
    if kind == "step":
        facts.append(("duration", f"{_ms(anomaly['duration_ms'])} ms, typical {_ms(anomaly['typical_ms'])} ms, "
                                  f"excess {_signed_ms(excess)} ms"))
    else:
        facts.append(("excess", f"{_signed_ms(excess)} ms over the median instance of this range"))
    facts.append(("evidence", f'<span class="evidence">{esc(anomaly.get("evidence"), 2000)}</span>'))
    dl = "<dl class=\"pm\">" + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts) + "</dl>"

    compare = ""
    this_row = lookups.step_row.get((rank, step))
    typical = lookups.typical.get(rank)
    if kind == "step" and this_row is not None:
        this = {c: this_row[f"{c}_ns"] / 1e6 for c in CATEGORIES}
        t_row = lookups.step_row.get((rank, typical))
        if typical is not None and typical != step and t_row is not None:
            compare = _compare_bars([(f"step {step}", this), (f"step {typical} (typical)",
                                     {c: t_row[f"{c}_ns"] / 1e6 for c in CATEGORIES})])
        else:
            compare = _compare_bars([(f"step {step}", this), ("typical", _typical_categories(lookups, rank, step))])
    elif kind == "range" and "start_ns" in anomaly and lookups.has_instances:
        same = lookups.instances.get((rank, anomaly_range(anomaly)), [])
        this_inst = lookups.instance(anomaly)
        if this_inst is not None and all(f"{c}_ns" in this_inst for c in CATEGORIES):
            this = {c: this_inst[f"{c}_ns"] / 1e6 for c in CATEGORIES}
            median = {c: _median([row[f"{c}_ns"] for row in same]) / 1e6 for c in CATEGORIES}
            compare = _compare_bars([("this instance", this), ("median instance", median)])

    ranges = ""
    if anomaly.get("ranges"):
        rows = []
        for r in anomaly["ranges"][:6]:
            rows.append([
                text_cell(r.get("name"), 80), num_cell((r.get("total_ns") or 0) / 1e6),
                num_cell((r.get("typical_ns") or 0) / 1e6), num_cell((r.get("excess_ns") or 0) / 1e6, "{:+.2f}"),
                num_cell(r.get("launches"), "{:.0f}"), num_cell(r.get("typical_launches"), "{:.0f}"),
                num_cell(None if r.get("lag_ns") is None else r["lag_ns"] / 1e6),
                num_cell(None if r.get("typical_lag_ns") is None else r["typical_lag_ns"] / 1e6),
            ])
        ranges = "<h4>Ranges that grew</h4>" + _table(
            ["range", "this step ms", "typical ms", "excess ms", "launches", "typical", "lag to first kernel ms",
             "typical lag ms"], rows, numeric={1, 2, 3, 4, 5, 6, 7}, cls="compact")

    timeline = ""
    own = timelines.get((rank, step)) if timelines else None
    if own is not None and own.height:
        duration = this_row["duration_ns"] / 1e6 if this_row is not None else None
        panels = [(f"step {step} on rank {rank} ({'anomalous' if kind == 'step' else 'holds the anomalous range'}"
                   + (f", {_ms(duration)} ms" if duration else "") + ")", own,
                   _highlight(lookups, anomaly, rank, step, own=True))]
        other = timelines.get((rank, typical)) if typical is not None and typical != step else None
        if other is not None and other.height:
            t_row = lookups.step_row.get((rank, typical))
            t_ms = t_row["duration_ns"] / 1e6 if t_row is not None else None
            panels.append((f"step {typical} on rank {rank} (typical" + (f", {_ms(t_ms)} ms" if t_ms else "") + ")",
                           other, _highlight(lookups, anomaly, rank, typical, own=False)))
        fig, height = _timeline_figure(panels, lookups.drawn)
        merged = bool((own.get_column("count") > 1).any())
        note = ("Bars: CPU ranges, CUDA API calls, CPU gaps and GPU streams, in ms from the step start. "
                "The shaded span is the <i>where</i> range; the darker part runs from its start to its first GPU work.")
        if merged:
            note += (" Dense stretches are merged into blocks shaded by how busy they were (faint: mostly idle "
                     "gaps between short events; hover for what they hold); each GPU lane says how busy its "
                     "stream was over the whole step.")
        if len(panels) > 1:
            note += " Both steps share one time scale."
        timeline = (f'<div class="keep"><h4>Timeline</h4><p class="note">{note}</p>'
                    f'{page.figure(fig, height=height, cls="timeline")}</div>')
    elif timelines is not None:
        timeline = '<p class="note">No timeline for this anomaly (only the largest anomalies get one).</p>'
    return (f'<article class="card" id="anomaly-{number}"><h3><span class="badge">{number}</span>{esc(title, 400)}</h3>'
            f"<div class=\"card-body\"><div class=\"card-text\">{dl}{compare}</div>{ranges}{timeline}</div></article>")


def _anomalies(anomalies: list[dict], lookups: _Lookups, timelines: dict | None, page: _Page) -> str:
    if not anomalies:
        return ('<section id="anomalies"><h2>Anomalies</h2><p class="note">No step and no range instance stood out '
                "from its neighbours.</p></section>")
    cards = [_anomaly_card(i, a, lookups, timelines or {}, page) for i, a in enumerate(anomalies[:MAX_CARDS], start=1)]
    rest = ""
    if len(anomalies) > MAX_CARDS:
        rows = [[num_cell(a["rank"], "{:d}"), num_cell(a["step"], "{:d}"), text_cell(a.get("kind")),
                 num_cell(a.get("excess_ms")), text_cell(a.get("where"), 80), text_cell(a.get("cause"))]
                for a in anomalies[MAX_CARDS: MAX_CARDS + MAX_TABLE_ROWS * 2]]
        more = len(anomalies) - MAX_CARDS - len(rows)
        rest = "<h3>More anomalies</h3>" + _table(
            ["rank", "step", "kind", "excess ms", "where", "cause"], rows, numeric={0, 1, 3},
            note=f"{more} more in the JSON report." if more > 0 else "")
    intro = (f"{len(anomalies)} anomal{'y' if len(anomalies) == 1 else 'ies'}, largest excess first. Each card is the "
             "post-mortem of one step or range instance against the typical step of its rank.")
    return f'<section id="anomalies"><h2>Anomalies</h2><p class="note">{intro}</p>{"".join(cards)}{rest}</section>'


# ----------------------------------------------------------------------------- CPU gaps, kernels, ranges

def _cpu_gaps(findings) -> str:
    gaps = findings.cpu_gaps
    if gaps.is_empty() or "cause" not in gaps.columns:
        return ('<section id="cpu-gaps"><h2>CPU gaps</h2><p class="note">No CPU gap: the GPU never waited for the '
                "host to launch work.</p></section>")
    total = float(gaps.get_column("duration_ns").sum() or 0) or 1.0
    # The evidence's text is made for the rows shown, after aggregating (a long trace has a
    # hundred thousand gaps), and the largest gaps are picked without sorting them all.
    text = (pl.when(pl.col("evidence").is_not_null())
            .then(pl.format("{}: {}", pl.col("evidence_source").fill_null("evidence"), pl.col("evidence")))
            .otherwise(pl.lit(None, pl.String)))
    lazy = gaps.lazy()
    starts = findings.steps.lazy().select("rank", "step", pl.col("start_ns").alias("_w0"))
    by_duration = pl.col("duration_ns").arg_max()
    summary, evidence, largest = pl.collect_all([
        lazy.group_by("cause")
        .agg(total=pl.col("duration_ns").sum(), n=pl.len(), largest=pl.col("duration_ns").max(),
             rank=pl.col("rank").get(by_duration), step=pl.col("step").get(by_duration))
        .sort("total", "cause", descending=[True, False]),
        lazy.filter(pl.col("evidence").is_not_null()).group_by("cause", "evidence_source", "evidence")
        .agg(t=pl.col("duration_ns").sum()).select("cause", text.alias("text"), "t")
        .group_by("cause", "text").agg(pl.col("t").sum())
        .sort(["cause", "t", "text"], descending=[False, True, False])
        .group_by("cause", maintain_order=True).head(3),
        lazy.top_k(25, by="duration_ns").sort("duration_ns", descending=True, maintain_order=True)
        .with_columns(text=text).join(starts, on=["rank", "step"], how="left", maintain_order="left"),
    ])
    evidence_of: dict = {}
    for cause, text, ms in evidence.iter_rows():
        evidence_of.setdefault(cause, []).append((text, ms))
    rows = []
    for r in summary.iter_rows(named=True):
        listed = "".join(f"<li>{esc(t, 240)} <span class=\"muted\">({_ms(ms / 1e6)} ms)</span></li>"
                         for t, ms in evidence_of.get(r["cause"], []))
        rows.append([
            text_cell(r["cause"]),
            num_cell(r["total"] / 1e6), num_cell(r["total"] / total * 100, "{:.1f}", "%"), num_cell(r["n"], "{:d}"),
            num_cell(r["largest"] / 1e6), Cell(f"rank {r['rank']}, step {esc(r['step'])}"),
            Cell(f"<ul class=\"ev\">{listed}</ul>" if listed else '<span class="muted">no evidence in the trace</span>'),
        ])
    cause_table = _table(["cause", "total ms", "share", "gaps", "largest ms", "largest in", "evidence (by time)"], rows,
                         numeric={1, 2, 3, 4})
    big_rows = []
    for r in largest.iter_rows(named=True):
        offset = None if r.get("_w0") is None else (r["start_ns"] - r["_w0"]) / 1e6
        big_rows.append([
            num_cell(r["rank"], "{:d}"), num_cell(r["step"], "{:d}") if r["step"] is not None else text_cell("–"),
            num_cell(offset), num_cell(r["duration_ns"] / 1e6), text_cell(r["cause"]),
            text_cell(r["text"] or "no evidence", 160), text_cell(r.get("next_name"), 80),
        ])
    big_table = _table(["rank", "step", "at ms", "ms", "cause", "evidence", "GPU work after it"], big_rows,
                       numeric={0, 1, 2, 3})
    return (f'<section id="cpu-gaps"><h2>CPU gaps: what the host did while the GPU waited</h2>'
            f'<p class="note">{gaps.height:,} gaps, {_ms(total / 1e6)} ms in all. The evidence lists the frames, '
            f"calls or ops found in the gaps, with their share.</p>{cause_table}<h3>Largest CPU gaps</h3>{big_table}"
            f"</section>")


def _kernels_and_ranges(findings) -> str:
    parts = ['<section id="kernels"><h2>Top kernels and ranges</h2>']
    kernels = findings.top_kernels
    if kernels.height:
        rows = [[num_cell(r["rank"], "{:d}"), text_cell(r["name"], 110), num_cell(r["count"], "{:,d}"),
                 num_cell(r["total_ms"]), num_cell(r["mean_us"], "{:.1f}"), num_cell(r["share"] * 100, "{:.1f}", "%")]
                for r in kernels.head(MAX_TABLE_ROWS).iter_rows(named=True)]
        parts.append("<h3>Kernels by total GPU time</h3>" + _table(
            ["rank", "kernel", "count", "total ms", "mean µs", "share of GPU time"], rows, numeric={0, 2, 3, 4, 5},
            note=f"First {MAX_TABLE_ROWS} of {kernels.height} shown." if kernels.height > MAX_TABLE_ROWS else ""))
    ranges = findings.ranges
    if ranges.height:
        ranges = ranges.sort("total_ms", descending=True) if "total_ms" in ranges.columns else ranges
        rows = [[num_cell(r["rank"], "{:d}"), text_cell(r["name"], 90), num_cell(r["count"], "{:,d}"),
                 num_cell(r.get("total_ms")), num_cell(r.get("p50_ms"), "{:.3f}"), num_cell(r.get("p99_ms"), "{:.3f}"),
                 num_cell(r.get("max_ms"), "{:.3f}"), num_cell(r.get("lag_p50_ms"), "{:.3f}"),
                 num_cell(r.get("lag_max_ms"), "{:.3f}"), num_cell(r.get("gpu_ms_mean"), "{:.3f}")]
                for r in ranges.head(MAX_TABLE_ROWS).iter_rows(named=True)]
        parts.append("<h3>Ranges (NVTX / record_function) by total time</h3>" + _table(
            ["rank", "range", "count", "total ms", "p50 ms", "p99 ms", "max ms", "lag p50 ms", "lag max ms",
             "GPU ms (mean)"], rows, numeric=set(range(10)) - {1},
            note=(f"First {MAX_TABLE_ROWS} of {ranges.height} shown. " if ranges.height > MAX_TABLE_ROWS else "")
            + "Lag: from the range's start to the start of the first GPU work it launched."))
    if len(parts) == 1:
        parts.append('<p class="note">No kernels and no ranges.</p>')
    parts.append("</section>")
    return "".join(parts)


# ----------------------------------------------------------------------------- assembly

def render_html(findings, timelines: dict | None = None, *, show_host: bool = False, title: str | None = None,
                as_bytes: bool = False) -> str | bytes:
    """The report page of ``findings`` as one self-contained HTML string.

    Parameters
    ----------
    findings
        From :func:`~traceinsight.analysis.pipeline.analyze`.
    timelines
        ``{(rank, step): frame}`` from :func:`~traceinsight.analysis.timeline.timelines_for_report`
        (the anomalous steps and their ranks' typical steps); without it the anomaly cards
        have no timeline.
    show_host
        Show host names (hidden by default, like every other report).
    as_bytes
        Return the page encoded as UTF-8, ready to write (faster than encoding the text).

    Examples
    --------
    >>> page = render_html(findings, timelines_for_report(model, findings))  # doctest: +SKIP
    """
    page = _Page()
    title = title or "traceinsight report"
    anomalies = anomaly_records(report_anomalies(findings))
    lookups = _Lookups(findings, anomalies[:max(MAX_CARDS, MAX_HEADLINES)])
    sections = [
        _summary(findings, page, anomalies, lookups, show_host=show_host),
        _step_durations(findings, page) if findings.steps.height else "",
        _step_breakdown(findings, page) if findings.steps.height else "",
        _waits(findings, page) if findings.steps.height or findings.waits.height else "",
        _anomalies(anomalies, lookups, timelines, page),
        _cpu_gaps(findings),
        _kernels_and_ranges(findings),
    ]
    nav = [("summary", "Summary")]
    if findings.steps.height:
        nav += ([("steps", "The step window")] if single_step(findings)
                else [("steps", "Step durations"), ("breakdown", "Breakdown")])
    if any(s.startswith('<section id="waits"') for s in sections):
        nav.append(("waits", "Cross-rank waiting"))
    nav += [("anomalies", f"Anomalies ({findings.anomalies.height})"), ("cpu-gaps", "CPU gaps"),
            ("kernels", "Kernels & ranges")]
    n_ranks = findings.steps.get_column("rank").n_unique() if findings.steps.height else 0
    subtitle = (f"{n_ranks} rank(s) · {findings.steps.height} step window(s) · {findings.anomalies.height} anomalies · "
                f"traceinsight {esc(__version__)}")
    return page_shell(page, title=title, subtitle=subtitle, nav=nav, sections=sections,
                      footer="times in milliseconds (ms) unless stated", as_bytes=as_bytes)
