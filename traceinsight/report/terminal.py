"""The terminal summary of ``analyze`` and ``info`` (rich tables).

Every string from a trace goes through :func:`plain`, so a kernel named ``[bold]x`` prints
literally instead of being read as markup.
"""

from __future__ import annotations

import polars as pl
from rich.console import Console
from rich.table import Table
from rich.text import Text

from traceinsight.analysis.categories import CATEGORIES
from traceinsight.analysis.findings import Findings
from traceinsight.report.records import anomaly_records, imbalance_records, straggler_records
from traceinsight.errors import printable

MAX_STEP_ROWS = 60

#: Short column headers of the breakdown categories (the step table must fit 80 columns).
SHORT_CATEGORY = {
    "gpu_compute": "compute", "gpu_memory": "memory", "communication": "comm", "cross_rank_wait": "wait",
    "host_sync": "sync", "cpu_gap": "cpu gap", "idle": "idle",
}


def plain(value) -> Text:
    """Untrusted text as a rich ``Text`` (never parsed as markup, control characters and
    line breaks shown as U+FFFD), shortened for a table cell."""
    text = printable(value)
    if len(text) > 90:
        text = text[:87] + "..."
    return Text(text)


def middle(value, limit: int = 90) -> str:
    """Untrusted text shortened *from the middle* (``GroupedL…layer1.fc1``): the end of a name
    (``fc1`` / ``fc2``, a template argument) tells names apart as often as its start."""
    text = "" if value is None else str(value)
    if len(text) <= limit:
        return text
    head = (limit - 1) // 2
    return text[:head] + "…" + text[len(text) - (limit - 1 - head):]


def _ms(ns: int | float | None) -> str:
    return "-" if ns is None else f"{ns / 1e6:,.2f}"


def _short_ms(ns: int | float | None) -> str:
    """Milliseconds in at most 6 characters below 100 s (``1,086``, ``32.4``, ``1.23``)."""
    if ns is None:
        return "-"
    value = ns / 1e6
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _cell_text(cell) -> str:
    return cell.plain if isinstance(cell, Text) else str(cell)


def print_table(console: Console, title: str, headers: list[str], rows: list[list], *,
                numeric: set[int] | frozenset = frozenset(), caption: str | None = None,
                min_text: int = 12, whole_words: set[int] | frozenset = frozenset()) -> None:
    """Print a table that never cuts a number or a name at the console's width.

    Numeric columns keep the width of their widest value (never wrapped, never shortened);
    text columns wrap at spaces and fold long words onto the next line, except the
    ``whole_words`` columns (identifiers such as a cause, ``cpu_gap.garbage_collection``),
    which are at least as wide as their longest word. When even that does not fit (many
    columns on a narrow terminal) each row is printed as one wrapped ``header value`` record
    instead.
    """
    width = console.width
    needed = 0
    for i, header in enumerate(headers):
        cells = [_cell_text(row[i]) for row in rows]
        longest_word = max((len(w) for w in header.split()), default=1)
        if i in numeric:
            needed += max([len(c) for c in cells] + [longest_word])
        elif i in whole_words:
            needed += max([len(w) for c in cells for w in c.split()] + [longest_word])
        else:
            needed += max(min(max((len(c) for c in cells), default=1), min_text), min(longest_word, min_text))
    needed += 2 * (len(headers) - 1) + 2  # + the edges: no row starts at the left margin
    if needed > width:
        console.print(Text(title, style="bold"))
        for row in rows:
            line = Text("  ")
            for i, (header, cell) in enumerate(zip(headers, row)):
                if i:
                    line.append("  ·  ", style="dim")
                line.append(f"{header} ", style="dim")
                line.append(cell if isinstance(cell, Text) else Text(str(cell)))
            console.print(line, overflow="fold")
        if caption:
            console.print(Text(caption, style="dim"), overflow="fold")
        console.print()
        return
    # A padded edge: a row never begins a line, so a name cannot pass for a message of ours
    # ("traceinsight: error: ...") at the start of one.
    table = Table(title=title, title_justify="left", box=None, pad_edge=True, padding=(0, 1),
                  header_style="bold underline", caption=caption, caption_justify="left")
    for i, header in enumerate(headers):
        cells = [len(_cell_text(row[i])) for row in rows]
        longest_word = max((len(w) for w in header.split()), default=1)
        if i in numeric:
            # exactly as wide as the widest value (or header word): headers wrap, numbers never do
            table.add_column(header, justify="right", width=max(cells + [longest_word]), overflow="fold")
        else:
            words = [len(w) for row in rows for w in _cell_text(row[i]).split()]
            widest_word = max(words + [longest_word])
            table.add_column(header, overflow="fold",
                             min_width=widest_word if i in whole_words
                             else min(widest_word, min_text, max(cells, default=1) or 1))
    for row in rows:
        table.add_row(*[c if isinstance(c, Text) else str(c) for c in row])
    console.print(table)


def _steps_header(findings: Findings, steps: pl.DataFrame, n_ranks: int) -> str:
    per_rank = steps.group_by("rank").len().get_column("len")
    lo, hi = (int(per_rank.min() or 0), int(per_rank.max() or 0)) if per_rank.len() else (0, 0)
    each = f"{lo}" if lo == hi else f"{lo}-{hi}"
    if findings.step_source == "whole trace":
        return f"{n_ranks} rank(s); no step markers: the whole trace is one step per rank"
    source = "from step markers" if findings.step_source == "marker" else findings.step_source
    return f"{n_ranks} rank(s); {steps.height} step(s) {source}, {each} per rank"


def render_findings(findings: Findings, console: Console, *, show_host: bool = False,
                    all_steps: bool = False) -> None:
    """Print the summary of ``findings``: notes first (they change how the rest reads), then
    ranks, steps (a summary per rank and the flagged steps; every step with ``all_steps``),
    anomalies, waits, CPU gaps, ranges and kernels. Fits ``console.width`` without cutting
    numbers or names."""
    steps = findings.steps.sort("rank", "step")
    ranks = findings.ranks.sort("rank")
    console.print(Text("traceinsight: " + _steps_header(findings, steps, ranks.height), style="bold"),
                  overflow="fold")
    for warning in dict.fromkeys(findings.warnings):  # a note of every rank's file is told once
        console.print(Text(f"note: {printable(warning)}", style="yellow"), overflow="fold")
    console.print()

    rows = [[str(row["rank"]), plain(row["rank_source"]), plain(row["format"]),
             plain(", ".join(row["gpu_names"] or []) or "unknown"),
             plain_paragraph(str(row["source"] or "").replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]),
             f"{row['clock_offset_ns'] / 1e3:,.1f}"] for row in ranks.iter_rows(named=True)]
    print_table(console, "Ranks", ["rank", "from", "format", "GPU", "file", "clock offset µs"], rows,
                numeric={0, 5})

    _render_steps(findings, steps, console, all_steps=all_steps)

    anomalies = anomaly_records(findings.anomalies.head(20))
    if anomalies:
        rows = [[str(a["rank"]), str(a["step"]), a["kind"], f"{a['excess_ms']:+.1f}", plain(middle(a["where"])),
                 plain(a["cause"])] for a in anomalies]
        total = findings.anomalies.height
        caption = f"{total} in all (the JSON has every one)" if total > 20 else None
        print_table(console, "Anomalies", ["rank", "step", "kind", "excess ms", "where", "cause"], rows,
                    numeric={0, 1, 3}, caption=caption, whole_words={5})
        for anomaly in anomalies[:5]:
            console.print(Text(f"rank {anomaly['rank']} step {anomaly['step']}: ", style="bold").append(
                plain_paragraph(anomaly["evidence"])), overflow="fold")
        console.print()

    _render_waits(findings, console)
    _render_imbalance(findings, console)

    causes = findings.cpu_gaps
    if causes.height:
        summary = (
            causes.sort("duration_ns", descending=True)
            .group_by("cause", maintain_order=True)
            .agg(total=pl.col("duration_ns").sum(), n=pl.len(), largest=pl.col("duration_ns").first(),
                 evidence=pl.col("evidence").first(), where=pl.col("next_name").first())
            .sort("total", descending=True)
        )
        rows = [[row["cause"], _ms(row["total"]), str(row["n"]), _ms(row["largest"]),
                 plain(middle(row["evidence"], 160))] for row in summary.iter_rows(named=True)]
        print_table(console, "CPU gaps: what the host did while the GPU waited",
                    ["cause", "total ms", "gaps", "largest ms", "evidence of the largest"], rows, numeric={1, 2, 3},
                    whole_words={0})

    if findings.ranges.height:
        rows = [[str(row["rank"]), plain(middle(row["name"])), str(row["count"]),
                 f"{row['p50_ms']:.3f}", f"{row['p99_ms']:.3f}", f"{row['max_ms']:.3f}",
                 "-" if row["lag_p50_ms"] is None else f"{row['lag_p50_ms']:.3f}",
                 "-" if row["lag_max_ms"] is None else f"{row['lag_max_ms']:.3f}"]
                for row in findings.ranges.head(12).iter_rows(named=True)]
        print_table(console, "Ranges (top by total time)",
                    ["rank", "range", "count", "p50 ms", "p99 ms", "max ms", "lag p50 ms", "lag max ms"], rows,
                    numeric={0, 2, 3, 4, 5, 6, 7})

    if findings.top_kernels.height:
        rows = [[str(row["rank"]), plain(middle(row["name"])), str(row["count"]), f"{row['total_ms']:.2f}",
                 f"{row['mean_us']:.1f}", f"{row['share']:.1%}"]
                for row in findings.top_kernels.group_by("rank", maintain_order=True).head(6).iter_rows(named=True)]
        print_table(console, "Top kernels", ["rank", "kernel", "count", "total ms", "mean µs", "share"], rows,
                    numeric={0, 2, 3, 4, 5})


def _render_steps(findings: Findings, steps: pl.DataFrame, console: Console, *, all_steps: bool) -> None:
    """Per rank: count, median, p90, max and the flagged steps; then the breakdown of the
    flagged steps only (every step with ``all_steps``, or when each rank has one step)."""
    if steps.is_empty():
        return
    flag = pl.col("anomalous") if "anomalous" in steps.columns else pl.lit(False)
    steps = steps.with_columns(_flag=flag.fill_null(False))
    one_each = steps.group_by("rank").len().get_column("len").max() == 1
    if not one_each:
        summary = steps.group_by("rank", maintain_order=True).agg(
            n=pl.len(), median=pl.col("duration_ns").median(),
            p90=pl.col("duration_ns").quantile(0.9, interpolation="linear"), worst=pl.col("duration_ns").max(),
            flagged=pl.col("step").filter(pl.col("_flag")),
        )
        rows = []
        for row in summary.iter_rows(named=True):
            flagged = row["flagged"]
            listed = ", ".join(map(str, flagged[:12])) + (f" +{len(flagged) - 12} more" if len(flagged) > 12 else "")
            rows.append([str(row["rank"]), str(row["n"]), _ms(row["median"]), _ms(row["p90"]), _ms(row["worst"]),
                         Text(f"{len(flagged)}" + (f": {listed}" if flagged else ""),
                              style="bold red" if flagged else "")])
        print_table(console, "Steps per rank (ms)", ["rank", "steps", "median", "p90", "max", "flagged steps"],
                    rows, numeric={0, 1, 2, 3, 4})
    shown = steps if all_steps or one_each else steps.filter(pl.col("_flag"))
    hidden = steps.height - shown.height
    if shown.is_empty():
        console.print(Text(f"No step flagged as anomalous; --all-steps lists all {steps.height} with their "
                           "breakdown.", style="dim"), overflow="fold")
        console.print()
        return
    if shown.height > MAX_STEP_ROWS:
        hidden += shown.height - MAX_STEP_ROWS
        shown = shown.head(MAX_STEP_ROWS)
    title = ("Each step: where the time went (ms)" if all_steps or one_each
             else "Flagged steps: where the time went (ms)")
    rows = [[str(row["rank"]), str(row["step"]), _short_ms(row["duration_ns"]),
             *[_short_ms(row[f"{name}_ns"]) for name in CATEGORIES]] for row in shown.iter_rows(named=True)]
    caption = "categories: " + ", ".join(f"{SHORT_CATEGORY[c]} = {c}" for c in CATEGORIES if SHORT_CATEGORY[c] != c)
    if hidden:
        caption = (f"{shown.height} of {steps.height} steps shown"
                   + ("; --all-steps lists the others" if not all_steps else "; the JSON has them all")
                   + ". " + caption)
    print_table(console, title, ["rank", "step", "total", *[SHORT_CATEGORY[c] for c in CATEGORIES]], rows,
                numeric=set(range(2 + 1 + len(CATEGORIES))), caption=caption)


def _render_waits(findings: Findings, console: Console) -> None:
    """Multi-rank: alignment, a rank x step table of waiting, stragglers, worst phases."""
    _render_alignment(findings, console)
    if findings.waits.is_empty():
        return
    import polars as pl

    waits = findings.waits
    per = waits.group_by("step", "rank").agg(ms=pl.col("wait_ms").sum())
    ranks = sorted(per.get_column("rank").unique().to_list())
    steps = sorted(per.get_column("step").drop_nulls().unique().to_list())
    blame = (
        waits.group_by("step", "waiting_for_rank").agg(ms=pl.col("wait_ms").sum())
        .sort(["step", "ms"], descending=[False, True]).unique("step", keep="first", maintain_order=True)
    )
    straggler = {r["step"]: r["waiting_for_rank"] for r in blame.iter_rows(named=True)}
    # as many rank columns as fit the console (8 columns each), the JSON has them all
    shown_ranks = ranks[:max(1, min(16, (console.width - 20) // 9))]
    lookup = {(r["step"], r["rank"]): r["ms"] for r in per.iter_rows(named=True)}
    worst_steps = sorted(steps, key=lambda s: -sum(lookup.get((s, r), 0) for r in ranks))[:MAX_STEP_ROWS]
    rows = [[str(step), *[f"{lookup.get((step, r), 0):.2f}" for r in shown_ranks], str(straggler.get(step, "-"))]
            for step in sorted(worst_steps)]
    caption = None
    if len(ranks) > len(shown_ranks) or len(steps) > len(worst_steps):
        caption = f"{len(worst_steps)} of {len(steps)} steps, {len(shown_ranks)} of {len(ranks)} ranks shown (JSON has all)"
    print_table(console, "Cross-rank waiting per step (ms)", ["step", *[f"rank {r}" for r in shown_ranks], "straggler"],
                rows, numeric=set(range(len(shown_ranks) + 2)), caption=caption)
    phases = (
        waits.group_by("phase").agg(ms=pl.col("wait_ms").sum(), n=pl.len(), worst=pl.col("wait_ms").max())
        .sort("ms", descending=True).head(8)
    )
    rows = [[plain(middle(row["phase"])), f"{row['ms']:.2f}", str(row["n"]), f"{row['worst']:.2f}"]
            for row in phases.iter_rows(named=True)]
    print_table(console, "Where ranks waited (phases)", ["phase", "total wait ms", "waits", "largest ms"], rows,
                numeric={1, 2, 3})
    for reason in sorted(straggler_records(findings.stragglers), key=lambda r: -r["max_wait_ms"])[:3]:
        console.print(Text(
            f"step {reason['step']}: rank {reason['straggler']} arrived {reason['max_wait_ms']:.2f} ms late at "
            f"{reason['phase'] or reason['collective']}; before it, its {reason['reason']} exceeded the others' "
            f"by {reason['reason_excess_ms']:.2f} ms"
            + (f"; tokens sent per rank (payload all-to-all) {reason['rows_sent']}" if reason.get("rows_sent") else "")
        ), overflow="fold")


MAX_ALIGNMENT_ROWS = 16
MAX_IMBALANCE_ROWS = 8


def _render_imbalance(findings: Findings, console: Console) -> None:
    """Multi-rank MoE: what balanced load would save, the steps that would save most first,
    with the phase that would save most and the token payload behind dispatch and combine."""
    entries = [e for e in imbalance_records(findings.imbalance) if e.get("modeled_ms") is not None]
    if not entries:
        return
    if all(round(e["saving_ms"], 2) <= 0 for e in entries):
        console.print(Text(f"Load imbalance: the ranks' MoE phases are balanced; balance would save nothing "
                           f"measurable in {len(entries)} steps"))
        return
    worst = sorted(entries, key=lambda e: (-e["saving_ms"], e["step"]))[:MAX_IMBALANCE_ROWS]
    table = Table(title="Load imbalance: each step modeled now and with balanced load (ms)", title_justify="left")
    for column in ("step", "measured", "modeled", "balanced", "saving", "most from"):
        table.add_column(column, justify="left" if column == "most from" else "right")

    def largest(entry: dict) -> tuple[str, dict]:
        return max(entry["phases"].items(), key=lambda kv: (kv[1]["max_ms"] - kv[1]["balanced_ms"], kv[0]))

    for entry in sorted(worst, key=lambda e: e["step"]):
        phase, figures = largest(entry)
        where = f"{phase} {figures['max_ms']:.2f} -> {figures['balanced_ms']:.2f}"
        if figures.get("max_rank") is not None:
            where += f" (rank {figures['max_rank']})"
        table.add_row(str(entry["step"]), "-" if entry["measured_ms"] is None else f"{entry['measured_ms']:.2f}",
                      f"{entry['modeled_ms']:.2f}", f"{entry['balanced_ms']:.2f}", f"{entry['saving_ms']:.2f}",
                      where)
    total = sum(e["saving_ms"] for e in entries)
    table.caption = (f"{len(worst)} of {len(entries)} steps shown, most saving first; balance would save "
                     f"{total:.2f} ms over all {len(entries)} steps (JSON has every phase)")
    console.print(table)
    for entry in worst[:3]:
        phase, figures = largest(entry)
        token = (entry.get("tokens") or {}).get(phase)
        if token:
            measured = "-" if token["measured_ratio"] is None else f"{token['measured_ratio']:.2f}"
            console.print(Text(
                f"step {entry['step']} {phase}: rank {token['rank']} {token['direction']} {token['tokens']:,} tokens, "
                f"balanced {token['balanced_tokens']:,.0f}: expected time ratio {token['expected_ratio']:.2f}, "
                f"measured ratio {measured} (payload transfer {token['transfer_ms']:.3f} ms)"))
        elif figures.get("max_rank") is not None:
            console.print(Text(
                f"step {entry['step']} {phase}: rank {figures['max_rank']} spends {figures['max_ms']:.2f} ms of GPU time, "
                f"balanced {figures['balanced_ms']:.2f} ms: ratio {figures['max_ms'] / max(figures['balanced_ms'], 1e-9):.2f}"))
        for other, token in sorted((entry.get("tokens") or {}).items()):
            if other != phase and token["expected_ratio"] and token["tokens"] > token["balanced_tokens"] * 1.1:
                measured = "-" if token["measured_ratio"] is None else f"{token['measured_ratio']:.2f}"
                console.print(Text(
                    f"step {entry['step']} {other}: rank {token['rank']} {token['direction']} {token['tokens']:,} "
                    f"tokens, balanced {token['balanced_tokens']:,.0f}: expected time ratio "
                    f"{token['expected_ratio']:.2f}, measured ratio {measured}"))


def _render_alignment(findings: Findings, console: Console) -> None:
    """Multi-rank: how each rank was put on the common clock and how well it agrees."""
    alignment = findings.alignment
    if alignment is None or len(alignment.offsets) < 2:
        return
    if alignment.method == "none" and not alignment.per_rank:
        return
    residual = (
        f", collective ends agree within {alignment.residual_p50_ns / 1e3:.1f} µs (median), "
        f"{alignment.residual_max_ns / 1e3:.1f} µs (max) over {alignment.matched} collectives"
        if alignment.residual_p50_ns is not None else ""
    )
    pairing = f"; collectives paired by {alignment.pairing}" if alignment.pairing != "none" else ""
    trust = "" if alignment.trusted else "; waits not reported (see notes)"
    console.print(Text(f"Clocks aligned by {alignment.method} to rank {alignment.reference_rank}{residual}"
                       f"{pairing}{trust}"))
    if not alignment.per_rank:
        return
    table = Table(title="Clock alignment per rank", title_justify="left")
    for column in ("rank", "method", "offset µs", "correction µs", "matched", "residual p50 µs", "residual max µs"):
        table.add_column(column, justify="left" if column == "method" else "right", no_wrap=column == "method")
    ranks = sorted(alignment.per_rank)
    # The ranks that agree worst first when not all fit.
    shown = ranks if len(ranks) <= MAX_ALIGNMENT_ROWS else sorted(
        sorted(ranks, key=lambda r: -(alignment.per_rank[r]["residual_max_ns"] or 0))[:MAX_ALIGNMENT_ROWS])
    for rank in shown:
        info = alignment.per_rank[rank]
        table.add_row(
            str(rank), info["method"], f"{alignment.offsets.get(rank, 0) / 1e3:,.1f}",
            f"{alignment.corrections.get(rank, 0) / 1e3:,.1f}", str(info["matched"]),
            "-" if info["residual_p50_ns"] is None else f"{info['residual_p50_ns'] / 1e3:,.1f}",
            "-" if info["residual_max_ns"] is None else f"{info['residual_max_ns'] / 1e3:,.1f}",
        )
    if len(shown) < len(ranks):
        table.caption = f"{len(shown)} of {len(ranks)} ranks shown, worst residual first (JSON has all)"
    console.print(table)


def render_info(descriptions: list[dict], console: Console) -> None:
    """Print ``traceinsight info`` for each file."""
    for info in descriptions:
        console.print(Text(f"{info['path']}", style="bold"))
        table = Table(show_header=False, box=None, pad_edge=False)
        table.add_column(style="dim", no_wrap=True)
        table.add_column(overflow="fold")  # values wrap, never cut
        steps = info["steps"]
        step_text = (
            f"{steps['count']} ({', '.join(steps['labels'])} ...)" if steps["count"] else "none found"
        )
        counts = ", ".join(f"{k} {v:,}" for k, v in info["counts"].items() if v)
        table.add_row("format", plain_paragraph(f"{info['format']} {info['tool_version'] or ''}".strip()))
        table.add_row("ranks", plain(", ".join(str(r) for r in info["ranks"]) or "none"))
        gpu_rows = sum(info["counts"].get(k, 0) for k in ("kernel", "memcpy", "memset"))
        unnamed = "unknown (GPU work recorded, the trace does not name the GPUs)" if gpu_rows else "no GPU work recorded"
        table.add_row("GPUs", plain(", ".join(info["gpus"]) or unnamed))
        table.add_row("span", f"{info['span_ms']:,.1f} ms")
        table.add_row("events", plain_paragraph(counts or "none"))
        table.add_row("CPU samples", f"{info['samples']:,}")
        table.add_row("steps", plain_paragraph(step_text))
        for kernel in info["top_kernels"][:5]:
            table.add_row("top kernel", plain(middle(kernel["name"], 70)).append(
                f"  {kernel['total_ms']:.2f} ms ({kernel['share']:.0%}, {kernel['count']}x)"))
        for warning in info["warnings"]:
            table.add_row("note", plain_paragraph(warning))
        console.print(table)
        console.print()


def render_postmortem(report: dict, console: Console) -> None:
    """Print ``traceinsight explain``: narrative, then where this step differs from typical."""
    flag = "anomalous" if report["anomalous"] else "not flagged as anomalous"
    console.print(Text(
        f"Step {report['step']} on rank {report['rank']} ({report['label']}): {report['duration_ms']:.1f} ms, "
        f"typical {report['typical_ms']:.1f} ms, excess {report['excess_ms']:+.1f} ms ({flag})", style="bold"),
        overflow="fold")
    console.print(Text(f"where: {printable(report['where'])}    cause: {report['cause']}"), overflow="fold")
    if report.get("rank_chosen_as") == "straggler":
        console.print(Text(f"rank {report['rank']} shown: the others waited for it longest in this step "
                           "(--rank picks another)"))
    _render_who_waited(report, console)
    console.print(plain_paragraph(report["narrative"]), overflow="fold")
    console.print()

    rows = []
    for row in report["categories"]:
        diff = row["ms"] - row["typical_ms"]
        rows.append([row["category"], f"{row['ms']:.2f}", f"{row['typical_ms']:.2f}",
                     Text(f"{diff:+.2f}", style="red" if diff > 1 else "")])
    print_table(console, "Breakdown against the typical step (ms)", ["category", "this step", "typical", "difference"],
                rows, numeric={1, 2, 3})

    if report["ranges"]:
        rows = [[plain(middle(row["name"])), f"{row['ms']:.2f}", f"{row['typical_ms']:.2f}", f"{row['excess_ms']:+.2f}",
                 str(row["launches"]), f"{row['typical_launches']:.0f}",
                 "-" if row["lag_ms"] is None else f"{row['lag_ms']:.2f}"] for row in report["ranges"]]
        print_table(console, "Ranges that grew",
                    ["range", "this step ms", "typical ms", "excess ms", "launches", "typical", "GPU lag ms"], rows,
                    numeric={1, 2, 3, 4, 5, 6})

    if report["range_lag"]:
        lag = report["range_lag"]
        console.print(plain_paragraph(
            f"{lag['range']}: its first kernel started {lag['lag_ms']:.2f} ms after the range began "
            f"(range {lag['range_ms']:.2f} ms). On the CPU in that lag: "
            + ("; ".join(f"{g['ms']:.2f} ms {g['cause']} ({g['evidence'] or 'no evidence'})" for g in lag["cpu_in_lag"])
               or "no CPU gap")
        ), overflow="fold")

    kernels = report["kernels"]
    # Only the kernels that changed beyond the step-to-step noise (rows without the field:
    # every row, as before).
    changed = [row for row in kernels if row.get("beyond_noise", True)]
    if changed:
        rows = []
        for row in changed:
            name = middle(row["name"]) + (" (new)" if row["new"] else " (missing)" if row["missing"] else "")
            rows.append([plain(name), str(row["count"]), f"{row['typical_count']:.1f}", f"{row['ms']:.2f}",
                         f"{row['typical_ms']:.2f}", f"{row['excess_ms']:+.2f}",
                         "-" if row.get("noise_ms") is None else f"±{row['noise_ms']:.2f}"])
        print_table(console, "Kernels that changed beyond the step-to-step noise",
                    ["kernel", "count", "typical", "ms", "typical ms", "difference ms", "noise ms"], rows,
                    numeric={1, 2, 3, 4, 5, 6})
    elif kernels:
        console.print(Text("Kernels: none changed beyond the step-to-step noise of the typical steps.", style="dim"))
        console.print()

    if report["cpu_gaps"]:
        rows = [[f"{row['offset_ms']:.2f}", f"{row['ms']:.2f}", row["cause"],
                 plain(middle(f"{row['source']}: {row['evidence']}" if row["evidence"] else row["source"], 160)),
                 plain(middle(row["before"]))] for row in report["cpu_gaps"]]
        print_table(console, "Largest CPU gaps in this step", ["at ms", "ms", "cause", "evidence", "GPU work after it"],
                    rows, numeric={0, 1}, whole_words={2})


def _render_who_waited(report: dict, console: Console) -> None:
    """Multi-rank ``explain``: each collective of the step, who arrived when and who waited."""
    waits = report.get("waits") or []
    if not waits:
        return
    costly = [w for w in waits if w["max_wait_ms"] > 0]
    table = Table(title=f"Who waited for whom in step {report['step']} (ms after the first rank arrived)",
                  title_justify="left")
    for column in ("phase", "arrivals: rank +ms", "waited: rank ms", "last"):
        table.add_column(column, justify="right" if column == "last" else "left", no_wrap=column == "phase")
    shown = sorted(costly, key=lambda w: -w["max_wait_ms"])[:12]
    for w in (x for x in costly if x in shown):
        table.add_row(
            plain(w["phase"] or w["collective"]),
            ", ".join(f"{a['rank']} +{a['after_first_ms']:.3f}" for a in w["arrivals"][:8]),
            ", ".join(f"{a['rank']} {a['wait_ms']:.3f}" for a in w["arrivals"][:8] if a["wait_ms"] > 0) or "-",
            str(w["straggler"]),
        )
    table.caption = (f"{len(shown)} of {len(waits)} collectives of the step (largest waits), in the order they ran; "
                     "JSON has all, with transfer times")
    console.print(table)
    for w in [x for x in shown if x["why"]][:6]:
        console.print(plain_paragraph(
            f"{w['phase'] or w['collective']} ({w['collective']}): rank {w['straggler']} arrived last, "
            f"{w['max_wait_ms']:.3f} ms after the first; {w['why']}"))


def plain_paragraph(text: str) -> Text:
    """Untrusted text for a paragraph: never markup, never shortened, and on one line of its
    own (line breaks and control characters shown as U+FFFD, so no text can forge a line)."""
    return Text(printable(text))
