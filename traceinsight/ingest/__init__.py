"""Readers that turn trace files into the normalized :class:`~traceinsight.model.TraceModel`.

One module per format; none of them knows about analyses or imports this package:

- :mod:`traceinsight.ingest.nsys`: Nsight Systems SQLite exports (``nsys export --type sqlite``)
- :mod:`traceinsight.ingest.kineto`: PyTorch profiler / Kineto Chrome-trace JSON (``.json[.gz]``)
- :mod:`traceinsight.ingest.merged`: files written by ``traceinsight merge``, split per rank
  and read by the Kineto reader

What the readers share are leaf modules: :mod:`~traceinsight.ingest.guard` (limits on
untrusted input), :mod:`~traceinsight.ingest.kernel_names` and :mod:`~traceinsight.ingest.ranks`.

:func:`load` picks the reader by content (:func:`~traceinsight.ingest.detect.detect_format`),
expands folders, and gives every process its own rank. Code outside ``ingest`` reaches the
readers through :func:`load` and :func:`read_file`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from traceinsight.errors import TraceInputError
from traceinsight.ingest.detect import KINETO_JSON, NSYS_SQLITE, detect_format
# rank_mapping and renumber are for the Ray engine, which renumbers the models its actors read.
from traceinsight.ingest.ranks import assign_ranks, rank_mapping, renumber  # noqa: F401
from traceinsight.model import TraceModel

_TRACE_SUFFIXES = (".sqlite", ".json", ".json.gz", ".sqlite3", ".db")


def _looks_like_trace(path: str) -> bool:
    """Cheap content check for files found in a folder: a SQLite file, or JSON whose first
    64 KiB mention trace events (answer keys and configs beside traces are skipped)."""
    try:
        fmt = detect_format(path)
    except TraceInputError:
        return False
    if fmt == NSYS_SQLITE:
        return True
    import gzip

    with open(path, "rb") as handle:
        opener = gzip.open if handle.read(2) == b"\x1f\x8b" else open
    try:
        with opener(path, "rb") as handle:
            head = handle.read(65536)
    except OSError:
        return True  # let the reader report what is wrong with it
    return b'"traceEvents"' in head or b'"ph"' in head


def expand_paths(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Expand folders into the trace files they hold (sorted), keep files as given.

    In a folder, JSON files that are not traces (answer keys, configs) are skipped.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[str] = []
    for raw in paths:
        path = os.fspath(raw)
        if os.path.isdir(path):
            found = sorted(
                os.path.join(path, name)
                for name in os.listdir(path)
                if name.endswith(_TRACE_SUFFIXES)
                and os.path.isfile(os.path.join(path, name))
                and _looks_like_trace(os.path.join(path, name))
            )
            if not found:
                raise TraceInputError(
                    "folder holds no trace files (*.sqlite, *.json, *.json.gz)", path=path
                )
            out.extend(found)
        else:
            out.append(path)
    if not out:
        raise TraceInputError("no trace files given")
    return out


def read_file(path: str, *, salvage: bool = False) -> TraceModel:
    """Read one trace file of either format into a model (ranks as the file tells them)."""
    fmt = detect_format(path)
    if fmt == NSYS_SQLITE:
        from traceinsight.ingest.nsys import read_nsys

        return read_nsys(path)
    assert fmt == KINETO_JSON
    from traceinsight.ingest import merged

    if merged.is_merged(_json_head(path)):
        return merged.load_merged(path)
    from traceinsight.ingest.kineto import read_kineto

    return read_kineto(path, salvage=salvage)


def _json_head(path: str, size: int = 4096) -> bytes:
    """The first bytes of a JSON trace, decompressed if it is gzip."""
    import gzip
    import zlib

    try:
        with open(path, "rb") as handle:
            if handle.read(2) != b"\x1f\x8b":
                handle.seek(0)
                return handle.read(size)
        with gzip.open(path, "rb") as handle:
            return handle.read(size)
    except (OSError, EOFError, zlib.error):
        return b""  # the reader reports what is wrong with the file


def _read_one(path: str, salvage: bool, cache_dir: str | None) -> TraceModel:
    """Read one file, through the cache when ``cache_dir`` is set (runs in worker processes)."""
    if cache_dir:
        from traceinsight.ingest import cache

        detect_format(path)  # a missing or foreign file is told as such, before any cache key

        model = cache.load_cached(path, cache_dir, salvage=salvage)
        if model is not None:
            return model
        model = read_file(path, salvage=salvage)
        cache.store(path, model, cache_dir, salvage=salvage)
        return model
    return read_file(path, salvage=salvage)


def read_files(
    paths: list[str],
    *,
    salvage: bool = False,
    cache_dir: str | None = None,
    jobs: int = 1,
    on_done: Callable[[str], None] | None = None,
) -> list[TraceModel]:
    """Read files in order, ``jobs`` at a time in worker processes.

    ``on_done(path)`` is called as each file finishes (for progress bars).
    """
    jobs = max(1, min(jobs, len(paths)))
    if jobs == 1:
        models = []
        for path in paths:
            models.append(_read_one(path, salvage, cache_dir))
            if on_done:
                on_done(path)
        return models
    import concurrent.futures
    import multiprocessing

    # fork would copy whatever the parent holds; spawn starts clean workers.
    context = multiprocessing.get_context("spawn")
    from traceinsight.errors import exit_cleanly_on_sigterm

    # Workers end on SIGTERM as the parent does: a cache entry being written is removed.
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context,
                                                initializer=exit_cleanly_on_sigterm) as pool:
        futures = {pool.submit(_read_one, path, salvage, cache_dir): index for index, path in enumerate(paths)}
        results: list[TraceModel | None] = [None] * len(paths)
        for future in concurrent.futures.as_completed(futures):
            index = futures[future]
            results[index] = future.result()
            if on_done:
                on_done(paths[index])
    return results  # type: ignore[return-value]


def load(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    salvage: bool = False,
    cache_dir: str | None = None,
    jobs: int = 1,
    on_done: Callable[[str], None] | None = None,
) -> TraceModel:
    """Read trace files (or folders of them) into one model.

    Parameters
    ----------
    paths
        One path or several: nsys SQLite exports and/or Kineto JSON traces, one per rank, or
        folders holding them.
    salvage
        Read a Kineto trace cut short mid-write up to its last complete event.
    cache_dir
        Keep a columnar copy of each file's model there and reuse it while the file is
        unchanged (see :mod:`traceinsight.ingest.cache`); ``None`` reads every file.
    jobs
        Files read at once, each in its own process.
    on_done
        Called with each path as it finishes.

    Examples
    --------
    >>> import traceinsight
    >>> model = traceinsight.load(["rank0.json.gz", "rank1.json.gz"])  # doctest: +SKIP
    >>> model.rank_ids  # doctest: +SKIP
    [0, 1]
    """
    models = read_files(expand_paths(paths), salvage=salvage, cache_dir=cache_dir, jobs=jobs, on_done=on_done)
    return TraceModel.concat(assign_ranks(models))
