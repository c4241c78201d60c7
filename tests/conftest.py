"""Shared test helpers: where the real traces live, and a builder for tiny hand-made models."""

from __future__ import annotations

from pathlib import Path

import atexit
import os
import shutil
import tempfile

import polars as pl
import pytest

# CLI runs in tests must not fill the user's ~/.cache: give the session its own cache folder.
if "TRACEINSIGHT_CACHE_DIR" not in os.environ:
    os.environ["TRACEINSIGHT_CACHE_DIR"] = tempfile.mkdtemp(prefix="traceinsight-test-cache-")
    # Each session's cache (tens of MB) goes with it.
    atexit.register(shutil.rmtree, os.environ["TRACEINSIGHT_CACHE_DIR"], ignore_errors=True)

from traceinsight.model import INTERVAL_SCHEMA, RANK_SCHEMA, TraceModel, conform, with_depth

#: ../shared/traces beside the checkout (CI has it there too).
SHARED_TRACES = Path(__file__).resolve().parents[1].parent / "shared" / "traces"
SAMPLE_TRACES = Path(__file__).resolve().parents[1] / "sample_traces"

US = 1_000  # ns per microsecond


def shared(relative: str) -> Path:
    """Path of a file under ../shared/traces; skip the test when the folder is absent."""
    path = SHARED_TRACES / relative
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


def page_figures(page: str) -> list[dict]:
    """The figures of an HTML report, as plotly.js reads them: its JSON block, with every
    typed array (``{"dtype", "bdata"[, "shape"]}``, base64) decoded into a list."""
    import base64
    import json
    import re

    import numpy as np

    def decode(node):
        if isinstance(node, dict):
            if set(node) in ({"dtype", "bdata"}, {"dtype", "bdata", "shape"}):
                values = np.frombuffer(base64.b64decode(node["bdata"]), dtype=np.dtype(node["dtype"]).newbyteorder("<"))
                if "shape" in node:
                    values = values.reshape([int(n) for n in node["shape"].split(",")])
                return values.tolist()
            return {key: decode(value) for key, value in node.items()}
        if isinstance(node, list):
            return [decode(value) for value in node]
        return node

    match = re.search(r'<script type="application/json" id="ti-figures">(.*?)</script>', page, re.S)
    assert match, "figure data block missing"
    return decode(json.loads(match.group(1)))


def build_model(rows: list[dict], *, ranks: list[int] | None = None) -> TraceModel:
    """A model from interval dicts; missing columns are null, times in ns.

    CPU rows default to pid 1, tid 1; GPU rows (kernel/memcpy/memset) to device 0, stream 7.
    """
    filled = []
    for row in rows:
        row = dict(row)
        row.setdefault("rank", 0)
        row.setdefault("pid", 1)
        if row["kind"] in ("kernel", "memcpy", "memset", "gpu_annotation"):
            row.setdefault("device", 0)
            row.setdefault("stream", 7)
        else:
            row.setdefault("tid", 1)
        filled.append(row)
    intervals = with_depth(conform(pl.DataFrame(filled, infer_schema_length=None), INTERVAL_SCHEMA))
    rank_ids = ranks if ranks is not None else sorted({r["rank"] for r in filled} or {0})
    rank_frame = conform(
        pl.DataFrame(
            {
                "rank": rank_ids,
                "rank_source": ["test"] * len(rank_ids),
                "source": ["built"] * len(rank_ids),
                "format": ["test"] * len(rank_ids),
                "pid": [1] * len(rank_ids),
            }
        ),
        RANK_SCHEMA,
    )
    return TraceModel(intervals=intervals, ranks=rank_frame)


def launch(name: str, start_us: float, end_us: float, correlation: int, **extra) -> dict:
    return dict(kind="cuda_api", name=name, start_ns=int(start_us * US), end_ns=int(end_us * US),
                correlation=correlation, **extra)


def kernel(name: str, start_us: float, end_us: float, correlation: int, **extra) -> dict:
    return dict(kind="kernel", name=name, start_ns=int(start_us * US), end_ns=int(end_us * US),
                correlation=correlation, **extra)


def annotation(name: str, start_us: float, end_us: float, **extra) -> dict:
    return dict(kind="annotation", name=name, start_ns=int(start_us * US), end_ns=int(end_us * US),
                **extra)
