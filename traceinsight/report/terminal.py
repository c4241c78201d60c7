"""The terminal summary of ``analyze`` and ``info`` (rich tables).

Every string from a trace goes through :func:`plain`, so a kernel named ``[bold]x`` prints
literally instead of being read as markup.
"""

from __future__ import annotations

import polars as pl
from rich.console import Console
from rich.table import Table
from rich.text import Text

from traceinsight.analysis.breakdown import CATEGORIES
from traceinsight.analysis.pipeline import Findings
from traceinsight.errors import printable

MAX_STEP_ROWS = 60


def plain(value) -> Text:
    """Untrusted text as a rich ``Text`` (never parsed as markup, control characters and
    line breaks shown as U+FFFD), shortened for a table cell."""
    text = printable(value)
    if len(text) > 90:
        text = text[:87] + "..."
    return Text(text)


def _ms(ns: int | float | None) -> str:
    return "-" if ns is None else f"{ns / 1e6:,.2f}"


def render_findings(findings: Findings, console: Console, *, show_host: bool = False) -> None:
    """Print the summary of ``findings``: ranks, steps with breakdown, gaps, ranges, kernels."""
    steps = findings.steps.sort("rank", "step")
    ranks = findings.ranks.sort("rank")
    console.print(Text(
        f"traceinsight: {ranks.height} rank(s), {steps.height} step(s) "
        f"({findings.step_source}), steps per rank {steps.group_by('rank').len().get_column('len').max() or 0}",
        style="bold",
    ))
    rank_table = Table(title="Ranks", title_justify="left")
    for column in ("rank", "from", "format", "GPU", "source", "clock offset (µs)"):
        rank_table.add_column(column)
    for row in ranks.iter_rows(named=True):
        rank_table.add_row(
            str(row["rank"]), plain(row["rank_source"]), plain(row["format"]),
            plain(", ".join(row["gpu_names"] or []) or "?"), plain(row["source"]),
            f"{row['clock_offset_ns'] / 1e3:,.1f}",
        )
    console.print(rank_table)

    step_table = Table(title="Steps: where the time went (ms)", title_justify="left")
    step_table.add_column("rank", justify="right")
    step_table.add_column("step", justify="right")
    step_table.add_column("total", justify="right")
    for name in CATEGORIES:
        step_table.add_column(name.replace("_", " "), justify="right")
    step_table.add_column("", justify="left")
    shown = steps
    if steps.height > MAX_STEP_ROWS:
        shown = steps.filter(pl.col("anomalous")).head(MAX_STEP_ROWS)
    for row in shown.iter_rows(named=True):
        step_table.add_row(
            str(row["rank"]), str(row["step"]), _ms(row["duration_ns"]),
            *[_ms(row[f"{name}_ns"]) for name in CATEGORIES],
            Text("anomalous", style="bold red") if row["anomalous"] else Text(""),
        )
    if steps.height > MAX_STEP_ROWS:
        step_table.caption = f"{shown.height} anomalous of {steps.height} steps shown"
    console.print(step_table)

    if findings.anomalies:
        anomaly_table = Table(title="Anomalies", title_justify="left")
        for column in ("rank", "step", "kind", "excess ms", "where", "cause"):
            anomaly_table.add_column(column, justify="right" if column in ("rank", "step", "excess ms") else "left")
        for anomaly in findings.anomalies[:20]:
            anomaly_table.add_row(str(anomaly["rank"]), str(anomaly["step"]), anomaly["kind"],
                                  f"{anomaly['excess_ms']:+.1f}", plain(anomaly["where"]), anomaly["cause"])
        console.print(anomaly_table)
        for anomaly in findings.anomalies[:5]:
            console.print(Text(f"rank {anomaly['rank']} step {anomaly['step']}: ", style="bold").append(
                plain_paragraph(anomaly["evidence"])))

    _render_waits(findings, console)
    _render_imbalance(findings, console)

    causes = findings.cpu_gaps
    if causes.height:
        cause_table = Table(title="CPU gaps: what the host did while the GPU waited", title_justify="left")
        for column in ("cause", "total ms", "gaps", "largest gap (ms)", "evidence of the largest"):
            cause_table.add_column(column)
        summary = (
            causes.sort("duration_ns", descending=True)
            .group_by("cause", maintain_order=True)
            .agg(total=pl.col("duration_ns").sum(), n=pl.len(), largest=pl.col("duration_ns").first(),
                 evidence=pl.col("evidence").first(), where=pl.col("next_name").first())
            .sort("total", descending=True)
        )
        for row in summary.iter_rows(named=True):
            cause_table.add_row(row["cause"], _ms(row["total"]), str(row["n"]), _ms(row["largest"]),
                                plain(row["evidence"]))
        console.print(cause_table)

    if findings.ranges.height:
        range_table = Table(title="Ranges (top by total time)", title_justify="left")
        for column in ("rank", "range", "count", "p50 ms", "p99 ms", "max ms", "lag p50 ms", "lag max ms"):
            range_table.add_column(column, justify="right" if column not in ("range",) else "left")
        for row in findings.ranges.head(12).iter_rows(named=True):
            range_table.add_row(
                str(row["rank"]), plain(row["name"]), str(row["count"]),
                f"{row['p50_ms']:.3f}", f"{row['p99_ms']:.3f}", f"{row['max_ms']:.3f}",
                "-" if row["lag_p50_ms"] is None else f"{row['lag_p50_ms']:.3f}",
                "-" if row["lag_max_ms"] is None else f"{row['lag_max_ms']:.3f}",
            )
        console.print(range_table)

    if findings.top_kernels.height:
        kernel_table = Table(title="Top kernels", title_justify="left")
        for column in ("rank", "kernel", "count", "total ms", "mean µs", "share"):
            kernel_table.add_column(column, justify="left" if column == "kernel" else "right")
        for row in findings.top_kernels.group_by("rank", maintain_order=True).head(6).iter_rows(named=True):
            kernel_table.add_row(str(row["rank"]), plain(row["name"]), str(row["count"]),
                                 f"{row['total_ms']:.2f}", f"{row['mean_us']:.1f}", f"{row['share']:.1%}")
        console.print(kernel_table)

    for warning in findings.warnings:
        console.print(Text(f"note: {printable(warning)}", style="yellow"))


def _render_waits(findings: Findings, console: Console) -> None:
    """Multi-rank: alignment, a rank x step table of waiting, stragglers, worst phases."""
    _render_alignment(findings, console)
    if not findings.waits:
        return
    import polars as pl

    waits = pl.DataFrame(findings.waits)
    per = waits.group_by("step", "rank").agg(ms=pl.col("wait_ms").sum())
    ranks = sorted(per.get_column("rank").unique().to_list())
    steps = sorted(per.get_column("step").drop_nulls().unique().to_list())
    blame = (
        waits.group_by("step", "waiting_for_rank").agg(ms=pl.col("wait_ms").sum())
        .sort(["step", "ms"], descending=[False, True]).unique("step", keep="first", maintain_order=True)
    )
    straggler = {r["step"]: r["waiting_for_rank"] for r in blame.iter_rows(named=True)}
    table = Table(title="Cross-rank waiting per step (ms)", title_justify="left")
    table.add_column("step", justify="right")
    shown_ranks = ranks[:16]
    for rank in shown_ranks:
        table.add_column(f"rank {rank}", justify="right")
    table.add_column("straggler", justify="right")
    lookup = {(r["step"], r["rank"]): r["ms"] for r in per.iter_rows(named=True)}
    worst_steps = sorted(steps, key=lambda s: -sum(lookup.get((s, r), 0) for r in ranks))[:MAX_STEP_ROWS]
    for step in sorted(worst_steps):
        table.add_row(str(step), *[f"{lookup.get((step, r), 0):.2f}" for r in shown_ranks], str(straggler.get(step, "-")))
    if len(ranks) > len(shown_ranks) or len(steps) > len(worst_steps):
        table.caption = f"{len(worst_steps)} of {len(steps)} steps, {len(shown_ranks)} of {len(ranks)} ranks shown (JSON has all)"
    console.print(table)
    phases = (
        waits.group_by("phase").agg(ms=pl.col("wait_ms").sum(), n=pl.len(), worst=pl.col("wait_ms").max())
        .sort("ms", descending=True).head(8)
    )
    phase_table = Table(title="Where ranks waited (phases)", title_justify="left")
    for column in ("phase", "total wait ms", "waits", "largest ms"):
        phase_table.add_column(column, justify="left" if column == "phase" else "right")
    for row in phases.iter_rows(named=True):
        phase_table.add_row(plain(row["phase"]), f"{row['ms']:.2f}", str(row["n"]), f"{row['worst']:.2f}")
    console.print(phase_table)
    for reason in sorted(findings.stragglers, key=lambda r: -r["max_wait_ms"])[:3]:
        console.print(Text(
            f"step {reason['step']}: rank {reason['straggler']} arrived {reason['max_wait_ms']:.2f} ms late at "
            f"{reason['phase'] or reason['collective']}; before it, its {reason['reason']} exceeded the others' "
            f"by {reason['reason_excess_ms']:.2f} ms"
            + (f"; tokens sent per rank (payload all-to-all) {reason['rows_sent']}" if reason.get("rows_sent") else "")
        ))


MAX_ALIGNMENT_ROWS = 16
MAX_IMBALANCE_ROWS = 8


def _render_imbalance(findings: Findings, console: Console) -> None:
    """Multi-rank MoE: what balanced load would save, the steps that would save most first,
    with the phase that would save most and the token payload behind dispatch and combine."""
    entries = [e for e in findings.imbalance or [] if e.get("modeled_ms") is not None]
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
        table.add_column(style="dim")
        table.add_column()
        steps = info["steps"]
        step_text = (
            f"{steps['count']} ({', '.join(steps['labels'])} ...)" if steps["count"] else "none found"
        )
        counts = ", ".join(f"{k} {v:,}" for k, v in info["counts"].items() if v)
        table.add_row("format", plain(f"{info['format']} {info['tool_version'] or ''}".strip()))
        table.add_row("ranks", plain(", ".join(str(r) for r in info["ranks"]) or "none"))
        table.add_row("GPUs", plain(", ".join(info["gpus"]) or "none"))
        table.add_row("span", f"{info['span_ms']:,.1f} ms")
        table.add_row("events", plain(counts or "none"))
        table.add_row("CPU samples", f"{info['samples']:,}")
        table.add_row("steps", plain(step_text))
        for kernel in info["top_kernels"][:5]:
            table.add_row("top kernel", plain(f"{kernel['name']}  {kernel['total_ms']:.2f} ms "
                                              f"({kernel['share']:.0%}, {kernel['count']}x)"))
        for warning in info["warnings"]:
            table.add_row("note", plain_paragraph(warning))
        console.print(table)
        console.print()


def render_postmortem(report: dict, console: Console) -> None:
    """Print ``traceinsight explain``: narrative, then where this step differs from typical."""
    flag = "anomalous" if report["anomalous"] else "not flagged as anomalous"
    console.print(Text(
        f"Step {report['step']} on rank {report['rank']} ({report['label']}): {report['duration_ms']:.1f} ms, "
        f"typical {report['typical_ms']:.1f} ms, excess {report['excess_ms']:+.1f} ms ({flag})", style="bold"))
    console.print(Text(f"where: {printable(report['where'])}    cause: {report['cause']}"))
    if report.get("rank_chosen_as") == "straggler":
        console.print(Text(f"rank {report['rank']} shown: the others waited for it longest in this step "
                           "(--rank picks another)"))
    _render_who_waited(report, console)
    console.print(plain_paragraph(report["narrative"]))

    table = Table(title="Breakdown against the typical step (ms)", title_justify="left")
    for column in ("category", "this step", "typical", "difference"):
        table.add_column(column, justify="left" if column == "category" else "right")
    for row in report["categories"]:
        diff = row["ms"] - row["typical_ms"]
        table.add_row(row["category"], f"{row['ms']:.2f}", f"{row['typical_ms']:.2f}",
                      Text(f"{diff:+.2f}", style="red" if diff > 1 else ""))
    console.print(table)

    if report["ranges"]:
        table = Table(title="Ranges that grew", title_justify="left")
        for column in ("range", "this step ms", "typical ms", "excess ms", "launches", "typical", "GPU lag ms"):
            table.add_column(column, justify="left" if column == "range" else "right")
        for row in report["ranges"]:
            table.add_row(plain(row["name"]), f"{row['ms']:.2f}", f"{row['typical_ms']:.2f}", f"{row['excess_ms']:+.2f}",
                          str(row["launches"]), f"{row['typical_launches']:.0f}",
                          "-" if row["lag_ms"] is None else f"{row['lag_ms']:.2f}")
        console.print(table)

    if report["range_lag"]:
        lag = report["range_lag"]
        console.print(plain_paragraph(
            f"{lag['range']}: its first kernel started {lag['lag_ms']:.2f} ms after the range began "
            f"(range {lag['range_ms']:.2f} ms). On the CPU in that lag: "
            + ("; ".join(f"{g['ms']:.2f} ms {g['cause']} ({g['evidence'] or 'no evidence'})" for g in lag["cpu_in_lag"])
               or "no CPU gap")
        ))

    if report["kernels"]:
        table = Table(title="Kernels against the typical step", title_justify="left")
        for column in ("kernel", "count", "typical", "ms", "typical ms", "difference ms"):
            table.add_column(column, justify="left" if column == "kernel" else "right")
        for row in report["kernels"]:
            name = row["name"] + (" (new)" if row["new"] else " (missing)" if row["missing"] else "")
            table.add_row(plain(name), str(row["count"]), f"{row['typical_count']:.1f}", f"{row['ms']:.2f}",
                          f"{row['typical_ms']:.2f}", f"{row['excess_ms']:+.2f}")
        console.print(table)

    if report["cpu_gaps"]:
        table = Table(title="Largest CPU gaps in this step", title_justify="left")
        for column in ("at ms", "ms", "cause", "evidence", "GPU work after it"):
            table.add_column(column, justify="right" if column in ("at ms", "ms") else "left")
        for row in report["cpu_gaps"]:
            table.add_row(f"{row['offset_ms']:.2f}", f"{row['ms']:.2f}", row["cause"],
                          plain(f"{row['source']}: {row['evidence']}" if row["evidence"] else row["source"]),
                          plain(row["before"]))
        console.print(table)


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
