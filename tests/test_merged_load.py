"""A file written by ``traceinsight merge`` reads back through the ordinary ``load`` path."""

from __future__ import annotations

from click.testing import CliRunner

from conftest import SAMPLE_TRACES
import traceinsight
from traceinsight.analysis.pipeline import analyze
from traceinsight.cli import main
from traceinsight.report.records import wait_records


def test_merged_file_loads_as_its_ranks_with_the_same_waits(tmp_path):
    merged = tmp_path / "merged.json.gz"
    result = CliRunner().invoke(main, ["merge", str(SAMPLE_TRACES / "moe_2rank"), "-o", str(merged)])
    assert result.exit_code == 0, result.output
    direct = analyze(traceinsight.load(SAMPLE_TRACES / "moe_2rank"))
    again = analyze(traceinsight.load(merged))
    assert again.ranks.get_column("rank").to_list() == [0, 1]
    assert again.steps.select("rank", "step").rows() == direct.steps.select("rank", "step").rows()
    before = sorted((w["step"], w["rank"], w["key"], w["wait_ms"]) for w in wait_records(direct.waits))
    after = sorted((w["step"], w["rank"], w["key"], w["wait_ms"]) for w in wait_records(again.waits))
    assert len(after) == len(before)
    assert all(a[:3] == b[:3] and abs(a[3] - b[3]) <= 0.001 for a, b in zip(after, before))
