"""Rendering of a before/after diff (``traceinsight diff``): terminal tables and JSON.

The comparison itself is :mod:`traceinsight.analysis.diff`; the JSON shape is
:func:`~traceinsight.analysis.diff.diff_to_dict` (re-exported here). Every name from a trace is
printed through :func:`~traceinsight.report.terminal.plain`.
"""

from __future__ import annotations

import msgspec
import polars as pl
from rich.console import Console
from rich.table import Table
from rich.text import Text

from traceinsight.analysis.diff import FindingsDiff, diff_to_dict
from traceinsight.report.terminal import plain

__all__ = ["render_diff", "render_diff_json", "diff_to_dict"]

#: Rows shown per table in the terminal (the JSON has them all).
MAX_ROWS = 15

_STYLE = {"slower": "bold red", "faster": "bold green", "unchanged": "dim"}


def _ms(ns) -> str:
    return "-" if ns is None else f"{ns / 1e6:,.3f}"


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


def _table(title: str, frame: pl.DataFrame, *, counts: bool = False, limit: int = MAX_ROWS) -> Table | None:
    if frame.is_empty():
        return None
    table = Table(title=title, title_justify="left")
    table.add_column("rank", justify="right")
    table.add_column("name")
    for column in ("before", "after", "Δ", "Δ %", "noise"):
        table.add_column(column, justify="right")
    if counts:
        table.add_column("launches", justify="right")
    table.add_column("verdict")
    for row in frame.head(limit).iter_rows(named=True):
        cells = [
            _scope(row["rank"]), plain(row["name"]), _ms(row["before_ns"]), _ms(row["after_ns"]),
            _ms(row["delta_ns"]), _pct(row["change_pct"]), _ms(row["noise_ns"]),
        ]
        if counts:
            launches = f"{row['before_count']:g} → {row['after_count']:g}"
            cells.append(Text(launches, style="yellow" if row["launches_changed"] else ""))
        cells.append(_verdict(row["verdict"]))
        table.add_row(*cells)
    if frame.height > limit:
        table.caption = f"{limit} of {frame.height} rows shown (--json has them all)"
    return table


def render_diff(diff: FindingsDiff, console: Console) -> None:
    """Print the diff: both sides, step categories, changed ranges and kernels, new/vanished."""
    summary = diff.summary
    console.print(_side_line("before", diff.before))
    console.print(_side_line("after ", diff.after))
    if summary["median_step_ms_before"] is not None:
        verdict = summary["step_verdict"]
        console.print(Text.assemble(
            ("median step: ", "bold"),
            f"{summary['median_step_ms_before']:.3f} ms → {summary['median_step_ms_after']:.3f} ms "
            f"({_pct(summary['step_change_pct'])}) ",
            (verdict, _STYLE.get(verdict, "")),
        ))
    time_note = " (ms per step, medians over each side's steps; rank 'all' = mean over ranks)"
    table = _table("Step time by category" + time_note, diff.categories, limit=60)
    if table is not None:
        console.print(table)
    for title, frame, counts in (
        ("Ranges", diff.ranges, False),
        ("Kernels", diff.kernels, True),
    ):
        changed = frame.filter(pl.col("verdict") != "unchanged")
        if changed.is_empty():
            console.print(Text(f"{title}: no change beyond the step-to-step noise "
                               f"({frame.filter(pl.col('rank').is_null()).height} compared)", style="dim"))
            continue
        table = _table(f"{title} that changed" + time_note, changed, counts=counts)
        console.print(table)
    for label, frame in (("New kernels (after only)", diff.new_kernels),
                         ("Vanished kernels (before only)", diff.vanished_kernels)):
        if frame.is_empty():
            continue
        ms = "after_ns" if frame.get_column("status").first() == "new" else "before_ns"
        count = "after_count" if ms == "after_ns" else "before_count"
        shown = frame.sort(ms, descending=True).head(MAX_ROWS)
        table = Table(title=f"{label}: {frame.height}", title_justify="left")
        table.add_column("kernel")
        table.add_column("ms per step", justify="right")
        table.add_column("launches per step", justify="right")
        for row in shown.iter_rows(named=True):
            table.add_row(plain(row["name"]), _ms(row[ms]), f"{row[count]:g}")
        console.print(table)
    launches_b, launches_a = diff.before.get("launches_per_step"), diff.after.get("launches_per_step")
    if launches_b is not None and launches_a is not None and launches_b != launches_a:
        console.print(Text(f"GPU activities launched per step: {launches_b:g} → {launches_a:g}"))
    if summary["launch_count_changes"]:
        console.print(Text(f"{summary['launch_count_changes']} kernel(s) changed their launch count per step"))
    if not summary["changed"]:
        console.print(Text("no change beyond the step-to-step noise", style="bold"))


def render_diff_json(diff: FindingsDiff) -> bytes:
    """The diff as indented UTF-8 JSON (see :func:`~traceinsight.analysis.diff.diff_to_dict`)."""
    return msgspec.json.format(msgspec.json.encode(diff_to_dict(diff)), indent=1)
