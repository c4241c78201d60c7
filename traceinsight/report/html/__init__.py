"""The HTML reports (``analyze --html FILE``, ``diff --html FILE``): self-contained pages that open offline.

Both pages share one shell (:func:`~.shell.page_shell`), the escaping, the sortable tables
and the category colors (:mod:`.shell`); :func:`~.analyze_page.render_html`
(:mod:`.analyze_page`) is the analysis report, :func:`~.diff_page.render_diff_html`
(:mod:`.diff_page`) the before/after comparison.

plotly.js is inlined once; every figure is a plotly.js figure built as plain data
(:mod:`.figure`), drawn by ``Plotly.newPlot`` from one JSON block. The page aggregates
(heatmaps instead of per-rank lines beyond :data:`~.analyze_page.LINE_RANKS` ranks, capped
tables, coalesced step timelines from :mod:`traceinsight.analysis.timeline`) so that a
64-rank, 1000-step job stays a few megabytes.

Every string that comes from a trace (kernel names, NVTX text, op names, evidence, paths) is
untrusted. In HTML it goes through :func:`html.escape`; in figures (plotly renders a few tags
in hover text and labels) it is escaped the same way, which plotly shows as literal text; the
figure JSON inside ``<script>`` has ``<``, ``>``, ``&``, U+2028 and U+2029 written as ``\\uXXXX``
escapes so that no data can close the script element. A Content-Security-Policy forbids any
network access, so the page cannot load anything even if a string slipped through.
"""

from traceinsight.report.html.analyze_page import MAX_CARDS  # noqa: F401 (the tests bound the cards by it)
from traceinsight.report.html.analyze_page import headline, render_html
from traceinsight.report.html.diff_page import VERDICT_COLORS, render_diff_html
from traceinsight.report.html.shell import CATEGORY_COLORS, esc, page_shell, script_json

__all__ = ["CATEGORY_COLORS", "VERDICT_COLORS", "render_html", "render_diff_html", "page_shell", "headline",
           "esc", "script_json"]
