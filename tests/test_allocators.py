"""traceinsight makes freed memory go back to the OS at once (see traceinsight/_allocators.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from traceinsight import _allocators

# A child process: the settings only take effect before polars is first imported.
_FREE_AND_MEASURE = """
import {first}
import polars as pl
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 // (1 << 20)
before = rss()
column = pl.int_range(40_000_000, eager=True) * 2  # about 320 MB, then freed
del column
print(os.environ.get("_RJEM_MALLOC_CONF"), rss() - before)
"""


def _run(first: str, **env_changes: str | None) -> tuple[str, int]:
    env = dict(os.environ)
    env.pop("_RJEM_MALLOC_CONF", None)
    env.update({key: value for key, value in env_changes.items() if value is not None})
    code = "import os\n" + _FREE_AND_MEASURE.format(first=first)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    conf, grown = out.stdout.split()
    return conf, int(grown)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_freed_polars_memory_is_returned_at_once_after_importing_traceinsight():
    conf, grown = _run("traceinsight")
    # polars puts its own defaults first when it loads; jemalloc takes the last of each.
    assert conf.endswith(_allocators.JEMALLOC_CONF)
    assert grown < 100, f"{grown} MB still resident after freeing 320 MB"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_users_jemalloc_settings_win():
    # A user who wants freed pages kept for 10 s gets that: the memory stays resident (which
    # also shows the measurement above sees the setting, not an accident of the allocator).
    user = "dirty_decay_ms:10000,muzzy_decay_ms:10000"
    conf, grown = _run("traceinsight", _RJEM_MALLOC_CONF=user)
    assert conf.endswith(user) and _allocators.JEMALLOC_CONF not in conf
    assert grown > 200
