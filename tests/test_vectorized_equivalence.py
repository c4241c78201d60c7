"""The whole-frame versions of per-name and per-group work give what the plain versions gave."""

from __future__ import annotations

import numpy as np
import polars as pl

import traceinsight
from conftest import SAMPLE_TRACES
from traceinsight.analysis.analyzers.range_instances import range_instances
from traceinsight.analysis.classify import cause_of_name, range_group_expr
from traceinsight.analysis.places import PATH_SEPARATOR, RangeTree
from traceinsight.analysis.analyzers.cpu_gap_causes import _weights_from_intervals
from traceinsight.analysis.analyzers.range_statistics import range_statistics

NAMES = [
    "malloc", "MALLOC", "free", "_int_malloc", "mmap64", "futex", "pthread_mutex_lock", "nanosleep",
    "cudaLaunchKernel", "cuLaunchKernelEx", "aten::view", "aten::mm, seq = 12, op_id = 40, sizes = [[2, 3]]",
    "aten::mm", "aten::empty", "aten::zeros", "gc_collect_main", "dict_traverse", "x_traverse_y",
    "PyEval_EvalFrame", "train.py(12): step", "layer0 attention", "step 3", "", "read", "reads",
    "malloc\n", "free\n", "ſelect", "ſleep", "K\u212aelvin", "aten::t", "aten::T", "cudaMalloc",
    "cudaMallocAsync", "python3.11", "threading.py(300): wait", "__memset_avx2", "\tfutex",
]


def _hits(names: list[str]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """One gap per name, overlapped by one item of that name on the same thread."""
    n = len(names)
    starts = np.arange(n, dtype=np.int64) * 1_000
    gaps = pl.DataFrame({
        "rank": [0] * n, "pid": [1] * n, "tid": [1] * n, "start_ns": starts, "end_ns": starts + 500,
    }).with_row_index("gap_id").with_columns(duration_ns=pl.lit(500, pl.Int64))
    items = pl.DataFrame({
        "rank": pl.Series([0] * n, dtype=pl.Int32), "pid": [1] * n, "tid": [1] * n,
        "start_ns": starts + 100, "end_ns": starts + 400, "name": pl.Series(names, dtype=pl.String),
        "kind": ["cpu_op"] * n, "depth": pl.Series([0] * n, dtype=pl.Int32),
    })
    return gaps, items


def test_names_get_the_cause_cause_of_name_gives():
    for default in (None, "unknown", "python"):
        names = NAMES + [None]
        gaps, items = _hits(names)
        weights = _weights_from_intervals(gaps, items, source="ops", deepest_only=False, default_cause=default)
        got = dict(weights.select("gap_id", "cause").iter_rows())
        for gap_id, name in enumerate(names):
            expected = cause_of_name(name) or default
            assert got.get(gap_id) == expected, (name, default)


def _plain_statistics(instances: pl.DataFrame) -> pl.DataFrame:
    ms = 1e-6
    return (
        instances.group_by("rank", "name")
        .agg(
            count=pl.len(),
            total_ms=pl.col("duration_ns").sum() * ms,
            mean_ms=pl.col("duration_ns").mean() * ms,
            p50_ms=pl.col("duration_ns").quantile(0.5, interpolation="linear") * ms,
            p90_ms=pl.col("duration_ns").quantile(0.9, interpolation="linear") * ms,
            p99_ms=pl.col("duration_ns").quantile(0.99, interpolation="linear") * ms,
            max_ms=pl.col("duration_ns").max() * ms,
            lag_p50_ms=pl.col("first_gpu_lag_ns").quantile(0.5, interpolation="linear") * ms,
            lag_max_ms=pl.col("first_gpu_lag_ns").max() * ms,
            gpu_ms_mean=pl.col("gpu_ns").mean() * ms,
            launches_mean=pl.col("launches").mean(),
        )
        .sort(["total_ms", "rank", "name"], descending=[True, False, False])
    )


def test_range_statistics_equal_the_group_by():
    rng = np.random.default_rng(3)
    n = 5_000
    names = [f"op {i}" for i in rng.integers(0, 3_000, n)]  # many once, some many times
    lag = rng.integers(0, 10**7, n)
    instances = pl.DataFrame({
        "rank": pl.Series(rng.integers(0, 2, n), dtype=pl.Int32),
        "name": names,
        "duration_ns": rng.integers(1, 10**9, n),
        "first_gpu_lag_ns": pl.Series([None if v % 3 == 0 else int(v) for v in lag], dtype=pl.Int64),
        "gpu_ns": rng.integers(0, 10**8, n),
        "launches": rng.integers(0, 9, n),
        "extra": ["x"] * n,
    })
    assert range_statistics(instances).equals(_plain_statistics(instances))
    assert range_statistics(instances.head(0)).schema == _plain_statistics(instances.head(0)).schema


PHASE_NAMES = NAMES + [
    "MoE dispatch", "DeepEP COMBINE", "layer3 Attention", "FlashAttnFunc", "GroupedLinear.forward", "moe_mlp",
    "FFN", "mLp", "expert_7", "ATTENTİON", "attentıon", "\u212aexpert", "EXPERT\u0130", "dispatchcombine",
    "combined attention", "grouped dispatch", None,
]


def test_phase_expr_classifies_as_phase_class():
    # The Aho-Corasick search with ASCII case folding must give what Python's lower() and
    # `in` give, Unicode letters that fold to ASCII ones included.
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from traceinsight.analysis.classify import PHASE_WORDS, phase_class, phase_expr, phase_word_expr

    def check(names):
        frame = pl.DataFrame({"name": pl.Series(names, dtype=pl.String)})
        got = frame.select(phase_expr()).to_series().to_list()
        assert got == [phase_class(name) for name in names]
        # the one-pass prefilter keeps every name that has a phase (it may keep more)
        kept = frame.select(phase_word_expr()).to_series().fill_null(False).to_list()
        assert all(keep for keep, phase in zip(kept, got) if phase is not None)

    check(PHASE_NAMES)
    words = [word for _, group in PHASE_WORDS for word in group]
    pieces = st.sampled_from(words + [w.upper() for w in words] + ["İ", "ı", "\u212a", "ſ", "_", " ", "é", "ß"])

    @settings(max_examples=200, deadline=None, database=None)
    @given(st.lists(st.lists(pieces, max_size=4).map("".join) | st.text(max_size=12), max_size=20))
    def random_names(names):
        check(names)

    random_names()


def test_range_tree_keys_equal_the_paths_walked_node_by_node():
    """Paths numbered once per distinct (parent path, name) read back as the names walked
    up the parent chain, on real emit_nvtx ranges (many nodes, few distinct paths)."""
    model = traceinsight.load(SAMPLE_TRACES / "dense_nsys")
    instances = range_instances(model).with_columns(name=range_group_expr())
    tree = RangeTree(instances)
    assert tree.frame.height > 1000 and tree.max_depth >= 2
    nodes = np.arange(-1, tree.frame.height, dtype=np.int64)
    keys = tree.keys(nodes).to_list()
    walked = [""] + [PATH_SEPARATOR.join(tree.path(int(node))) for node in nodes[1:]]
    assert keys == walked
    distinct = tree._all_paths()[1]
    assert distinct.len() == len(set(walked) - {""}) < tree.frame.height / 2
    tree.drop_paths()
    assert tree.keys(nodes[::-1]).to_list() == walked[::-1]  # built again, same answers


def test_range_instances_of_rows_out_of_order_equal_those_of_the_sorted_model():
    """The annotations are taken without a sort where the model is in (rank, start) order,
    as the readers leave it; rows in any other order are sorted first, to the same result."""
    model = traceinsight.load(SAMPLE_TRACES / "dense_nsys")
    plain = range_instances(model)
    assert plain.height > 1000
    model.intervals = model.intervals.sample(fraction=1.0, shuffle=True, seed=7)
    shuffled = range_instances(model)
    key = ["rank", "start_ns", "pid", "tid", "depth", "name"]
    assert shuffled.sort(key).equals(plain.sort(key))
    assert shuffled.get_column("start_ns").is_sorted()


def test_range_instances_that_free_the_model_equal_those_that_keep_it():
    model = traceinsight.load(SAMPLE_TRACES / "dense_nsys")
    plain = range_instances(model)
    freed = range_instances(model, free_model=True)
    assert freed.equals(plain)
    assert model.intervals.is_empty() and model.samples.is_empty()


def test_intervals_stacked_a_column_at_a_time_equal_the_whole_frame_concat():
    from traceinsight.ingest.nsys import _conformed, _stacked
    from traceinsight.model import INTERVAL_SCHEMA

    # Tables as the reader decodes them: each its own columns, some in other types than the
    # model's (an Int32 rank, a text id read as a string), some empty, one column nobody has.
    parts = [
        pl.DataFrame({"rank": pl.Series([0, 0], dtype=pl.Int32), "kind": ["kernel", "kernel"], "name": ["a", "b"],
                      "start_ns": [5, 1], "end_ns": [6, 2], "stream": [7, 7], "_proc": [1, 1]}),
        pl.DataFrame({"rank": pl.Series([], dtype=pl.Int32), "kind": pl.Series([], dtype=pl.String),
                      "start_ns": pl.Series([], dtype=pl.Int64), "end_ns": pl.Series([], dtype=pl.Int64)}),
        pl.DataFrame({"rank": pl.Series([1, None, 0], dtype=pl.Int32), "kind": ["annotation"] * 3,
                      "name": ["x", None, "y" * 40], "start_ns": [3, 4, 0], "end_ns": [9, None, 1],
                      "tid": ["12", "13", "x"], "domain": ["d", None, None], "_proc": [1, 2, 1]}),
    ]
    expected = _conformed(pl.concat(parts, how="diagonal_relaxed"), INTERVAL_SCHEMA)
    stacked = _stacked(list(parts), INTERVAL_SCHEMA)
    assert stacked.schema == expected.schema and stacked.equals(expected)
    assert stacked.height == 5 and stacked.get_column("tid").to_list() == [None, None, 12, 13, None]


def test_an_nsys_model_has_every_column_in_one_piece():
    # The reader makes each column whole as it stacks the tables (and the sort's gather
    # keeps it so): a column in pieces is copied whole by the first operation that needs it so.
    # moe_single_nsys has CPU samples; dense_nsys a column null in every row that two tables
    # have (the NVTX domain: no named domain), which the sort does not gather.
    for name in ("moe_single_nsys.sqlite", "dense_nsys/trace.sqlite"):
        model = traceinsight.load(SAMPLE_TRACES / name)
        assert model.intervals.height and model.samples.height
        for frame in (model.intervals, model.samples):
            assert {column.name: column.n_chunks() for column in frame.get_columns() if column.n_chunks() > 1} == {}
