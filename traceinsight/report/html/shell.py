"""What both HTML pages share: the page shell, escaping, sortable tables, number formats,
the category colors and the plotly layout.

:func:`page_shell` wraps a page's sections in one self-contained document: the style sheet,
the policy that forbids network access, plotly.js inlined once, the figures collected by a
:class:`_Page` as one JSON block, the script that sorts tables and draws the figures, and the
test hooks. :func:`esc` and :func:`script_json` are the only ways trace strings reach the
page; :class:`Cell` and :func:`_table` make the sortable tables.
"""

from __future__ import annotations

import html
import json

import numpy as np

from traceinsight.analysis.categories import CATEGORIES
from traceinsight.report.html.figure import Figure, figure_json, plotly_js

#: One color per breakdown category, in every figure (colour-blind safe, print safe).
CATEGORY_COLORS = {
    "gpu_compute": "#0072B2",
    "gpu_memory": "#56B4E9",
    "communication": "#009E73",
    "cross_rank_wait": "#CC79A7",
    "host_sync": "#E69F00",
    "cpu_gap": "#D55E00",
    "idle": "#B8B8B8",
}
#: Tables show at most this many rows.
MAX_TABLE_ROWS = 100
#: Longest name shown in a table cell or a tooltip.
MAX_TEXT = 200

_FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, sans-serif"
# No template: plotly.js draws none by default (plotly.py's default "plotly" template is its own).
_BASE_LAYOUT = dict(
    font=dict(family=_FONT, size=12, color="#222"),
    paper_bgcolor="#ffffff",
    plot_bgcolor="#ffffff",
    margin=dict(l=70, r=20, t=40, b=50),
    hoverlabel=dict(bgcolor="#ffffff", font=dict(family=_FONT, size=12, color="#111"), align="left"),
)
_AXIS = dict(showgrid=True, gridcolor="#e6e6e6", zeroline=False, linecolor="#999", showline=True,
             ticks="outside", tickcolor="#999")


# ----------------------------------------------------------------------------- escaping

def esc(value, limit: int | None = MAX_TEXT) -> str:
    """Untrusted text for HTML (and for plotly labels and hover text), shortened to ``limit``."""
    text = "" if value is None else str(value)
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return html.escape(text, quote=True)


def script_json(text: str) -> str:
    """JSON text made safe inside ``<script>``: no ``<``, ``>``, ``&``, U+2028/2029 left raw.

    The characters only occur inside JSON strings, where ``\\uXXXX`` means the same thing.
    """
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _ms(value: float | None) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _signed_ms(value: float) -> str:
    return ("+" if value >= 0 else "−") + _ms(abs(value))


# ----------------------------------------------------------------------------- tables

class Cell:
    """A table cell: escaped display HTML and an optional numeric sort key."""

    __slots__ = ("html", "key", "cls")

    def __init__(self, html_text: str, key: float | None = None, cls: str = ""):
        self.html, self.key, self.cls = html_text, key, cls


def text_cell(value, limit: int = 120) -> Cell:
    text = "" if value is None else str(value)
    if len(text) > limit:
        return Cell(f'<span title="{esc(text, 1000)}">{esc(text, limit)}</span>')
    return Cell(esc(text, None))


def num_cell(value, fmt: str = "{:.2f}", suffix: str = "") -> Cell:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return Cell("–", float("-inf"), "num")
    return Cell(esc(fmt.format(value) + suffix), float(value), "num")


def _sort_key(value: float) -> str:
    """A sort key as JavaScript's ``parseFloat`` reads it (``Infinity``, not ``inf``)."""
    if value == float("inf"):
        return "Infinity"
    if value == float("-inf"):
        return "-Infinity"
    return repr(value)


def _table(headers: list[str], rows: list[list[Cell]], *, numeric: set[int] = frozenset(), note: str = "",
           cls: str = "") -> str:
    head = "".join(
        f'<th class="{"num" if i in numeric else ""}" title="sort by {esc(h)}">{esc(h)}</th>'
        for i, h in enumerate(headers)
    )
    body = []
    for row in rows:
        cells = []
        for cell in row:
            key = "" if cell.key is None or cell.key != cell.key else f' data-v="{_sort_key(cell.key)}"'
            klass = f' class="{cell.cls}"' if cell.cls else ""
            cells.append(f"<td{klass}{key}>{cell.html}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    caption = f'<p class="note">{note}</p>' if note else ""
    return (f'<div class="table-wrap"><table class="sortable {cls}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>{caption}')


# ----------------------------------------------------------------------------- page

class _Page:
    """Collects figures (JSON specs) and hands out their ``<div>`` placeholders."""

    def __init__(self) -> None:
        self.figures: list[tuple[str, str, bool]] = []

    def figure(self, fig: Figure | dict, *, height: int, cls: str = "", modebar: bool = True) -> str:
        """Register ``fig`` (a :class:`Figure`, or its ``{"data", "layout"}`` dict) and return its placeholder."""
        fig_id = f"fig-{len(self.figures) + 1}"
        spec = fig if isinstance(fig, dict) else fig.to_dict()
        spec["layout"]["height"] = height
        self.figures.append((fig_id, figure_json(spec), modebar))
        return f'<div class="fig {cls}" id="{fig_id}" style="height:{height}px"></div>'

    def figures_json(self) -> str:
        parts = [f'{{"id":{json.dumps(fig_id)},"modebar":{json.dumps(modebar)},"fig":{spec}}}'
                 for fig_id, spec, modebar in self.figures]
        return script_json("[" + ",".join(parts) + "]")


def _layout(fig: Figure, **extra) -> Figure:
    fig.update_layout(**_BASE_LAYOUT)
    fig.update_layout(**extra)
    fig.update_xaxes(**_AXIS)
    fig.update_yaxes(**_AXIS)
    return fig


# ----------------------------------------------------------------------------- assembly

_CSS = """
:root{--ink:#1d1d1f;--muted:#5f6368;--line:#d9d9de;--bg:#ffffff;--soft:#f6f7f9;--accent:#0072B2}
*{box-sizing:border-box}
html{background:var(--bg)}
body{margin:0;color:var(--ink);background:var(--bg);font:14px/1.45 %(font)s}
header.top{padding:18px 28px 8px;border-bottom:1px solid var(--line)}
header.top h1{margin:0;font-size:22px}
header.top .sub{color:var(--muted);margin-top:2px}
nav{position:sticky;top:0;z-index:10;background:rgba(255,255,255,.96);border-bottom:1px solid var(--line);
 padding:6px 28px;display:flex;gap:18px;flex-wrap:wrap}
nav a{color:var(--accent);text-decoration:none;font-weight:500}
nav a:hover{text-decoration:underline}
main{padding:4px 28px 40px;max-width:1500px}
section{margin-top:26px}
h2{font-size:19px;border-bottom:2px solid var(--ink);padding-bottom:3px;margin:0 0 10px}
h3{font-size:15px;margin:16px 0 6px}
h4{font-size:13px;margin:12px 0 4px;color:#333}
.note{color:var(--muted);margin:4px 0 8px;font-size:13px}
.muted{color:var(--muted)}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px;background:var(--soft);
 padding:1px 4px;border-radius:3px;word-break:break-all}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:3px 16px;margin:0}
dl.facts dt{color:var(--muted)}
dl.facts dd{margin:0}
ol.headlines{margin:4px 0;padding-left:22px}
ol.headlines li{margin:3px 0}
.fig{width:100%%;min-height:120px}
.table-wrap{overflow-x:auto;margin:4px 0 6px}
table{border-collapse:collapse;font-size:12.5px;min-width:40%%}
th,td{border-bottom:1px solid var(--line);padding:4px 8px;text-align:left;vertical-align:top}
th{background:var(--soft);cursor:pointer;user-select:none;white-space:nowrap;position:relative;padding-right:16px}
th::after{content:"\\2195";position:absolute;right:4px;color:#aaa;font-size:10px}
th[data-sort=asc]::after{content:"\\25B2";color:#333}
th[data-sort=desc]::after{content:"\\25BC";color:#333}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td{overflow-wrap:break-word;max-width:560px}
tbody tr:hover{background:#fafbff}
/* wide tables fit the page: names break anywhere, headers wrap, numbers and verdicts never */
table.sortable{max-width:100%%}
table.sortable th{white-space:normal;min-width:3.5em}
table.sortable td{overflow-wrap:anywhere;max-width:420px}
table.sortable td.num{white-space:nowrap;overflow-wrap:normal}
ul.ev{margin:0;padding-left:16px}
.card{border:1px solid var(--line);border-left:5px solid #D55E00;border-radius:6px;padding:10px 16px 12px;margin:14px 0;
 background:#fff}
.card h3{margin:2px 0 8px;font-size:15.5px}
.card .badge{display:inline-block;min-width:24px;height:24px;line-height:24px;text-align:center;border-radius:12px;
 background:#1d1d1f;color:#fff;font-size:12px;margin-right:8px}
dl.pm{display:grid;grid-template-columns:max-content 1fr;gap:4px 14px;margin:0 0 8px}
dl.pm dt{color:var(--muted);font-weight:500}
dl.pm dd{margin:0}
.evidence{white-space:pre-wrap}
.pill{display:inline-flex;align-items:center;gap:6px;border:1.5px solid;border-radius:12px;padding:0 8px;
 font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px}
.dot{display:inline-block;width:10px;height:10px;border-radius:5px;margin-right:6px;vertical-align:baseline}
.pill .dot{margin-right:0}
.compare{margin:6px 0 4px;max-width:900px}
.crow{display:flex;align-items:center;gap:8px;margin:3px 0}
.clabel{width:130px;color:var(--muted);font-size:12.5px}
.cbar{flex:1;display:flex;height:16px;background:var(--soft);border-radius:2px;overflow:hidden}
.seg{display:block;height:100%%;-webkit-print-color-adjust:exact;print-color-adjust:exact}
.ctotal{width:80px;text-align:right;font-variant-numeric:tabular-nums;font-size:12.5px}
.legend-inline{display:flex;flex-wrap:wrap;gap:12px;font-size:12px;color:var(--muted);margin:4px 0}
.warnings{background:#fff8e6;border:1px solid #f0d48a;border-radius:6px;padding:4px 14px;margin-top:12px}
details{margin-top:12px}
summary{cursor:pointer;font-weight:600}
footer{color:var(--muted);font-size:12px;padding:16px 28px;border-top:1px solid var(--line)}
@media print{
 nav,.modebar-container,.updatemenu-container{display:none!important}
 body{font-size:11px}
 main{padding:0 8px;max-width:none}
 header.top{padding:6px 8px}
 section{break-before:auto}
 .fig,table,.compare,.keep,dl.pm{break-inside:avoid}
 h2,h3,h4,section>.note{break-after:avoid}
 .table-wrap{overflow:visible}
 table{font-size:9.5px}
 td{max-width:320px}
 th::after{content:""}
 *{-webkit-print-color-adjust:exact;print-color-adjust:exact}
}
""" % {"font": _FONT}

_HEAD_JS = """
(function(){var errs=[];function rec(m){errs.push(String(m).slice(0,300));
document.documentElement.setAttribute('data-js-errors',JSON.stringify(errs));}
window.addEventListener('error',function(e){rec((e&&e.message)||'error');});
window.addEventListener('unhandledrejection',function(e){var r=e&&e.reason;rec('unhandled rejection: '+((r&&r.message)||r));});
document.addEventListener('securitypolicyviolation',function(e){rec('blocked by the page policy: '+e.violatedDirective+' '+e.blockedURI);});
window.__tiError=rec;})();
"""

_BODY_JS = """
(function(){
function sortable(){
 var heads=document.querySelectorAll('table.sortable th');
 Array.prototype.forEach.call(heads,function(th){th.addEventListener('click',function(){
  var table=th.closest('table'),body=table.tBodies[0],col=Array.prototype.indexOf.call(th.parentNode.children,th);
  var asc=th.getAttribute('data-sort')!=='asc';
  Array.prototype.forEach.call(th.parentNode.children,function(h){h.removeAttribute('data-sort');});
  th.setAttribute('data-sort',asc?'asc':'desc');
  var rows=Array.prototype.slice.call(body.rows);
  function key(r){var c=r.cells[col];if(!c)return '';var v=c.getAttribute('data-v');
   return v!==null?parseFloat(v):c.textContent.toLowerCase();}
  rows.sort(function(a,b){var x=key(a),y=key(b);var d=(typeof x==='number'&&typeof y==='number')?x-y:(x<y?-1:x>y?1:0);
   return asc?d:-d;});
  rows.forEach(function(r){body.appendChild(r);});
 });});
}
sortable();
var root=document.documentElement;
if(typeof Plotly==='undefined'){window.__tiError('plotly.js did not load');return;}
var figs=JSON.parse(document.getElementById('ti-figures').textContent);
var config={displaylogo:false,responsive:true,modeBarButtonsToRemove:['select2d','lasso2d','autoScale2d'],
 toImageButtonOptions:{format:'png',scale:2}};
var drawn=0,i=0;
root.setAttribute('data-figures-expected',String(figs.length));
function next(){
 if(i>=figs.length){root.setAttribute('data-render-ms',String(Math.round(performance.now())));
  root.setAttribute('data-figures-drawn',String(drawn));return;}
 var f=figs[i++],el=document.getElementById(f.id);
 var c=Object.assign({},config);if(!f.modebar){c.displayModeBar=false;}
 Promise.resolve(Plotly.newPlot(el,f.fig.data,f.fig.layout,c)).then(function(){drawn++;
   setTimeout(next,0);},function(e){window.__tiError('figure '+f.id+': '+((e&&e.message)||e));setTimeout(next,0);});
}
next();
window.addEventListener('beforeprint',function(){
 Array.prototype.forEach.call(document.querySelectorAll('details'),function(d){d.open=true;});
 figs.forEach(function(f){var el=document.getElementById(f.id);
 if(el&&el.data){Plotly.relayout(el,{width:Math.min(el.clientWidth,700)});}});});
window.addEventListener('afterprint',function(){figs.forEach(function(f){var el=document.getElementById(f.id);
 if(el&&el.data){Plotly.relayout(el,{width:null,autosize:true});}});});
})();
"""

_CSP = ("default-src 'none'; script-src 'unsafe-inline' 'unsafe-eval'; style-src 'unsafe-inline'; "
        "img-src data: blob:; font-src data:; connect-src 'none'; form-action 'none'; base-uri 'none'")


def _plotly_js() -> bytes:
    # The bundle holds no "</script"; guard anyway, so a future bundle cannot close its own element.
    return plotly_js().replace(b"</script", b"<\\/script").replace(b"</SCRIPT", b"<\\/SCRIPT")


def _category_legend() -> str:
    return "".join(f'<span><span class="dot" style="background:{CATEGORY_COLORS[c]}"></span>{esc(c)}</span>'
                   for c in CATEGORIES)


def page_shell(page: _Page, *, title: str, subtitle: str, nav: list[tuple[str, str]], sections: list[str],
               footer: str, css: str = "", as_bytes: bool = False) -> str | bytes:
    """One self-contained report page around ``sections`` (shared by every HTML report).

    ``title`` is plain text (escaped here); ``subtitle``, ``sections`` and ``footer`` are HTML
    whose untrusted parts the caller escaped; ``nav`` is ``[(anchor, plain label), ...]``. The
    page holds the policy that forbids network access, plotly.js once, the figures of ``page``
    as one JSON block, the sortable tables and the test hooks (``data-figures-drawn``,
    ``data-js-errors`` on ``<html>``). ``css`` is appended to the common style sheet.

    ``as_bytes``: the page encoded as UTF-8, built without ever decoding plotly.js (4.8 MB with
    a few non-ASCII characters, so as text it would take two bytes a character: decoding it,
    joining it and encoding the page again took 0.04 s of a report that takes a few tenths).
    """
    nav_html = "".join(f'<a href="#{esc(anchor)}">{esc(label)}</a>' for anchor, label in nav)
    head = "".join([
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="referrer" content="no-referrer">',
        f"<title>{esc(title)}</title><style>{_CSS}{css}</style><script>{_HEAD_JS}</script>",
        "<script>",
    ])
    body = "".join([
        "</script></head><body>",
        f'<header class="top"><h1>{esc(title)}</h1><div class="sub">{subtitle}</div>'
        f'<div class="legend-inline">{_category_legend()}</div></header>',
        f"<nav>{nav_html}</nav><main>",
        *sections,
        f"</main><footer>Generated offline by traceinsight; {footer}. "
        "Strings from the traces are shown as text.</footer>",
        f'<script type="application/json" id="ti-figures">{page.figures_json()}</script>',
        f"<script>{_BODY_JS}</script></body></html>\n",
    ])
    document = b"".join([head.encode(), _plotly_js(), body.encode()])
    return document if as_bytes else document.decode()
