"""Rendering of a before/after diff (``traceinsight diff``) as terminal tables.

The comparison itself is :mod:`traceinsight.analysis.diff`; the JSON shape is
:func:`~traceinsight.analysis.diff.diff_to_dict` (re-exported here), written by
:func:`~traceinsight.report.json_report.render_diff_json`. Every name from a trace is
printed through :func:`~traceinsight.report.terminal.plain`.
"""

from __future__ import annotations

import polars as pl
from rich.console import Console
from rich.text import Text

from traceinsight.analysis.diff import FindingsDiff, diff_to_dict
from traceinsight.report.terminal import middle, plain, print_table

__all__ = ["render_diff", "diff_to_dict"]

#: Rows shown per table in the terminal (the JSON has them all).
MAX_ROWS = 15

_STYLE = {"slower": "bold red", "faster": "bold green", "unchanged": "dim"}


def _ms(ns) -> str:
    return "-" if ns is None else f"{ns / 1e6:,.3f}"


def _delta(ns) -> str:
    if ns is None:
        return "-"
    text = f"{ns / 1e6:+,.3f}"
    return "0.000" if float(text.replace(",", "")) == 0 else text


def _pct(value) -> str:
    return "new" if value is None else f"{value:+.1f}%"


def _verdict(verdict: str) -> Text:
    return Text(verdict, style=_STYLE.get(verdict, ""))


def _scope(rank) -> str:
    return "all" if rank is None else str(rank)


def _side_line(label: str, side: dict) -> Text:
    steps = side["steps"]
    span = f"{steps[0]}-{steps[-1]}" if steps else "none"
    gpus = ", ".join(side["gpus"]) or "GPU unknown"
    ranks = ", ".join(map(str, side["ranks"])) or "none"
    median = "-" if side["median_step_ms"] is None else f"{side['median_step_ms']:.3f}"
    mad = "-" if side["step_mad_ms"] is None else f"{side['step_mad_ms']:.3f}"
    return Text(f"{label}: ranks {ranks} · {gpus} · {len(steps)} step(s) {span} · "
                f"median step {median} ms (MAD {mad})")


def _table(console: Console, title: str, frame: pl.DataFrame, *, counts: bool = False, limit: int = MAX_ROWS) -> None:
    if frame.is_empty():
        return
    headers = ["rank", "name", "before", "after", "Δ", "Δ %", "noise"] + (["launches"] if counts else []) + ["verdict"]
    rows = []
    for row in frame.head(limit).iter_rows(named=True):
        cells = [
            _scope(row["rank"]), plain(middle(row["name"])), _ms(row["before_ns"]), _ms(row["after_ns"]),
            _delta(row["delta_ns"]), _pct(row["change_pct"]), "±" + _ms(row["noise_ns"]),
        ]
        if counts:
            launches = f"{row['before_count']:g}→{row['after_count']:g}"
            cells.append(Text(launches, style="yellow" if row["launches_changed"] else ""))
        cells.append(_verdict(row["verdict"]))
        rows.append(cells)
    caption = f"{limit} of {frame.height} rows shown (--json has them all)" if frame.height > limit else None
    print_table(console, title, headers, rows, numeric=set(range(2, 7)) | {0} | ({7} if counts else set()),
                caption=caption)


def _noise_text(summary: dict) -> str:
    noise = summary.get("step_noise_ms")
    if noise is None:
        return ""
    steps = f"{summary.get('steps_before')} + {summary.get('steps_after')} steps"
    if not summary.get("step_noise_known"):
        return f"(noise unknown: {steps}, fewer than 3 on a side; the 5 % minimum decides)"
    return f"(noise ±{noise:,.3f} ms: the spread of the two medians, from {steps})"


def render_diff(diff: FindingsDiff, console: Console) -> None:
    """Print the diff: both sides, the verdict on the median step (the one ``--fail-if-slower``
    uses) with its noise band, what changed (per rank too), categories, changed ranges and
    kernels, new/vanished kernels (with their mean time per step)."""
    summary = diff.summary
    console.print(_side_line("before", diff.before), overflow="fold")
    console.print(_side_line("after ", diff.after), overflow="fold")
    if summary["median_step_ms_before"] is not None:
        verdict = summary["step_verdict"]
        console.print(Text.assemble(
            ("median step: ", "bold"),
            f"{summary['median_step_ms_before']:.3f} ms → {summary['median_step_ms_after']:.3f} ms "
            f"({_pct(summary['step_change_pct'])}) ",
            (verdict, _STYLE.get(verdict, "")), " ", _noise_text(summary),
        ), overflow="fold")
    for line in summary.get("step_change_lines") or []:
        console.print(Text("  " + line), overflow="fold")
    console.print()
    time_note = " (ms per step; medians over each side's steps; rank 'all' = mean of the ranks)"
    _table(console, "Step time by category" + time_note, diff.categories, limit=60)
    for title, frame, counts in (
        ("Ranges", diff.ranges, False),
        ("Kernels", diff.kernels, True),
    ):
        changed = frame.filter(pl.col("verdict") != "unchanged")
        if changed.is_empty():
            console.print(Text(f"{title}: no change beyond the noise "
                               f"({frame.filter(pl.col('rank').is_null()).height} compared)", style="dim"))
            continue
        _table(console, f"{title} that changed" + time_note, changed, counts=counts)
    for label, frame, side in (("New kernels (after only)", diff.new_kernels, "after"),
                               ("Vanished kernels (before only)", diff.vanished_kernels, "before")):
        if frame.is_empty():
            continue
        shown = frame.sort(f"{side}_mean_ns", descending=True).head(MAX_ROWS)
        rows = [[plain(middle(row["name"])), _ms(row[f"{side}_mean_ns"]), f"{row[f'{side}_mean_count']:.2f}"]
                for row in shown.iter_rows(named=True)]
        caption = f"{MAX_ROWS} of {frame.height} shown (--json has them all)" if frame.height > MAX_ROWS else None
        print_table(console, f"{label}: {frame.height} (means per step: some run in a few steps only)",
                    ["kernel", "ms per step", "launches per step"], rows, numeric={1, 2}, caption=caption)
    launches_b, launches_a = diff.before.get("launches_per_step"), diff.after.get("launches_per_step")
    if launches_b is not None and launches_a is not None and launches_b != launches_a:
        console.print(Text(f"GPU activities launched per step: {launches_b:g} → {launches_a:g}"))
    if summary["launch_count_changes"]:
        console.print(Text(f"{summary['launch_count_changes']} kernel(s) changed their launch count per step"))
    if not summary["changed"]:
        console.print(Text("no change beyond the step-to-step noise", style="bold"))
