"""The report's figures as plain data (``traceinsight.report.html.figure``) against plotly.py.

The pages used to build their figures with plotly.py's graph objects; they now build the same
JSON from dicts. These tests build figures both ways with the calls the pages make and check
that plotly.js receives the same figure.
"""

from __future__ import annotations

import doctest
import json

import numpy as np
import plotly.graph_objects as go
import pytest
from plotly.subplots import make_subplots

import traceinsight.report.html.figure as figure_module
from conftest import page_figures
from traceinsight.report.html.figure import Figure, figure_json, plotly_js, trace
from traceinsight.report.html.shell import _AXIS, _BASE_LAYOUT, _layout


def _plotly_json(fig: go.Figure) -> dict:
    """What plotly.py sends to plotly.js, without its template (the pages set none)."""
    spec = json.loads(fig.to_json(validate=False, pretty=False))
    spec["layout"].pop("template", None)
    return _decoded(spec)


def _ours(fig: Figure) -> dict:
    return _decoded(json.loads(figure_json(fig.to_dict())))


def _decoded(spec: dict) -> dict:
    """Typed arrays as lists, through the tests' page reader."""
    block = json.dumps([spec]).replace("<", "\\u003c")
    page = f'<script type="application/json" id="ti-figures">{block}</script>'
    return page_figures(page)[0]


def test_module_examples_run():
    assert doctest.testmod(figure_module).failed == 0


def test_a_figure_with_layout_and_axis_updates_matches_plotly():
    steps = np.arange(1, 41, dtype=np.int64)
    durations = np.linspace(20.0, 30.0, 40).astype(np.float32)
    base = {key: value for key, value in _BASE_LAYOUT.items() if key != "template"}

    theirs = go.Figure()
    theirs.add_trace(go.Scatter(x=steps, y=durations, mode="lines", name="rank 0", line=dict(color="#1f77b4", width=1.5),
                                customdata=np.column_stack([durations, durations]), hovertemplate="%{y:.2f} ms"))
    theirs.add_trace(go.Bar(x=[1, 2], y=[None, 3.5], name="anomalous", marker=dict(color="#111", line=dict(width=0))))
    theirs.update_layout(**base)
    theirs.update_layout(legend=dict(orientation="h", y=1.02), margin=dict(l=70, r=20, t=30, b=50), updatemenus=None)
    theirs.update_xaxes(**_AXIS)
    theirs.update_yaxes(**_AXIS)
    theirs.update_xaxes(title_text="step", showgrid=False)
    theirs.update_yaxes(title_text="step duration (ms)", type="log", dtick=None)
    theirs.add_annotation(x=20, y=30, text="⇡ 1,086 ms", showarrow=False, font=dict(size=10, color="#B00020"))
    theirs.update_layout(margin=dict(t=70), height=420)

    ours = Figure()
    ours.add_trace(trace("scatter", x=steps, y=durations, mode="lines", name="rank 0",
                         line=dict(color="#1f77b4", width=1.5), customdata=np.column_stack([durations, durations]),
                         hovertemplate="%{y:.2f} ms"))
    ours.add_trace(trace("bar", x=[1, 2], y=[None, 3.5], name="anomalous", marker=dict(color="#111", line=dict(width=0))))
    _layout(ours, legend=dict(orientation="h", y=1.02), margin=dict(l=70, r=20, t=30, b=50), updatemenus=None)
    ours.update_xaxes(title_text="step", showgrid=False)
    ours.update_yaxes(title_text="step duration (ms)", type="log", dtick=None)
    ours.add_annotation(x=20, y=30, text="⇡ 1,086 ms", showarrow=False, font=dict(size=10, color="#B00020"))
    ours.update_layout(margin=dict(t=70), height=420)

    assert _ours(ours) == _plotly_json(theirs)


def test_stacked_subplots_match_make_subplots():
    theirs = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08, row_heights=[0.55, 0.45])
    theirs.add_trace(go.Scatter(x=[1, 2], y=[3.0, 4.0], name="measured"), row=1, col=1)
    theirs.add_trace(go.Bar(x=[1, 2], y=[0.5, 1.0], name="saving"), row=2, col=1)
    theirs.update_xaxes(title_text="step", row=2, col=1)
    theirs.update_yaxes(title_text="saving (ms)", rangemode="tozero", row=2, col=1)

    ours = Figure(rows=2, vertical_spacing=0.08, row_heights=[0.55, 0.45])
    ours.add_trace(trace("scatter", x=[1, 2], y=[3.0, 4.0], name="measured"), row=1, col=1)
    ours.add_trace(trace("bar", x=[1, 2], y=[0.5, 1.0], name="saving"), row=2, col=1)
    ours.update_xaxes(title_text="step", row=2, col=1)
    ours.update_yaxes(title_text="saving (ms)", rangemode="tozero", row=2, col=1)

    expected, got = _plotly_json(theirs), _ours(ours)
    assert got["data"] == expected["data"]
    assert got["layout"].keys() == expected["layout"].keys()
    for name, axis in expected["layout"].items():
        for key, value in axis.items():
            assert got["layout"][name][key] == (pytest.approx(value) if key == "domain" else value), (name, key)


@pytest.mark.parametrize("values", [
    np.array([1, 2, 3], dtype=np.int64),  # fits int8
    np.array([-40_000, 7], dtype=np.int64),  # int32
    np.array([2**40, 1], dtype=np.int64),  # no typed array holds it: a list
    np.array([300, 0], dtype=np.uint64),  # uint16
    np.array([0.5, float("nan")], dtype=np.float32),
    np.array([[1.25, 2.5], [3.0, float("nan")]], dtype=np.float64),
    np.array([], dtype=np.float64),
])
def test_arrays_are_written_as_plotly_writes_them(values):
    theirs = json.loads(go.Figure(go.Heatmap(z=values)).to_json(validate=False))["data"][0]["z"]
    ours = json.loads(figure_json({"data": [{"type": "heatmap", "z": values}], "layout": {}}))["data"][0]["z"]
    assert ours == theirs


def test_numpy_scalars_and_non_finite_floats():
    spec = json.loads(figure_json({"data": [{"x": [np.int64(3), np.float32(0.5), float("inf"), float("nan")]}],
                                   "layout": {}}))
    assert spec["data"][0]["x"] == [3, 0.5, None, None]
    with pytest.raises(TypeError, match="cannot put a complex in a figure"):
        figure_json({"data": [{"x": [1j]}], "layout": {}})


def test_plotly_js_is_the_bundle_plotly_ships():
    from plotly.offline import get_plotlyjs

    assert plotly_js().decode() == get_plotlyjs()


def test_merging_never_changes_the_shared_defaults():
    before = json.dumps(_BASE_LAYOUT, sort_keys=True)
    fig = _layout(Figure())
    fig.update_layout(hoverlabel=dict(font=dict(size=30)), margin=dict(l=1))
    assert json.dumps(_BASE_LAYOUT, sort_keys=True) == before
    assert fig.layout["hoverlabel"]["font"]["size"] == 30


def test_the_page_as_bytes_is_the_page_as_text_encoded():
    from traceinsight.report.html.shell import _Page, page_shell

    page = _Page()
    page.figure(Figure().add_trace(trace("bar", x=[1], y=["µs · <b>"])), height=100)
    args = dict(title="t <i>", subtitle="s", nav=[("a", "A")], sections=["<p>ü</p>"], footer="f")
    text, data = page_shell(page, **args), page_shell(page, **args, as_bytes=True)
    assert isinstance(text, str) and isinstance(data, bytes)
    assert data == text.encode("utf-8")
    assert plotly_js() in data  # inlined whole (it holds no "</script" to guard)
