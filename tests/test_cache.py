"""The per-file cache and parallel reading give exactly the results of a fresh serial read."""

from __future__ import annotations

import os
import shutil

from click.testing import CliRunner

from conftest import SAMPLE_TRACES
from traceinsight.cli import main
from traceinsight.ingest import cache, load


def _analyze(*args) -> bytes:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.output.encode()


def test_cached_findings_equal_fresh_ones_and_output_is_deterministic(tmp_path):
    folder = str(SAMPLE_TRACES / "moe_2rank")
    cache_dir = str(tmp_path / "cache")
    fresh = _analyze("--no-cache", "analyze", folder, "--json", "-")
    again = _analyze("--no-cache", "analyze", folder, "--json", "-")
    assert fresh == again
    first = _analyze("--cache-dir", cache_dir, "analyze", folder, "--json", "-")
    assert len(os.listdir(cache_dir)) == 2  # one entry per rank file
    second = _analyze("--cache-dir", cache_dir, "analyze", folder, "--json", "-")
    assert fresh == first == second


def test_no_cache_writes_nothing_and_a_changed_file_misses(tmp_path):
    trace = tmp_path / "t.sqlite"
    shutil.copy(SAMPLE_TRACES / "moe_single_nsys.sqlite", trace)
    cache_dir = tmp_path / "cache"
    _analyze("--cache-dir", str(cache_dir), "--no-cache", "analyze", str(trace), "--quiet")
    assert not cache_dir.exists()
    model = load(str(trace), cache_dir=str(cache_dir))
    key = cache.cache_key(str(trace))
    assert cache.load_cached(str(trace), str(cache_dir)).intervals.equals(model.intervals)
    os.utime(trace, ns=(1, 1))  # touched: size, mtime or content differ -> another key
    assert cache.cache_key(str(trace)) != key
    assert cache.load_cached(str(trace), str(cache_dir)) is None


def test_a_damaged_entry_is_ignored(tmp_path):
    trace = str(SAMPLE_TRACES / "moe_2rank" / "rank0.json.gz")
    cache_dir = str(tmp_path)
    model = load(trace, cache_dir=cache_dir)
    entry = os.path.join(cache_dir, cache.cache_key(trace))
    with open(os.path.join(entry, "intervals.parquet"), "wb") as handle:
        handle.write(b"not parquet")
    assert cache.load_cached(trace, cache_dir) is None
    assert load(trace, cache_dir=cache_dir).intervals.equals(model.intervals)
    assert cache.load_cached(trace, cache_dir).intervals.equals(model.intervals)  # rewritten


def test_parallel_reading_equals_serial():
    paths = [str(SAMPLE_TRACES / "moe_2rank" / f"rank{r}.json.gz") for r in (0, 1)]
    serial = load(paths, jobs=1)
    parallel = load(paths, jobs=2)
    assert parallel.intervals.equals(serial.intervals)
    assert parallel.ranks.equals(serial.ranks)
