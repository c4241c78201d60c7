"""Plotly figures as plain data, and their JSON for plotly.js.

The pages draw their figures with plotly.js, which reads a figure as JSON: ``{"data":
[trace, ...], "layout": {...}}``. plotly.py's graph objects build that JSON too, but they
validate every property as it is set; importing them and validating the report's figures
took about half a second, more than everything else ``--html`` does after reading the
findings. :class:`Figure` builds the same JSON from dicts, with the few graph-object calls
the pages use, and :func:`figure_json` writes it, numpy arrays as plotly.js typed arrays
(base64, as plotly.py writes them).

Examples
--------
>>> fig = Figure().add_trace(trace("bar", x=[1, 2], y=[3.0, 4.0], name="gpu_compute"))
>>> fig = fig.update_layout(barmode="stack", margin=dict(l=70)).update_xaxes(title_text="step")
>>> figure_json(fig.to_dict())
'{"data":[{"type":"bar","x":[1,2],"y":[3.0,4.0],"name":"gpu_compute"}],"layout":{"barmode":"stack","margin":{"l":70},"xaxis":{"title":{"text":"step"}}}}'
"""

from __future__ import annotations

import base64
import os
from importlib.util import find_spec

import msgspec
import numpy as np

__all__ = ["Figure", "figure_json", "plotly_js", "trace"]

#: Properties whose value is a dict of sub-properties, so that ``title_text="x"`` means
#: ``title={"text": "x"}`` as in plotly.py (the "magic underscore" the pages use).
_COMPOUND = ("title_", "marker_", "line_", "font_", "legend_")

#: numpy dtypes plotly.js reads as typed arrays, and its short names for them.
_TYPED = {"int8": "i1", "uint8": "u1", "int16": "i2", "uint16": "u2", "int32": "i4", "uint32": "u4",
          "float32": "f4", "float64": "f8"}


def trace(kind: str, **props) -> dict:
    """One trace of type ``kind`` (``"bar"``, ``"scatter"``, ``"heatmap"``); properties set to
    ``None`` are left out, as plotly.py leaves them out."""
    return {"type": kind, **{key: value for key, value in props.items() if value is not None}}


def _merge(target: dict, props: dict) -> None:
    """Set ``props`` into ``target``: dicts merge key by key, everything else replaces,
    ``None`` removes, and ``a_b=v`` sets ``a={"b": v}`` for the compound properties."""
    for key, value in props.items():
        if key.startswith(_COMPOUND) and "_" in key:
            head, tail = key.split("_", 1)
            _merge(target.setdefault(head, {}), {tail: value})
        elif value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = _copy(value)


def _copy(value):
    """``value`` with its dicts copied, so that a later merge never changes a shared default."""
    return {key: _copy(item) for key, item in value.items()} if isinstance(value, dict) else value


class Figure:
    """A plotly figure as plain data, with the graph-object calls the pages use.

    ``rows`` > 1 stacks that many subplots over one shared x axis (what
    ``make_subplots(rows=n, cols=1, shared_xaxes=True, ...)`` lays out); ``row`` arguments
    then pick a subplot, counted from the top and from 1.
    """

    def __init__(self, *, rows: int = 1, row_heights: list[float] | None = None,
                 vertical_spacing: float = 0.0) -> None:
        self.data: list[dict] = []
        self.layout: dict = {}
        self.rows = rows
        if rows > 1:
            heights = row_heights or [1.0 / rows] * rows
            scale = (1.0 - vertical_spacing * (rows - 1)) / sum(heights)
            top = 1.0
            for row, share in enumerate(heights, start=1):
                bottom = max(top - share * scale, 0.0)
                x, y = self._axes(row)
                self.layout[f"xaxis{x[1:]}"] = {"anchor": y, "domain": [0.0, 1.0]}
                if row < rows:  # tick labels on the bottom axis only, as the axes are shared
                    self.layout[f"xaxis{x[1:]}"].update(matches=f"x{rows}", showticklabels=False)
                self.layout[f"yaxis{y[1:]}"] = {"anchor": x, "domain": [bottom, top]}
                top = bottom - vertical_spacing

    @staticmethod
    def _axes(row: int) -> tuple[str, str]:
        suffix = "" if row == 1 else str(row)
        return f"x{suffix}", f"y{suffix}"

    def add_trace(self, trace: dict, *, row: int | None = None, col: int | None = None) -> Figure:
        if row is not None:  # as make_subplots: a trace placed in a subplot names its axes
            x, y = self._axes(row)
            trace = {**trace, "xaxis": x, "yaxis": y}
        self.data.append(trace)
        return self

    def update_layout(self, **props) -> Figure:
        _merge(self.layout, props)
        return self

    def add_annotation(self, **props) -> Figure:
        self.layout.setdefault("annotations", []).append({k: v for k, v in props.items() if v is not None})
        return self

    def _update_axes(self, letter: str, row: int | None, props: dict) -> Figure:
        if row is not None:
            names = [f"{letter}axis{'' if row == 1 else row}"]
        else:
            names = [key for key in self.layout if key.startswith(f"{letter}axis")] or [f"{letter}axis"]
        for name in names:
            _merge(self.layout.setdefault(name, {}), props)
        return self

    def update_xaxes(self, *, row: int | None = None, col: int | None = None, **props) -> Figure:
        return self._update_axes("x", row, props)

    def update_yaxes(self, *, row: int | None = None, col: int | None = None, **props) -> Figure:
        return self._update_axes("y", row, props)

    def to_dict(self) -> dict:
        return {"data": self.data, "layout": self.layout}


def _typed_array(values: np.ndarray):
    """A numpy array as plotly.js reads it: a typed array in base64, or a list where
    plotly.js has no typed array of its dtype."""
    if values.size and values.dtype.kind in "iu" and values.dtype.itemsize == 8:
        low, high = int(values.min()), int(values.max())
        for dtype in (np.int8, np.int16, np.int32) if values.dtype.kind == "i" else (np.uint8, np.uint16, np.uint32):
            if np.iinfo(dtype).min <= low and high <= np.iinfo(dtype).max:
                values = values.astype(dtype)
                break
    short = _TYPED.get(str(values.dtype))
    if short is None or not values.size:
        return values.tolist()
    spec = {"dtype": short, "bdata": base64.b64encode(np.ascontiguousarray(values).astype(values.dtype.newbyteorder("<"),
                                                                                       copy=False)).decode("ascii")}
    if values.ndim > 1:
        spec["shape"] = ", ".join(str(n) for n in values.shape)
    return spec


def _encode_extra(value):
    if isinstance(value, np.ndarray):
        return _typed_array(value)
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot put a {type(value).__name__} in a figure")


_ENCODER = msgspec.json.Encoder(enc_hook=_encode_extra)


def figure_json(figure: dict) -> str:
    """``figure`` (``{"data", "layout"}``) as compact JSON for plotly.js; NaN and infinities
    are written as ``null``, which plotly.js shows as a gap."""
    return _ENCODER.encode(figure).decode("utf-8")


def plotly_js() -> bytes:
    """The minified plotly.js shipped inside the plotly package (UTF-8), read without importing it."""
    spec = find_spec("plotly")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the plotly package (which ships plotly.js) is not installed")
    path = os.path.join(next(iter(spec.submodule_search_locations)), "package_data", "plotly.min.js")
    with open(path, "rb") as handle:
        return handle.read()
