"""The before/after comparison (``diff --html``): the verdict on the median step, both sides,
step time by category, the largest changes, ranges, kernels, new and vanished kernels,
launch counts and the rows per rank.

:func:`render_diff_html` assembles the sections in :func:`~.shell.page_shell`, with the
diff page's own style sheet added.
"""

from __future__ import annotations

from collections import Counter

from traceinsight._version import __version__
from traceinsight.analysis.categories import CATEGORIES
from traceinsight.report.html.figure import Figure, trace
from traceinsight.report.html.shell import CATEGORY_COLORS, MAX_TABLE_ROWS, Cell, _layout, _ms, _Page, _table, esc
from traceinsight.report.html.shell import num_cell, page_shell, text_cell

#: Colors of the verdicts, in the tables and in the figure of the largest changes (the tables
#: also mark them ▲/▼, so the verdict does not rest on color alone).
VERDICT_COLORS = {"slower": "#C0392B", "faster": "#1E8449", "unchanged": "#8A8A8A"}
#: Rows of the "largest changes" figure.
MAX_CHANGE_BARS = 20
#: Beyond this many ranks the category figure offers no per-rank views.
MAX_RANK_VIEWS = 16

_DIFF_CSS = """
.verdict-line{font-size:19px;margin:8px 0 4px}
.verdict-line .v{font-weight:700}
.v-slower{color:#C0392B;font-weight:600}
.v-faster{color:#1E8449;font-weight:600}
.v-unchanged{color:var(--muted)}
.v-slower::before{content:"\\25B2\\00A0"}
.v-faster::before{content:"\\25BC\\00A0"}
td.chg{background:#fff1c7;font-weight:600}
.tag{display:inline-block;font-size:10.5px;line-height:15px;padding:0 5px;border-radius:7px;margin-left:6px;
 border:1px solid #999;color:#333;vertical-align:1px;white-space:nowrap}
.tag.new{border-color:#4a4a4a;color:#1d1d1f;background:#f2f2f2}
.tag.vanished{border-style:dashed;color:#5f6368}
table.sides{cursor:default;min-width:0}
table.sides th{cursor:default;padding-right:8px}
table.sides th::after{content:""}
table.sides td{max-width:520px}
table.sortable td .v-slower,table.sortable td .v-faster,table.sortable td .v-unchanged{white-space:nowrap}
"""


def _diff_ms(value, places: int = 3) -> str:
    return "–" if value is None else f"{value:,.{places}f}"


def _delta_cell(value, places: int = 3) -> Cell:
    """A signed change; one that rounds to zero is shown as 0 (no "−0.000")."""
    if value is None:
        return Cell("–", float("-inf"), "num")
    text = f"{value:+,.{places}f}"
    if float(text.replace(",", "")) == 0:
        text = f"{0:.{places}f}"
    return Cell(esc(text), float(value), "num")


def _diff_pct(row: dict) -> Cell:
    pct = row.get("change_pct")
    if pct is None:
        after = row.get("after_ms") or 0
        return Cell("new", float("inf"), "num") if after > 0 else Cell("–", 0.0, "num")
    text = f"{pct:+,.1f}%"
    return Cell(esc("0.0%" if float(text[:-1].replace(",", "")) == 0 else text), float(pct), "num")


def _ordered(rows: list[dict]) -> list[dict]:
    """Changed rows first, then by the size of the change, then by the larger side's time."""
    return sorted(rows, key=lambda r: (r.get("verdict") == "unchanged", -abs(r.get("delta_ms") or 0),
                                       -max(r.get("before_ms") or 0, r.get("after_ms") or 0), str(r.get("name"))))


def _verdict_cell(verdict: str | None) -> Cell:
    verdict = verdict or "unchanged"
    return Cell(f'<span class="v-{esc(verdict)}">{esc(verdict)}</span>')


def _noise_cell(row: dict) -> Cell:
    noise = row.get("noise_ms")
    if noise is None:
        return Cell("–", float("-inf"), "num")
    text = f"±{noise:,.3f}"
    if row.get("noise_known"):
        return Cell(esc(text), float(noise), "num")
    return Cell(f'<span title="fewer than 3 steps on a side: the spread of so few steps says little">'
                f'{esc(text)}*</span>', float(noise), "num")


def _name_cell(row: dict, limit: int = 110) -> Cell:
    cell = text_cell(row.get("name"), limit)
    status = row.get("status")
    if status in ("new", "vanished"):
        cell.html += f'<span class="tag {status}">{status}</span>'
    return cell


def _diff_rows(rows: list[dict], *, rank: bool, counts: bool = False, category: bool = False) -> list[list[Cell]]:
    out = []
    for row in rows:
        cells = []
        if rank:
            cells.append(num_cell(row.get("rank"), "{:d}"))
        if category and row.get("name") in CATEGORY_COLORS:
            color = CATEGORY_COLORS[row["name"]]
            cells.append(Cell(f'<span class="dot" style="background:{color}"></span>{esc(row["name"])}'))
        elif category:
            cells.append(Cell(f"<b>{esc(row.get('name'))}</b> <span class=\"muted\">(whole step)</span>"))
        else:
            cells.append(_name_cell(row))
        cells += [num_cell(row.get("before_ms"), "{:,.3f}"), num_cell(row.get("after_ms"), "{:,.3f}"),
                  _delta_cell(row.get("delta_ms")), _diff_pct(row), _noise_cell(row)]
        if counts:
            changed = row.get("launches_changed")
            for key in ("count_before", "count_after"):
                cell = num_cell(row.get(key), "{:g}")
                if changed:
                    cell.cls += " chg"
                cells.append(cell)
        cells.append(_verdict_cell(row.get("verdict")))
        out.append(cells)
    return out


def _diff_table(rows: list[dict], *, what: str, rank: bool = False, counts: bool = False, category: bool = False,
                limit: int = MAX_TABLE_ROWS, note: str = "") -> str:
    headers = (["rank"] if rank else []) + [what, "before ms", "after ms", "Δ ms", "Δ %", "noise ms"]
    if counts:
        headers += ["launches before", "launches after"]
    headers.append("verdict")
    numeric = set(range(len(headers))) - {headers.index(what), len(headers) - 1}
    shown = rows[:limit]
    if any(not r.get("noise_known", True) for r in shown):
        note = (note + " " if note else "") + ("* Fewer than 3 steps on a side: the spread (MAD) of so few "
                                               "steps says little about the step-to-step noise.")
    if len(rows) > limit:
        note = (note + " " if note else "") + f"First {limit} of {len(rows)} shown (the JSON from --json has them all)."
    return _table(headers, _diff_rows(shown, rank=rank, counts=counts, category=category), numeric=numeric,
                  note=note)


def _spans(numbers: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0–2, 5``."""
    out: list[str] = []
    values = sorted(numbers)
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out.append(str(values[i]) if i == j else f"{values[i]}–{values[j]}")
        i = j + 1
    return ", ".join(out)


def _sources_html(sources: list[str]) -> str:
    if not sources:
        return '<span class="muted">unknown</span>'
    names = [str(s).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or str(s) for s in sources]
    shown = ", ".join(names[:3]) + (f" +{len(names) - 3} more" if len(names) > 3 else "")
    return f'<span title="{esc(chr(10).join(map(str, sources)), 4000)}">{esc(shown, 300)}</span>'


def _sides_table(data: dict, before_label: str, after_label: str) -> str:
    sides = [data.get("before") or {}, data.get("after") or {}]

    def steps_text(side: dict) -> str:
        steps = side.get("steps") or []
        if not steps:
            return "none"
        return f"{len(steps)} ({_spans(steps)})"

    def median_text(side: dict) -> str:
        median, mad = side.get("median_step_ms"), side.get("step_mad_ms")
        if median is None:
            return "–"
        return f"{_diff_ms(median)} ms" + ("" if mad is None else f" (MAD {_diff_ms(mad)} ms)")

    rows = [
        ("run", [f"<b>{esc(before_label, 120)}</b>", f"<b>{esc(after_label, 120)}</b>"]),
        ("files", [_sources_html(s.get("sources") or []) for s in sides]),
        ("ranks", [esc(_spans(s.get("ranks") or []) or "none") for s in sides]),
        ("GPUs", [esc(", ".join(s.get("gpus") or []) or "unknown") for s in sides]),
        ("steps compared", [esc(steps_text(s)) for s in sides]),
        ("steps from", [esc(s.get("step_source") or "?") for s in sides]),
        ("median step", [esc(median_text(s)) for s in sides]),
        ("GPU activities launched per step", [esc("–" if s.get("launches_per_step") is None
                                                  else f"{s['launches_per_step']:g}") for s in sides]),
    ]
    body = "".join(f"<tr><th>{esc(k)}</th><td>{b}</td><td>{a}</td></tr>" for k, (b, a) in rows)
    return (f'<div class="table-wrap"><table class="sides"><thead><tr><th></th><th>before</th><th>after</th></tr>'
            f"</thead><tbody>{body}</tbody></table></div>")


def _change_sentence(kind: str, row: dict) -> str:
    pct = row.get("change_pct")
    pct_text = "new" if pct is None else f"{pct:+.1f}%"
    return (f"{kind} {row.get('name')}: {_diff_ms(row.get('before_ms'))} → {_diff_ms(row.get('after_ms'))} ms "
            f"per step ({pct_text}), {row.get('verdict')}")


def _verdict_section(data: dict, before_label: str, after_label: str) -> str:
    summary = data.get("summary") or {}
    options = data.get("options") or {}
    overall = lambda key: [r for r in data.get(key) or [] if r.get("rank") is None]  # noqa: E731
    step = next((r for r in overall("categories") if r.get("name") == "step"), None)
    if summary.get("median_step_ms_before") is None or step is None:
        line = '<p class="verdict-line">No step window to compare.</p>'
    else:
        verdict = summary.get("step_verdict") or "unchanged"
        pct = summary.get("step_change_pct")
        noise = step.get("noise_ms")
        noise_text = ""
        if noise is not None:
            few = "" if step.get("noise_known") else "; uncertain with fewer than 3 steps a side"
            counts = (f", the spread of the two medians, from {summary['steps_before']} + "
                      f"{summary['steps_after']} steps" if summary.get("steps_before") is not None else "")
            noise_text = f' <span class="muted">(noise ±{esc(_ms(noise))} ms{esc(counts)}{few})</span>'
        line = (f'<p class="verdict-line">median step {esc(_ms(summary["median_step_ms_before"]))} → '
                f'{esc(_ms(summary["median_step_ms_after"]))} ms '
                f'({esc("n/a" if pct is None else f"{pct:+.1f}%")}), '
                f'<span class="v v-{esc(verdict)}">{esc(verdict)}</span>{noise_text}</p>')
    # The same sentences as the terminal prints (counts over ranks and per rank, then the
    # largest per-rank category changes, which the mean over ranks can hide).
    sentences = [line.replace(" -> ", " → ") + "." for line in summary.get("step_change_lines") or []]
    new, vanished, launches = (summary.get("new_kernels", 0), summary.get("vanished_kernels", 0),
                               summary.get("launch_count_changes", 0))
    if new or vanished or launches:
        sentences.append(f"{new} new kernel(s), {vanished} vanished; {launches} kernel(s) changed their launch "
                         "count per step.")
    launches_b = (data.get("before") or {}).get("launches_per_step")
    launches_a = (data.get("after") or {}).get("launches_per_step")
    if launches_b is not None and launches_a is not None and launches_b != launches_a:
        sentences.append(f"GPU activities launched per step: {launches_b:g} → {launches_a:g}.")
    changed = []
    for kind, key in (("category", "categories"), ("range", "ranges"), ("kernel", "kernels")):
        rows = [r for r in overall(key) if r.get("verdict") != "unchanged" and r.get("name") != "step"]
        changed += [(abs(r.get("delta_ms") or 0), kind, r) for r in rows[:4]]
    changed.sort(key=lambda item: -item[0])
    sentences += [_change_sentence(kind, row) + "." for _, kind, row in changed[:6]]
    if not summary.get("changed"):
        sentences.append("No change beyond the step-to-step noise.")
    items = "".join(f"<li>{esc(s, 600)}</li>" for s in sentences)
    rule = (f"A row counts as changed when its Δ exceeds the noise column: {options.get('k', 3):g} × the spread of "
            "the two medians (each median's standard error, 1.86 × MAD / √steps, combined), "
            f"is at least {options.get('min_relative', 0.05) * 100:g}% of the before value and "
            f"at least {(options.get('min_abs_ns') or 0) / 1e3:g} µs per step. Times are medians over each side's "
            "steps of the time per step (ms); rows without a rank are the mean over ranks.")
    return (f'<section id="verdict"><h2>Verdict</h2>{line}{_sides_table(data, before_label, after_label)}'
            f'<h3>What changed</h3><ol class="headlines">{items}</ol><p class="note">{esc(rule, 800)}</p></section>')


def _category_values(rows: list[dict], rank) -> dict[str, dict]:
    return {r["name"]: r for r in rows if r.get("rank") == rank and r.get("name") in CATEGORY_COLORS}


def _category_figure(data: dict, page: _Page, before_label: str, after_label: str) -> str:
    rows = data.get("categories") or []
    ranks = sorted({r["rank"] for r in rows if r.get("rank") is not None})
    views = [("mean of ranks" if ranks else "all", None)]
    if len(ranks) <= MAX_RANK_VIEWS:
        views += [(f"rank {rank}", rank) for rank in ranks]
    before_name, after_name = f"before: {esc(before_label, 60)}", f"after: {esc(after_label, 60)}"

    def arrays(rank) -> dict:
        values = _category_values(rows, rank)
        out = {"before": [], "after": [], "text": [], "text_color": [], "hb": [], "ha": []}
        for c in CATEGORIES:
            r = values.get(c) or {}
            b, a = r.get("before_ms"), r.get("after_ms")
            out["before"].append(None if b is None else round(b, 4))
            out["after"].append(None if a is None else round(a, 4))
            verdict = r.get("verdict") or "unchanged"
            pct = r.get("change_pct")
            mark = {"slower": " ▲", "faster": " ▼"}.get(verdict, "")
            out["text"].append(("new" if (a or 0) > 0 else "") if pct is None else f"{pct:+.0f}%{mark}")
            out["text_color"].append(VERDICT_COLORS[verdict] if verdict in VERDICT_COLORS else "#555")
            noise = r.get("noise_ms")
            tail = f"<br>Δ {_diff_ms(r.get('delta_ms'))} ms (noise ±{_diff_ms(noise)} ms): {verdict}"
            mad_b, mad_a = _diff_ms(r.get("before_mad_ms")), _diff_ms(r.get("after_mad_ms"))
            out["hb"].append(f"{c}<br>{before_name}<br>{_diff_ms(b)} ms per step (MAD {mad_b}){tail}")
            out["ha"].append(f"{c}<br>{after_name}<br>{_diff_ms(a)} ms per step (MAD {mad_a}){tail}")
        return out

    data_views = [arrays(rank) for _, rank in views]
    first = data_views[0]
    colors = [CATEGORY_COLORS[c] for c in CATEGORIES]
    fig = Figure()
    fig.add_trace(trace("bar",
        x=list(CATEGORIES), y=first["before"], name=before_name, legendgroup="before", showlegend=False,
        marker=dict(color=colors, opacity=0.38, line=dict(color=colors, width=1.5)),
        hovertext=first["hb"], hoverinfo="text", offsetgroup="before",
    ))
    fig.add_trace(trace("bar",
        x=list(CATEGORIES), y=first["after"], name=after_name, legendgroup="after", showlegend=False,
        marker=dict(color=colors, line=dict(color=colors, width=1.5)),
        text=first["text"], textposition="outside", cliponaxis=False,
        textfont=dict(color=first["text_color"], size=11),
        hovertext=first["ha"], hoverinfo="text", offsetgroup="after",
    ))
    # Legend entries in grey: each side's bars take the color of their category.
    fig.add_trace(trace("bar", x=[None], y=[None], name=before_name, legendgroup="before", hoverinfo="skip",
                         marker=dict(color="rgba(120,120,120,0.38)", line=dict(color="#777", width=1.5))))
    fig.add_trace(trace("bar", x=[None], y=[None], name=after_name, legendgroup="after", hoverinfo="skip",
                         marker=dict(color="#777", line=dict(color="#777", width=1.5))))
    menus = []
    if len(views) > 1:
        menus = [dict(
            type="dropdown", direction="down", x=1, xanchor="right", y=1.02, yanchor="bottom", showactive=True,
            bgcolor="#f4f4f4", bordercolor="#999",
            buttons=[dict(label=label, method="restyle",
                          args=[{"y": [d["before"], d["after"]], "text": [None, d["text"]],
                                 "textfont.color": [None, d["text_color"]], "hovertext": [d["hb"], d["ha"]]}, [0, 1]])
                     for (label, _), d in zip(views, data_views)],
        )]
    _layout(fig, barmode="group", bargap=0.25, bargroupgap=0.06, hovermode="closest", updatemenus=menus or None,
            legend=dict(orientation="h", y=1.02, yanchor="bottom", x=0, traceorder="normal"),
            margin=dict(l=70, r=20, t=80 if menus else 50, b=60))
    fig.update_xaxes(title_text="step-time category", showgrid=False)
    fig.update_yaxes(title_text="median time per step (ms)", rangemode="tozero")
    note = ("Median time per step of each category, before (light) and after (solid); the label over each after bar "
            "is the change, ▲ slower / ▼ faster where it exceeds the noise.")
    if len(views) > 1:
        note += " The menu at the top right shows one rank."
    elif len(ranks) > MAX_RANK_VIEWS:
        note += f" {len(ranks)} ranks: the per-rank values are in the per-rank table below."
    return f'<p class="note">{note}</p>{page.figure(fig, height=420)}'


def _categories_section(data: dict, page: _Page, before_label: str, after_label: str) -> str:
    rows = [r for r in data.get("categories") or [] if r.get("rank") is None]
    if not rows:
        return '<section id="categories"><h2>Step time by category</h2><p class="note">No steps.</p></section>'
    table = _diff_table(rows, what="category", category=True,
                        note="The categories of the step window sum to its duration (the “step” row).")
    return (f'<section id="categories"><h2>Step time by category</h2>'
            f"{_category_figure(data, page, before_label, after_label)}{table}</section>")


def _changes_figure(data: dict, page: _Page) -> str:
    changed = []
    for kind, key in (("range", "ranges"), ("kernel", "kernels")):
        changed += [(kind, r) for r in data.get(key) or []
                    if r.get("rank") is None and r.get("verdict") != "unchanged" and r.get("delta_ms") is not None]
    if not changed:
        return ""
    changed.sort(key=lambda item: -abs(item[1]["delta_ms"]))
    changed = changed[:MAX_CHANGE_BARS]
    labels, hover, deltas, colors = [], [], [], []
    for kind, r in changed:
        status = r.get("status")
        suffix = f" ({status})" if status in ("new", "vanished") else ""
        labels.append(esc(f"{kind} · {r['name']}", 56) + suffix)
        pct = r.get("change_pct")
        hover.append(f"{kind}: {esc(r['name'], 160)}{suffix}<br>{_diff_ms(r.get('before_ms'))} → "
                     f"{_diff_ms(r.get('after_ms'))} ms per step ({'new' if pct is None else f'{pct:+.1f}%'})"
                     f"<br>Δ {r['delta_ms']:+,.3f} ms, noise ±{_diff_ms(r.get('noise_ms'))} ms: {r['verdict']}")
        deltas.append(round(r["delta_ms"], 4))
        colors.append(VERDICT_COLORS.get(r["verdict"], "#888"))
    fig = Figure().add_trace(trace(
        "bar", y=list(range(len(changed))), x=deltas, orientation="h", marker=dict(color=colors, line=dict(width=0)),
        hovertext=hover, hoverinfo="text", showlegend=False,
    ))
    _layout(fig, hovermode="closest", margin=dict(l=20, r=30, t=36, b=50), bargap=0.25)  # t: room for the modebar
    fig.update_xaxes(title_text="Δ median time per step (ms)", zeroline=True, zerolinecolor="#555", zerolinewidth=1)
    fig.update_yaxes(tickvals=list(range(len(changed))), ticktext=labels, autorange="reversed", showgrid=False,
                     automargin=True)
    return (f'<section id="changes"><h2>Largest changes</h2><p class="note">The {len(changed)} ranges and kernels '
            f"whose time per step changed most beyond the noise (mean over ranks): red slower, green faster.</p>"
            f"{page.figure(fig, height=106 + 26 * len(changed))}</section>")


def _count_summary(rows: list[dict]) -> str:
    counts = Counter(r.get("verdict") for r in rows)
    return (f"{len(rows)} compared: {counts.get('slower', 0)} slower, {counts.get('faster', 0)} faster, "
            f"{counts.get('unchanged', 0)} unchanged; changed rows first, then by the size of the change and of "
            "the time.")


def _ranges_section(data: dict) -> str:
    rows = _ordered([r for r in data.get("ranges") or [] if r.get("rank") is None])
    if not rows:
        return ('<section id="ranges"><h2>Ranges</h2><p class="note">No annotation ranges (NVTX / record_function) '
                "in the compared steps.</p></section>")
    return (f'<section id="ranges"><h2>Ranges (NVTX / record_function)</h2><p class="note">Summed CPU-side duration '
            f"of each range's instances per step. {_count_summary(rows)}</p>"
            f"{_diff_table(rows, what='range')}</section>")


def _kernels_section(data: dict) -> str:
    rows = _ordered([r for r in data.get("kernels") or [] if r.get("rank") is None])
    if not rows:
        return '<section id="kernels"><h2>Kernels</h2><p class="note">No kernels in the compared steps.</p></section>'
    return (f'<section id="kernels"><h2>Kernels</h2><p class="note">Summed GPU time of each kernel launched in a step, '
            f"and its launches per step (highlighted where the count changed beyond its own spread). "
            f"{_count_summary(rows)}</p>{_diff_table(rows, what='kernel', counts=True)}</section>")


def _new_vanished_section(data: dict) -> str:
    parts = []
    for key, title, side in (("new_kernels", "New kernels (after only)", "after"),
                             ("vanished_kernels", "Vanished kernels (before only)", "before")):
        # Means per step: a kernel launched in a few of the steps has a median of 0.
        mean = lambda r: r.get(f"mean_{side}_ms", r.get(f"{side}_ms"))  # noqa: E731
        rows = sorted(data.get(key) or [], key=lambda r: -(mean(r) or 0))
        if not rows:
            parts.append(f'<h3>{title}</h3><p class="note">None.</p>')
            continue
        cells = [[text_cell(r.get("name"), 140), num_cell(mean(r), "{:,.3f}"),
                  num_cell(r.get(f"mean_count_{side}", r.get(f"count_{side}")), "{:.2f}")] for r in rows[:MAX_TABLE_ROWS]]
        note = f"First {MAX_TABLE_ROWS} of {len(rows)} shown." if len(rows) > MAX_TABLE_ROWS else ""
        parts.append(f"<h3>{title}: {len(rows)}</h3>" + _table(
            ["kernel", f"{side} ms per step (mean)", f"launches per step ({side}, mean)"], cells, numeric={1, 2},
            note=note))
    return (f'<section id="new-vanished"><h2>New and vanished kernels</h2><p class="note">Kernels launched on one '
            f"side only (mean over ranks), largest first.</p>{''.join(parts)}</section>")


def _launches_section(data: dict) -> str:
    rows = [r for r in data.get("kernels") or [] if r.get("rank") is None and r.get("launches_changed")]
    if not rows:
        return ('<section id="launches"><h2>Changed launch counts</h2><p class="note">No kernel changed its launch '
                "count per step.</p></section>")
    rows.sort(key=lambda r: -abs((r.get("count_after") or 0) - (r.get("count_before") or 0)))
    cells = []
    for r in rows[:MAX_TABLE_ROWS]:
        b, a = r.get("count_before") or 0, r.get("count_after") or 0
        cells.append([_name_cell(r), num_cell(b, "{:g}"), num_cell(a, "{:g}"), num_cell(a - b, "{:+g}"),
                      _delta_cell(r.get("delta_ms")), _verdict_cell(r.get("verdict"))])
    note = f"First {MAX_TABLE_ROWS} of {len(rows)} shown." if len(rows) > MAX_TABLE_ROWS else ""
    return (f'<section id="launches"><h2>Changed launch counts</h2><p class="note">{len(rows)} kernel(s) launched a '
            f"different number of times per step (median over steps, mean over ranks), largest change first. "
            f"A different count often means a different code path: another GEMM tiling, a retried or split "
            f"operation, a fallback.</p>"
            + _table(["kernel", "launches before", "launches after", "Δ launches", "Δ time ms", "time verdict"],
                     cells, numeric={1, 2, 3, 4}, note=note) + "</section>")


def _per_rank_section(data: dict) -> str:
    categories = [r for r in data.get("categories") or [] if r.get("rank") is not None]
    if not categories:
        return ""
    ranks = sorted({r["rank"] for r in categories})
    parts = [f'<section id="per-rank"><h2>Per rank</h2><p class="note">Both sides have ranks {esc(_spans(ranks))}: '
             "every row compared per rank too, so a change on one rank (a straggler) is not averaged away.</p>",
             "<h3>Step time by category, per rank</h3>",
             _diff_table(categories, what="category", rank=True, category=True, limit=MAX_TABLE_ROWS * 2)]
    for key, title, counts in (("ranges", "Ranges that changed, per rank", False),
                               ("kernels", "Kernels that changed, per rank", True)):
        rows = [r for r in data.get(key) or [] if r.get("rank") is not None and r.get("verdict") != "unchanged"]
        parts.append(f"<h3>{title}</h3>")
        if rows:
            parts.append(_diff_table(_ordered(rows), what=key[:-1], rank=True, counts=counts))
        else:
            parts.append('<p class="note">None beyond the noise on any rank.</p>')
    parts.append("</section>")
    return "".join(parts)


def render_diff_html(diff, *, before_label: str = "before", after_label: str = "after",
                     as_bytes: bool = False) -> str | bytes:
    """The before/after comparison as one self-contained HTML page (``traceinsight diff --html``).

    Same page shell, escaping, sortable tables and category colors as :func:`render_html`:
    the verdict on the median step, both sides, a figure of the median time per step of each
    category before and after, the largest changes, tables of categories, ranges and kernels
    (Δ, Δ %, noise, verdict), new and vanished kernels, changed launch counts and, where both
    sides have the same ranks, the rows per rank.

    Parameters
    ----------
    diff
        A :class:`~traceinsight.analysis.diff.FindingsDiff`, or its
        :func:`~traceinsight.analysis.diff.diff_to_dict` form.
    before_label, after_label
        What each side is (file names, step ranges); untrusted text, escaped.
    as_bytes
        Return the page encoded as UTF-8, ready to write (faster than encoding the text).

    Examples
    --------
    >>> page = render_diff_html(diff_findings(a, b), before_label="run 1", after_label="run 2")  # doctest: +SKIP
    """
    from traceinsight.analysis.diff import FindingsDiff, diff_to_dict

    data = diff_to_dict(diff, max_rows=None) if isinstance(diff, FindingsDiff) else diff
    before_label = str(before_label or "before")
    after_label = str(after_label or "after")
    page = _Page()
    per_rank = _per_rank_section(data)
    sections = [
        _verdict_section(data, before_label, after_label),
        _categories_section(data, page, before_label, after_label),
        _changes_figure(data, page),
        _ranges_section(data),
        _kernels_section(data),
        _new_vanished_section(data),
        _launches_section(data),
        per_rank,
    ]
    nav = [("verdict", "Verdict"), ("categories", "Categories")]
    if sections[2]:
        nav.append(("changes", "Largest changes"))
    nav += [("ranges", "Ranges"), ("kernels", "Kernels"), ("new-vanished", "New & vanished"),
            ("launches", "Launch counts")]
    if per_rank:
        nav.append(("per-rank", "Per rank"))
    before, after = data.get("before") or {}, data.get("after") or {}
    summary = data.get("summary") or {}

    def side_text(side: dict) -> str:
        return f"{len(side.get('steps') or [])} step(s) of {len(side.get('ranks') or [])} rank(s)"

    verdict = summary.get("step_verdict")
    subtitle = (f"before: {esc(side_text(before))} · after: {esc(side_text(after))}"
                + (f" · median step {esc(verdict)}" if verdict else "")
                + f" · traceinsight {esc(__version__)}")
    title = f"traceinsight diff: {before_label[:80]} → {after_label[:80]}"
    return page_shell(page, title=title, subtitle=subtitle, nav=nav, sections=sections, css=_DIFF_CSS,
                      footer="times in milliseconds (ms) per step, medians over each side's steps",
                      as_bytes=as_bytes)
