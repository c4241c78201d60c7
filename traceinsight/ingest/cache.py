"""A per-file columnar cache of ingested models (Parquet), so a second run skips parsing.

An entry is keyed by the trace file's size, modification time and a content hash (BLAKE2 of
its first and last 4 MiB and its size: cheap for a 2 GB file, and it changes when the file
is rewritten in place), plus the traceinsight version and the model schema. An entry is a
folder holding ``intervals.parquet``, ``samples.parquet``, ``ranks.parquet`` and
``meta.json``; it is written to a temporary folder beside its final place and renamed into
place when complete, so a crash never leaves a half-written entry that a later run trusts.

The default location is ``$TRACEINSIGHT_CACHE_DIR``, else ``$XDG_CACHE_HOME/traceinsight``,
else ``~/.cache/traceinsight``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

import polars as pl

from traceinsight.model import INTERVAL_SCHEMA, RANK_SCHEMA, SAMPLE_SCHEMA, TraceModel

#: Bump when the normalized model or a reader changes what it produces.
CACHE_FORMAT = 2  # 2: kernel names keep their namespace and template head
_EDGE = 4 * 2**20


def default_cache_dir() -> str:
    """Where cache entries go unless ``--cache-dir`` says otherwise."""
    explicit = os.environ.get("TRACEINSIGHT_CACHE_DIR")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "traceinsight")


def cache_key(path: str, *, salvage: bool = False) -> str:
    """The entry name for ``path``: size, mtime, edge-content hash, versions, options."""
    import traceinsight

    stat = os.stat(path)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{stat.st_size}:{stat.st_mtime_ns}:{traceinsight.__version__}:{CACHE_FORMAT}:{salvage}".encode())
    schema = ",".join(f"{k}={v}" for k, v in {**INTERVAL_SCHEMA, **SAMPLE_SCHEMA, **RANK_SCHEMA}.items())
    digest.update(schema.encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(_EDGE))
        if stat.st_size > 2 * _EDGE:
            handle.seek(-_EDGE, os.SEEK_END)
            digest.update(handle.read(_EDGE))
    return digest.hexdigest()


def load_cached(path: str, cache_dir: str, *, salvage: bool = False) -> TraceModel | None:
    """The cached model of ``path``, or ``None`` when there is no valid entry."""
    entry = os.path.join(cache_dir, cache_key(path, salvage=salvage))
    meta_path = os.path.join(entry, "meta.json")
    if not os.path.exists(meta_path):
        return None
    try:
        with open(meta_path, encoding="utf-8") as handle:
            meta = json.load(handle)
        model = TraceModel(
            intervals=pl.read_parquet(os.path.join(entry, "intervals.parquet")),
            samples=pl.read_parquet(os.path.join(entry, "samples.parquet")),
            ranks=pl.read_parquet(os.path.join(entry, "ranks.parquet")),
            warnings=list(meta.get("warnings", [])),
        )
    except (OSError, ValueError, pl.exceptions.PolarsError):
        shutil.rmtree(entry, ignore_errors=True)  # a damaged entry is dropped and rewritten
        return None
    # The same bytes may sit at another path now: report the path the user gave.
    model.ranks = model.ranks.with_columns(source=pl.lit(path))
    return model


def store(path: str, model: TraceModel, cache_dir: str, *, salvage: bool = False) -> None:
    """Write ``model`` as the entry of ``path``; failures to cache never fail the run."""
    try:
        os.makedirs(cache_dir, exist_ok=True)
        final = os.path.join(cache_dir, cache_key(path, salvage=salvage))
        if os.path.exists(final):
            return
        staging = tempfile.mkdtemp(prefix=".staging-", dir=cache_dir)
        try:
            model.intervals.write_parquet(os.path.join(staging, "intervals.parquet"), compression="lz4")
            model.samples.write_parquet(os.path.join(staging, "samples.parquet"), compression="lz4")
            model.ranks.write_parquet(os.path.join(staging, "ranks.parquet"))
            with open(os.path.join(staging, "meta.json"), "w", encoding="utf-8") as handle:
                json.dump({"source": os.path.abspath(path), "warnings": model.warnings}, handle)
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    except OSError:
        pass  # a read-only or full cache folder only costs speed
