"""A per-file columnar cache of ingested models (Parquet), so a second run skips parsing.

An entry is keyed by the trace file's size, modification time and a content hash (BLAKE2 of
its first and last 4 MiB and its size: cheap for a 2 GB file, and it changes when the file
is rewritten in place), plus the traceinsight version and the model schema. An entry is a
folder holding ``intervals.parquet``, ``samples.parquet``, ``ranks.parquet`` and
``meta.json``; it is written to a temporary folder beside its final place and renamed into
place when complete, so a crash never leaves a half-written entry that a later run trusts.
``meta.json`` is written last and names the size and BLAKE2 digest of each Parquet file;
an entry whose files do not match it (cut short by a crash of the machine before the data
reached the disk, or damaged later) is dropped and the trace read again. A temporary
folder left by a killed run is removed by a later store once it is a day old; SIGTERM
removes it at once (see :func:`traceinsight.errors.exit_cleanly_on_sigterm`).

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

from traceinsight._version import __version__
from traceinsight.model import INTERVAL_SCHEMA, RANK_SCHEMA, SAMPLE_SCHEMA, TraceModel

#: Bump when the normalized model or a reader changes what it produces.
CACHE_FORMAT = 3  # 2: kernel names keep their namespace and template head; 3: entries verified by meta.json
_EDGE = 4 * 2**20
_PARTS = ("intervals", "samples", "ranks")
_STAGING_PREFIX = ".staging-"
#: A staging folder this old belongs to no running store: a killed run left it.
_STALE_STAGING_S = 24 * 3600


def _file_digest(path: str) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def default_cache_dir() -> str:
    """Where cache entries go unless ``--cache-dir`` says otherwise."""
    explicit = os.environ.get("TRACEINSIGHT_CACHE_DIR")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "traceinsight")


def cache_key(path: str, *, salvage: bool = False) -> str:
    """The entry name for ``path``: size, mtime, edge-content hash, versions, options."""
    stat = os.stat(path)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{stat.st_size}:{stat.st_mtime_ns}:{__version__}:{CACHE_FORMAT}:{salvage}".encode())
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
        files = meta["files"]
        for part in _PARTS:  # every file as it was written, or the entry is not trusted
            file_path = os.path.join(entry, f"{part}.parquet")
            expected = files[part]
            if os.path.getsize(file_path) != expected["size"] or _file_digest(file_path) != expected["blake2b"]:
                raise ValueError(f"cache entry file {part}.parquet does not match its meta.json")
        model = TraceModel(
            intervals=pl.read_parquet(os.path.join(entry, "intervals.parquet")),
            samples=pl.read_parquet(os.path.join(entry, "samples.parquet")),
            ranks=pl.read_parquet(os.path.join(entry, "ranks.parquet")),
            warnings=list(meta.get("warnings", [])),
        )
    except (OSError, ValueError, KeyError, TypeError, pl.exceptions.PolarsError):
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
        _remove_stale_staging(cache_dir)
        staging = tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=cache_dir)
        try:
            model.intervals.write_parquet(os.path.join(staging, "intervals.parquet"), compression="lz4")
            model.samples.write_parquet(os.path.join(staging, "samples.parquet"), compression="lz4")
            model.ranks.write_parquet(os.path.join(staging, "ranks.parquet"))
            files = {}
            for part in _PARTS:
                file_path = os.path.join(staging, f"{part}.parquet")
                _fsync(file_path)  # on disk before meta.json says it is complete
                files[part] = {"size": os.path.getsize(file_path), "blake2b": _file_digest(file_path)}
            meta = {"source": os.path.abspath(path), "warnings": model.warnings, "files": files}
            with open(os.path.join(staging, "meta.json"), "w", encoding="utf-8") as handle:
                json.dump(meta, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    except OSError:
        pass  # a read-only or full cache folder only costs speed


def _remove_stale_staging(cache_dir: str) -> None:
    """Remove staging folders that a killed run left (older than a day)."""
    import time

    try:
        names = [name for name in os.listdir(cache_dir) if name.startswith(_STAGING_PREFIX)]
    except OSError:
        return
    now = time.time()
    for name in names:
        folder = os.path.join(cache_dir, name)
        try:
            if now - os.stat(folder).st_mtime > _STALE_STAGING_S:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            pass
