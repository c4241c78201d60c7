"""An analysis that owns its model (``free_model``) finds exactly what one that leaves it alone
does, and empties the model; the memory-saving paths of the range instances agree with the
plain ones."""

from __future__ import annotations

import dataclasses

import polars as pl
import pytest
from click.testing import CliRunner

from conftest import SAMPLE_TRACES
from traceinsight.analysis import findings_cache
from traceinsight.analysis.analyzers import range_instances as range_instances_module
from traceinsight.analysis.analyzers.range_instances import range_instances
from traceinsight.analysis.engine import analyze_model
from traceinsight.analysis.options import Options
from traceinsight.analysis.step_table import assign_to_steps
from traceinsight.cli import main
from traceinsight.ingest import expand_paths, load
from traceinsight.model import INTERVAL_SCHEMA, SAMPLE_SCHEMA

SETS = {
    "nsys, one rank": str(SAMPLE_TRACES / "moe_single_nsys.sqlite"),
    "kineto, two ranks": str(SAMPLE_TRACES / "moe_2rank"),
    "kineto, eight ranks": str(SAMPLE_TRACES / "moe_nrank_8rank_gloo_1gpu"),
}


@pytest.mark.parametrize("label", SETS)
def test_freeing_the_model_changes_no_finding_and_empties_it(label):
    paths = expand_paths(SETS[label])
    kept_model = load(paths)
    kept = analyze_model(kept_model, Options())
    owned_model = load(paths)
    ranks = owned_model.ranks
    owned = analyze_model(owned_model, Options(), free_model=True)
    for field in dataclasses.fields(kept):
        assert findings_cache._same(getattr(kept, field.name), getattr(owned, field.name)), field.name
    assert kept_model.intervals.height > 0  # left alone without free_model
    assert owned_model.intervals.height == 0 and owned_model.samples.height == 0
    assert dict(owned_model.intervals.schema) == INTERVAL_SCHEMA
    assert dict(owned_model.samples.schema) == SAMPLE_SCHEMA
    assert owned_model.ranks.equals(ranks)


def test_no_cache_analyze_writes_the_same_json_as_a_cached_one(tmp_path):
    # --no-cache frees the model during the analysis; with a cache it is kept for the timelines.
    path = SETS["kineto, two ranks"]
    runner = CliRunner()
    cached = runner.invoke(main, ["--cache-dir", str(tmp_path), "analyze", path, "-q", "--json", "-"])
    uncached = runner.invoke(main, ["--no-cache", "analyze", path, "-q", "--json", "-"])
    assert cached.exit_code == 0 and uncached.exit_code == 0, cached.output + uncached.output
    assert cached.output == uncached.output


def test_range_instances_are_the_same_filled_a_few_rows_at_a_time(monkeypatch):
    model = load(expand_paths(SETS["kineto, two ranks"]))
    whole = range_instances(model)
    monkeypatch.setattr(range_instances_module, "_BLOCK_ROWS", 3)
    assert range_instances(model).equals(whole)
    assert whole.height > 3 * 10
    # In (rank, start) order, each thread's instances in the order the model holds them.
    assert whole.select("rank", "start_ns").equals(whole.select("rank", "start_ns").sort("rank", "start_ns"))


def test_assigning_steps_to_sorted_rows_equals_sorting_them_first():
    steps = pl.DataFrame({"rank": [0, 0], "step": [1, 2], "start_ns": [0, 100], "end_ns": [100, 200]},
                         schema_overrides={"rank": pl.Int32})
    rows = pl.DataFrame({"rank": [0] * 5, "start_ns": [5, 50, 50, 150, 250], "tag": list("abcde")},
                        schema_overrides={"rank": pl.Int32})
    sorted_in = assign_to_steps(rows, steps)
    shuffled_in = assign_to_steps(rows.reverse(), steps)
    assert sorted_in.get_column("step").to_list() == [1, 1, 1, 2, None]
    assert shuffled_in.sort("start_ns", "tag").equals(sorted_in.sort("start_ns", "tag"))


def test_places_answer_the_same_after_dropping_their_caches():
    from traceinsight.analysis.places import Places

    findings = analyze_model(load(expand_paths(SETS["nsys, one rank"])), Options())
    places = Places.from_frames(findings.steps, findings.range_instances, findings.gpu, place_cpu=findings.place_cpu,
                                place_gpu=findings.place_gpu, place_tree=findings.place_tree)
    flagged = findings.steps.filter(pl.col("anomalous"))
    assert flagged.height
    rank, step = flagged.row(0, named=True)["rank"], flagged.row(0, named=True)["step"]
    normal = findings.steps.filter(~pl.col("anomalous")).get_column("step").to_list()
    nodes = pl.Series(range(min(50, places.tree.frame.height))).to_numpy()

    def answers():
        return (places.step_places(rank, step, normal, excess_ns=5e6, label="step"), places.tree.keys(nodes).to_list())

    before = answers()
    assert places._totals and places.tree._paths is not None  # what is dropped was there
    places.drop_caches()
    assert not places._totals and places.tree._paths is None
    assert answers() == before
