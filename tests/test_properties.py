"""Property-based tests (hypothesis).

- The interval algebra (``traceinsight.analysis.intervals``) against a brute-force model:
  sets of integer points on a small grid.
- The ingestors on generated traces: random Kineto event lists of valid and invalid shapes,
  and random small nsys-like SQLite databases built with :mod:`sqlite3`. Whatever the input,
  a reader either returns a model that keeps the model's invariants (and that the analyses
  and the JSON report digest) or raises :class:`~traceinsight.errors.TraceInputError`; on
  well-formed input it reads exactly what was written.
"""

from __future__ import annotations

import gzip
import json
import os
import sqlite3
import string
import tempfile

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from traceinsight.analysis import intervals as iv
from traceinsight.errors import TraceInputError
from traceinsight.ingest.guard import MAX_ABS_TIME_NS
from traceinsight.ingest.kineto import KIND_BY_CATEGORY, read_kineto
from traceinsight.ingest.nsys import read_nsys
from traceinsight.model import INTERVAL_KINDS, INTERVAL_SCHEMA, RANK_SCHEMA, SAMPLE_SCHEMA, TraceModel
from traceinsight.analysis.schemas import WAIT_SCHEMA
from traceinsight.report.records import wait_records

# Hypothesis keeps its caches out of the checkout.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "traceinsight-hypothesis"))

GRID = 40
# database=None: nothing written into the checkout (.hypothesis/); failures print their example.
FAST = settings(max_examples=150, deadline=None, database=None)
FILES = settings(max_examples=60, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- interval algebra against a brute-force model -------------------------------------------------

raw_intervals = st.lists(
    st.tuples(st.integers(0, GRID), st.integers(-3, 12)).map(lambda p: (p[0], p[0] + p[1])),
    max_size=8,
)


def as_set(pairs) -> iv.IntervalSet:
    return iv.merge([s for s, _ in pairs], [e for _, e in pairs])


def points(pairs) -> set[int]:
    return {x for s, e in pairs for x in range(s, e)}


def points_of(result: iv.IntervalSet) -> set[int]:
    return points(zip(result[0].tolist(), result[1].tolist()))


def assert_canonical(result: iv.IntervalSet, *, strict: bool = False) -> None:
    """Sorted, non-empty, disjoint intervals (``strict``: not even touching)."""
    starts, ends = result
    assert starts.dtype == np.int64 and ends.dtype == np.int64 and starts.shape == ends.shape
    assert (ends > starts).all()
    if starts.size > 1:
        gaps = starts[1:] - ends[:-1]
        assert ((gaps > 0) if strict else (gaps >= 0)).all()


@FAST
@given(raw_intervals)
def test_merge_is_the_union(pairs):
    result = iv.merge([s for s, _ in pairs], [e for _, e in pairs])
    assert_canonical(result, strict=True)
    assert points_of(result) == points(pairs)


@FAST
@given(raw_intervals, st.integers(-5, GRID + 5), st.integers(-5, GRID + 5))
def test_complement_and_clip(pairs, lo, hi):
    a = as_set(pairs)
    window = set(range(lo, hi))
    gaps = iv.complement(a, lo, hi)
    assert_canonical(gaps)
    assert points_of(gaps) == window - points(pairs)
    clipped = iv.clip(a, lo, hi)
    assert_canonical(clipped)
    assert points_of(clipped) == window & points(pairs)


@FAST
@given(raw_intervals, raw_intervals)
def test_intersect_and_subtract(left, right):
    a, b = as_set(left), as_set(right)
    both = iv.intersect(a, b)
    assert_canonical(both)
    assert points_of(both) == points(left) & points(right)
    rest = iv.subtract(a, b)
    assert_canonical(rest)
    assert points_of(rest) == points(left) - points(right)
    # The pieces partition a.
    assert iv.total(both) + iv.total(rest) == iv.total(a) == len(points(left))


@FAST
@given(raw_intervals, st.lists(st.integers(-5, GRID + 15), max_size=10))
def test_point_queries(pairs, queries):
    a = as_set(pairs)
    covered_points = points(pairs)
    query = np.array(queries, dtype=np.int64)
    assert iv.covered(a, query).tolist() == [q in covered_points for q in queries]
    assert iv.covered_length_before(a, query).tolist() == [
        sum(1 for x in covered_points if x < q) for q in queries
    ]


@FAST
@given(raw_intervals, st.lists(st.tuples(st.integers(-5, GRID + 15), st.integers(0, 20)), max_size=8))
def test_overlap_per_window(pairs, windows):
    a = as_set(pairs)
    starts = [s for s, _ in windows]
    ends = [s + n for s, n in windows]
    expected = [len(points(pairs) & set(range(s, e))) for s, e in zip(starts, ends)]
    assert iv.overlap_per_window(a, starts, ends).tolist() == expected


# -- evidence matching against brute force -------------------------------------------------------

THREADS = [(0, 1, 1), (0, 1, 2), (0, 2, 1), (1, 1, 1)]


@st.composite
def gaps_and_items(draw):
    """Disjoint gaps per thread (as the breakdown makes them) and arbitrary items."""
    gap_rows = []
    for thread in draw(st.lists(st.sampled_from(THREADS), unique=True, max_size=3)):
        cuts = sorted(draw(st.lists(st.integers(0, GRID), min_size=2, max_size=8, unique=True)))
        for start, end in zip(cuts[0::2], cuts[1::2]):
            gap_rows.append((*thread, start, end))
    item_rows = [
        (*draw(st.sampled_from(THREADS + [(0, 1, None)])), start, start + length, draw(st.sampled_from("abc")))
        for start, length in draw(st.lists(st.tuples(st.integers(0, GRID), st.integers(0, 10)), max_size=25))
    ]
    gaps = pl.DataFrame(gap_rows, schema={"rank": pl.Int32, "pid": pl.Int64, "tid": pl.Int64,
                                           "start_ns": pl.Int64, "end_ns": pl.Int64}, orient="row")
    gaps = gaps.with_row_index("gap_id").with_columns(duration_ns=pl.col("end_ns") - pl.col("start_ns"))
    items = pl.DataFrame(item_rows, schema={"rank": pl.Int32, "pid": pl.Int64, "tid": pl.Int64,
                                            "start_ns": pl.Int64, "end_ns": pl.Int64, "name": pl.String},
                         orient="row")
    return gaps, items


@FAST
@given(gaps_and_items(), st.sampled_from([1, 2, 1 << 16]))
def test_per_thread_overlaps_is_the_brute_force_join(case, block):
    from traceinsight.analysis.analyzers import cpu_gap_causes

    gaps, items = case
    expected = sorted(
        (gap["gap_id"], min(item["end_ns"], gap["end_ns"]) - max(item["start_ns"], gap["start_ns"]), item["name"])
        for gap in gaps.iter_rows(named=True)
        for item in items.iter_rows(named=True)
        if (item["rank"], item["pid"], item["tid"]) == (gap["rank"], gap["pid"], gap["tid"])
        and min(item["end_ns"], gap["end_ns"]) > max(item["start_ns"], gap["start_ns"])
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_gap_causes, "_ITEM_BLOCK", block)
        hits = cpu_gap_causes._per_thread_overlaps(gaps, items)
    found = sorted(hits.select("gap_id", "overlap_ns", "name").iter_rows()) if hits.height else []
    assert found == expected


@FAST
@given(gaps_and_items(), st.lists(st.integers(0, 3), min_size=25, max_size=25))
def test_deepest_covering_matches_the_window_definition(case, depths):
    from traceinsight.analysis.analyzers import cpu_gap_causes

    gaps, items = case
    items = items.with_columns(specificity=pl.Series(depths[: items.height], dtype=pl.Int32))
    hits = cpu_gap_causes._per_thread_overlaps(gaps, items.with_columns(pl.col("name").cast(pl.Categorical)))
    assume(hits.height)
    # The definition, as polars windows: the names covering MIN_SHARE of the gap, then the
    # most specific of those.
    expected = (
        hits.with_columns(pl.col("name").cast(pl.String), _row=pl.int_range(pl.len()))
        .join(gaps.select("gap_id", "duration_ns"), on="gap_id")
        .filter(pl.col("overlap_ns").sum().over("gap_id", "name") >= cpu_gap_causes.MIN_SHARE * pl.col("duration_ns"))
        .filter(pl.col("specificity") == pl.col("specificity").max().over("gap_id"))
        .get_column("_row").sort().to_list()
    )
    mask = cpu_gap_causes._deepest_covering(hits, gaps)
    assert np.flatnonzero(mask).tolist() == expected


@FAST
@given(st.lists(st.tuples(st.integers(0, 5), st.sampled_from(["x", "yy", None, "zzz"])), max_size=60),
       st.sampled_from([1, 16]))
def test_join_sorted_runs_matches_a_group_by(rows, widest):
    from traceinsight.analysis.analyzers import cpu_gap_causes

    frame = pl.DataFrame(sorted(rows, key=lambda r: r[0]), schema={"k": pl.Int64, "v": pl.String}, orient="row")
    expected = frame.group_by("k", maintain_order=True).agg(pl.col("v").str.join(", "))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_gap_causes, "_MAX_SHIFTED_RUN", widest)
        joined = cpu_gap_causes._join_sorted_runs(frame, key="k", column="v", separator=", ")
    assert joined.rows() == expected.rows()


@FAST
@given(st.lists(st.sampled_from(["kernel_a<int>(float*)", "b", None, "ccccccccccccccccccccccccc"]), max_size=60))
def test_repeated_strings_and_empty_columns_keep_their_values(values):
    from traceinsight.model import compact_nulls, share_repeated_strings

    series = pl.Series("name", values, dtype=pl.String)
    assert share_repeated_strings(series).to_list() == values
    frame = pl.DataFrame({"name": series, "empty": pl.Series([None] * len(values), dtype=pl.Int64)})
    compact = compact_nulls(frame)
    assert compact.schema == frame.schema and compact.rows() == frame.rows()


# -- model invariants -----------------------------------------------------------------------------


def assert_model_ok(model: TraceModel) -> None:
    intervals = model.intervals
    assert dict(intervals.schema) == INTERVAL_SCHEMA
    assert dict(model.samples.schema) == SAMPLE_SCHEMA
    assert dict(model.ranks.schema) == RANK_SCHEMA
    for column in ("rank", "kind", "name", "start_ns", "end_ns"):
        assert intervals.get_column(column).null_count() == 0, column
    assert intervals.filter(pl.col("end_ns") < pl.col("start_ns")).is_empty()
    assert intervals.filter(pl.col("start_ns").abs() > MAX_ABS_TIME_NS).is_empty()
    assert set(intervals.get_column("kind").unique().to_list()) <= set(INTERVAL_KINDS)
    assert set(intervals.get_column("rank").unique().to_list()) <= set(model.ranks.get_column("rank").to_list())
    assert model.ranks.get_column("rank").is_unique().all()
    names = intervals.get_column("name")
    assert not names.str.contains("[\x00-\x08\x0b-\x1f\x7f-\x9f]").any()  # no terminal controls
    assert all(isinstance(w, str) and "\n" not in w for w in model.warnings)


def assert_analyzable(model: TraceModel) -> None:
    """The analyses and the JSON report digest whatever a reader returns."""
    from traceinsight.analysis.pipeline import analyze
    from traceinsight.report.json_report import render_json

    if model.ranks.is_empty():  # nothing to analyze: the user is told so (exit 2)
        with pytest.raises(TraceInputError, match="the traces hold no events"):
            analyze(model)
        return
    json.loads(render_json(analyze(model)))


# -- Kineto ---------------------------------------------------------------------------------------

categories = st.sampled_from(sorted(KIND_BY_CATEGORY) + ["Trace", "overhead", "weird", ""])
names = st.one_of(
    st.sampled_from(["aten::mm", "ProfilerStep#3", "void foo<int>(float*)", "ncclDevKernel_SendRecv(x)",
                     "cudaLaunchKernel", "[bold]x[/bold]", "a\x1b[2Jb", "step 4", ""]),
    st.text(max_size=12),
)
numbers = st.one_of(
    st.integers(-(10**6), 10**7),
    st.floats(-1e6, 1e7, allow_nan=False),
    st.sampled_from([1e300, -1e300, 10**30, 2**63, 1.7e15]),
)
loose_values = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=6),
                         st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@st.composite
def kineto_event(draw, valid: bool):
    if valid:
        event = {
            "ph": "X", "cat": draw(categories), "name": draw(names),
            "pid": draw(st.integers(0, 5)), "tid": draw(st.integers(0, 5)),
            "ts": draw(st.integers(0, 10**6)), "dur": draw(st.integers(0, 10**4)),
        }
        if draw(st.booleans()):
            event["args"] = {"device": draw(st.integers(0, 3)), "stream": draw(st.integers(0, 9)),
                             "correlation": draw(st.integers(0, 50)), "External id": draw(st.integers(0, 50))}
        return event
    event = {}
    for key, value in (("ph", st.one_of(st.just("X"), st.sampled_from(["i", "M", "B", "f"]), loose_values)),
                       ("cat", st.one_of(categories, loose_values)), ("name", st.one_of(names, loose_values)),
                       ("pid", loose_values), ("tid", loose_values), ("ts", st.one_of(numbers, loose_values)),
                       ("dur", st.one_of(numbers, loose_values)),
                       ("args", st.one_of(st.dictionaries(st.sampled_from(
                           ["device", "stream", "correlation", "External id", "Input Dims", "Rank", "bytes"]),
                           loose_values, max_size=4), loose_values))):
        if draw(st.integers(0, 5)):  # usually present
            event[key] = draw(value)
    return event


@st.composite
def kineto_document(draw, valid: bool):
    events = draw(st.lists(kineto_event(valid), max_size=25))
    if not valid and draw(st.integers(0, 9)) == 0:
        events += draw(st.lists(loose_values, max_size=2))  # not even objects
    shape = draw(st.sampled_from(["object", "object", "list"]))
    if shape == "list":
        return events
    document = {"traceEvents": events, "schemaVersion": 1}
    if not valid:
        for key in ("baseTimeNanoseconds", "distributedInfo", "deviceProperties"):
            if draw(st.booleans()):
                document[key] = draw(st.one_of(loose_values, st.fixed_dictionaries(
                    {"rank": loose_values, "world_size": loose_values})))
    return document


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("properties")


def _write_kineto(scratch, document, compress: bool):
    path = scratch / ("trace.json.gz" if compress else "trace.json")
    data = json.dumps(document).encode()
    path.write_bytes(gzip.compress(data, mtime=0) if compress else data)
    return path


@FILES
@given(document=kineto_document(valid=False), compress=st.booleans(), salvage=st.booleans())
def test_kineto_reader_never_crashes(scratch, document, compress, salvage):
    path = _write_kineto(scratch, document, compress)
    try:
        model = read_kineto(str(path), salvage=salvage)
    except TraceInputError as error:
        assert "\n" not in str(error) and str(path) in str(error)
        return
    assert_model_ok(model)
    assert_analyzable(model)


@FILES
@given(document=kineto_document(valid=True), compress=st.booleans())
def test_kineto_reader_reads_what_was_written(scratch, document, compress):
    path = _write_kineto(scratch, document, compress)
    model = read_kineto(str(path))
    assert_model_ok(model)
    events = document if isinstance(document, list) else document["traceEvents"]
    expected = sorted(
        (event["dur"] * 1000)
        for event in events
        if event["cat"] in KIND_BY_CATEGORY or (event["name"].startswith("ProfilerStep#") and event["cat"] == "cpu_op")
    )
    durations = (model.intervals.get_column("end_ns") - model.intervals.get_column("start_ns")).to_list()
    assert sorted(durations) == expected
    assert_analyzable(model)


@FILES
@given(document=kineto_document(valid=True), cut=st.floats(0.05, 0.99))
def test_kineto_salvage_keeps_a_prefix(scratch, document, cut):
    assume(isinstance(document, dict) and document["traceEvents"])
    text = json.dumps(document).encode()
    path = scratch / "cut.json"
    path.write_bytes(text[: int(len(text) * cut)])
    try:
        model = read_kineto(str(path), salvage=True)
    except TraceInputError as error:
        assert "nothing to salvage" in str(error) or "not a" in str(error) or "JSON" in str(error)
        return
    assert_model_ok(model)
    assert model.intervals.height <= len(document["traceEvents"])


# -- nsys -----------------------------------------------------------------------------------------

GLOBAL_TID = (1 << 48) | (100 << 24) | 100
sqlite_values = st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False, allow_infinity=False),
                          st.text(alphabet=string.printable, max_size=6), st.binary(max_size=4))


@st.composite
def nsys_database(draw, valid: bool):
    """Statements building a small nsys-like export: kernels, runtime calls, NVTX ranges."""
    strings = draw(st.lists(st.text(alphabet=string.ascii_letters + "_<>():[]/ \x1b", min_size=1, max_size=10),
                            min_size=1, max_size=6))
    tables = {
        "StringIds": ["id INTEGER PRIMARY KEY", "value TEXT"],
        "CUPTI_ACTIVITY_KIND_KERNEL": ["start", '"end"', "deviceId", "streamId", "correlationId", "globalPid",
                                       "shortName", "demangledName"],
        "CUPTI_ACTIVITY_KIND_RUNTIME": ["start", '"end"', "globalTid", "correlationId", "nameId", "eventClass"],
        "NVTX_EVENTS": ["start", '"end"', "eventType", "text", "globalTid", "domainId", "textId"],
    }
    if not valid:
        # Some tables or columns missing, as in exports of other versions or damaged ones.
        for table in list(tables)[1:]:
            if draw(st.integers(0, 4)) == 0:
                del tables[table]
            elif draw(st.integers(0, 4)) == 0:
                columns = tables[table]
                del columns[draw(st.integers(0, len(columns) - 1))]
    statements = [f'CREATE TABLE "{t}" ({", ".join(c)})' for t, c in tables.items()]
    statements += [("INSERT INTO StringIds VALUES (?, ?)", (i + 1, s)) for i, s in enumerate(strings)]
    kernels = []
    for _ in range(draw(st.integers(0, 12))):
        start = draw(st.integers(0, 10**6))
        row = [start, start + draw(st.integers(0, 10**4)), 0, 7, draw(st.integers(1, 20)), GLOBAL_TID & ~0xFFFFFF,
               draw(st.integers(1, len(strings))), 1]
        if not valid:
            row = [draw(sqlite_values) if draw(st.integers(0, 6)) == 0 else value for value in row]
        kernels.append(row)
    calls = []
    for _ in range(draw(st.integers(0, 8))):
        start = draw(st.integers(0, 10**6))
        row = [start, start + draw(st.integers(0, 500)), GLOBAL_TID, draw(st.integers(1, 20)), 1, 0]
        if not valid:
            row = [draw(sqlite_values) if draw(st.integers(0, 6)) == 0 else value for value in row]
        calls.append(row)
    ranges = []
    for index in range(draw(st.integers(0, 6))):
        start = draw(st.integers(0, 10**6))
        row = [start, start + draw(st.integers(0, 10**5)), 59, f"step {index}", GLOBAL_TID, 0, None]
        if not valid:
            row = [draw(sqlite_values) if draw(st.integers(0, 6)) == 0 else value for value in row]
        ranges.append(row)
    for table, rows in (("CUPTI_ACTIVITY_KIND_KERNEL", kernels), ("CUPTI_ACTIVITY_KIND_RUNTIME", calls),
                        ("NVTX_EVENTS", ranges)):
        if table in tables:
            width = len(tables[table])
            statements += [(f'INSERT INTO "{table}" VALUES ({", ".join("?" * width)})', tuple(row[:width]))
                           for row in rows]
    return statements, strings, kernels


def _build(scratch, statements):
    path = scratch / "trace.sqlite"
    path.unlink(missing_ok=True)
    connection = sqlite3.connect(path)
    for statement in statements:
        if isinstance(statement, tuple):
            connection.execute(*statement)
        else:
            connection.execute(statement)
    connection.commit()
    connection.close()
    return path


@FILES
@given(database=nsys_database(valid=False))
def test_nsys_reader_never_crashes(scratch, database):
    statements, _, _ = database
    path = _build(scratch, statements)
    try:
        model = read_nsys(str(path))
    except TraceInputError as error:
        assert "\n" not in str(error)
        return
    assert_model_ok(model)
    assert_analyzable(model)


@FILES
@given(database=nsys_database(valid=True))
def test_nsys_reader_reads_what_was_written(scratch, database):
    statements, strings, kernels = database
    path = _build(scratch, statements)
    model = read_nsys(str(path))
    assert_model_ok(model)
    read = model.intervals.filter(pl.col("kind") == "kernel")
    expected = sorted(
        (start, end, strings[short - 1].replace("\x1b", "\ufffd")) for start, end, *_, short, _ in kernels
    )
    assert sorted(read.select("start_ns", "end_ns", "name").iter_rows()) == expected
    assert_analyzable(model)


# -- every renderer accepts every value the JSON contract allows (issue #16) ----------------------

from dataclasses import replace  # noqa: E402
from io import StringIO  # noqa: E402

from traceinsight.errors import check_finite, check_rank_bounds, printable  # noqa: E402

HOSTILE_TEXT = st.lists(st.sampled_from(list("ab [/]\n\r\t\x1b\x07\u2028\u0085é") + ["traceinsight: error: "]),
                        max_size=12).map("".join)


@pytest.fixture(scope="module")
def two_rank_analysis():
    from conftest import SAMPLE_TRACES

    from traceinsight.analysis.pipeline import analyze
    from traceinsight.ingest import load

    model = load(sorted((SAMPLE_TRACES / "moe_2rank_nsys").glob("rank*.sqlite")))
    return model, analyze(model)


#: Trace text as it reaches findings: the readers replace ESC, CR and the other controls,
#: but keep newlines and tabs (and Unicode separators).
READ_TEXT = st.lists(st.sampled_from(list("ab [/]\n\t\u2028é") + ["traceinsight: error: "]), max_size=12).map("".join)

#: A ``waits`` entry as the JSON contract allows it: ``step`` is null for a collective outside
#: every step window; ``phase`` and ``collective`` may be null; names are untrusted text.
wait_entry = st.fixed_dictionaries({
    "step": st.one_of(st.none(), st.integers(0, 40)),
    "rank": st.integers(0, 1),
    "waiting_for_rank": st.integers(0, 1),
    "phase": st.one_of(st.none(), READ_TEXT),
    "collective": st.one_of(st.none(), READ_TEXT),
    "wait_ms": st.floats(0, 1e4),
    "transfer_ms": st.floats(0, 1e3),
    "key": st.one_of(st.none(), st.integers(0, 10**6).map(str)),
    "start_ns": st.one_of(st.none(), st.integers(0, 2**60)),
})


# Each example draws the whole HTML report (seconds): a few varied examples, and the fixed
# real case below, keep the suite short.
@settings(max_examples=5, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(waits=st.lists(wait_entry, max_size=12), null_steps_only=st.booleans())
def test_every_renderer_accepts_waits_the_contract_allows(two_rank_analysis, waits, null_steps_only):
    from rich.console import Console

    from traceinsight.report.html import render_html
    from traceinsight.report.json_report import render_json
    from traceinsight.report.terminal import render_findings

    model, findings = two_rank_analysis
    if null_steps_only:
        waits = [{**wait, "step": None} for wait in waits]
    changed = replace(findings, waits=pl.DataFrame(waits, schema=WAIT_SCHEMA))
    html = render_html(changed, {})
    assert '<section id="waits"' in html or not waits
    assert json.loads(render_json(changed))["waits"] == json.loads(json.dumps(waits))
    out = StringIO()
    render_findings(changed, Console(file=out, width=200, color_system=None))
    for line in out.getvalue().splitlines():  # a name may show the text in a cell, never start a line with it
        assert not line.startswith("traceinsight: error: ")
        assert "\x1b" not in line and "\x07" not in line


def test_html_of_a_real_pair_with_waits_outside_every_step(two_rank_analysis):
    # The users' case: like moe_2rank_nsys, with 36 of the waits outside every step window.
    from traceinsight.report.html import render_html

    model, findings = two_rank_analysis
    assert len(wait_records(findings.waits)) > 36
    waits = [{**wait, "step": None} if index % 8 == 0 else wait for index, wait in enumerate(wait_records(findings.waits))]
    html = render_html(replace(findings, waits=pl.DataFrame(waits, schema=WAIT_SCHEMA)), {})
    assert 'id="waits"' in html


@FAST
@given(st.text(max_size=40) | HOSTILE_TEXT)
def test_printable_text_is_one_line_without_controls(text):
    from rich.console import Console

    from traceinsight.report.terminal import plain, plain_paragraph

    shown = printable(text)
    assert len(shown.splitlines()) <= 1 and "\x1b" not in shown and "\t" not in shown
    assert len(shown) == len(text)  # replaced one for one, nothing hidden
    for cell in (plain(text), plain_paragraph(text)):
        out = StringIO()
        Console(file=out, width=500, color_system=None).print(cell)
        assert out.getvalue().count("\n") == 1


@FAST
@given(st.floats(allow_nan=True, allow_infinity=True))
def test_number_options_accept_exactly_the_finite_numbers(value):
    import math

    if math.isfinite(value):
        check_finite(value, option="--x", example="1")
    else:
        with pytest.raises(TraceInputError, match="is not a finite number"):
            check_finite(value, option="--x", example="1")


@FAST
@given(st.integers(0, 2**40), st.integers(0, 2**40), st.integers(0, 10**6))
def test_rank_bounds_are_checked_before_any_list_is_built(first, length, already):
    last = first + length
    ok = last <= 2**31 - 1 and already + last - first + 1 <= 1_000_000
    if ok:
        check_rank_bounds(first, last, text="x", already=already)
    else:
        with pytest.raises(TraceInputError):
            check_rank_bounds(first, last, text="x", already=already)


# -- steps of rows: assign_to_steps against the window definition ---------------------------------

@st.composite
def rows_and_windows(draw):
    """Rows (rank, time, possibly null) and step windows per rank, windows that may overlap,
    share a start, lack an end, or sit on a rank no row has."""
    window_rows = draw(st.lists(st.tuples(
        st.sampled_from([0, 1, 2, None]), st.integers(0, 9), st.one_of(st.none(), st.integers(0, GRID)),
        st.integers(0, GRID)).map(lambda w: (w[0], w[1], w[2], None if w[2] is None else w[2] + w[3] // 4)),
        max_size=8))
    steps = pl.DataFrame(window_rows, schema={"rank": pl.Int32, "step": pl.Int64, "start_ns": pl.Int64,
                                              "end_ns": pl.Int64}, orient="row")
    steps = steps.with_columns(end_ns=pl.when(pl.col("rank") == 2).then(None).otherwise(pl.col("end_ns")))
    frame_rows = draw(st.lists(st.tuples(st.sampled_from([0, 1, 3, None]),
                                         st.one_of(st.none(), st.integers(-2, GRID + 2))), max_size=25))
    frame = pl.DataFrame(frame_rows, schema={"rank": pl.Int32, "t": pl.Int64}, orient="row").with_row_index("row")
    return frame, steps


@FAST
@given(rows_and_windows())
def test_assign_to_steps_is_the_backward_as_of_window(case):
    from traceinsight.analysis.step_table import assign_to_steps

    frame, steps = case
    # The definition: among the windows of the row's rank that start at or before it (in
    # start order, the steps' own order among equal starts), the last; its step if the row
    # is before that window's end.
    ordered = steps.with_row_index("_order").sort("start_ns", "_order", nulls_last=True).to_dicts()
    expected = {}
    for row in frame.iter_rows(named=True):
        before = [w for w in ordered if row["rank"] is not None and row["t"] is not None and w["rank"] == row["rank"]
                  and w["start_ns"] is not None and w["start_ns"] <= row["t"]]
        last = before[-1] if before else None
        inside = last is not None and last["end_ns"] is not None and row["t"] < last["end_ns"]
        expected[row["row"]] = last["step"] if inside else None
    result = assign_to_steps(frame, steps, time_column="t")
    assert result.columns == ["row", "rank", "t", "step"]
    assert result.get_column("row").to_list() == frame.sort("t", maintain_order=True).get_column("row").to_list()
    assert dict(result.select("row", "step").iter_rows()) == expected
