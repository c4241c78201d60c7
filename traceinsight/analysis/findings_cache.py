"""Findings kept beside the parsed-model cache, so a second question needs no analysis.

``traceinsight analyze`` stores what it found; a later ``analyze`` (say with ``--html``),
``explain`` or ``diff`` of the same files with the same options reads it back instead of
analyzing again (and without loading the model, unless the HTML timelines are missing).

An entry is keyed by

- the model cache key of every input file, in order (:func:`traceinsight.ingest.cache.cache_key`:
  size, mtime and a hash of the file's first and last 4 MiB, the version, ``--salvage``);
- the analysis options (:class:`~traceinsight.analysis.options.Options`, by its ``repr``);
- the package version and a hash of the package's source files other than the renderers,
  so that any change to the code that computes findings invalidates every entry.

An entry is a folder ``findings-<key>`` inside the model cache entry of the first input file
(so it goes when that entry goes): every polars frame of the findings as an Arrow IPC file
(types and values exactly as they were), and ``findings.json`` with the rest, in a tagged
JSON that keeps tuples, non-string dict keys and dataclasses apart. An entry is written to a
staging folder and renamed into place whole, and only if it reads back equal (values and
types) to what was analyzed: what cannot be stored exactly is not cached. A damaged entry is
dropped and the analysis runs again.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Collection

import polars as pl

from traceinsight._version import __version__

#: Bump when the layout of an entry changes.
FORMAT = 1
_TIMELINES = "timelines.json"


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """The package version and a hash of the source files that compute findings."""
    # The package folder: the parent of the folder this module is in.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{__version__}:{FORMAT}".encode())
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in ("report", "__pycache__"))
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                digest.update(os.path.relpath(path, root).encode())
                with open(path, "rb") as handle:
                    digest.update(handle.read())
    return digest.hexdigest()


def entry_path(cache_dir: str, paths: list[str], options, *, salvage: bool = False) -> str:
    """Where the analysis of ``paths`` (already expanded) with ``options`` is kept: a
    ``findings-<key>`` folder inside the model cache entry of the first file."""
    from traceinsight.ingest.cache import cache_key

    models = [cache_key(path, salvage=salvage) for path in paths]
    digest = hashlib.blake2b(digest_size=16)
    digest.update(code_fingerprint().encode())
    digest.update(repr(options).encode())
    for key in models:
        digest.update(key.encode())
    return os.path.join(cache_dir, models[0], f"findings-{digest.hexdigest()}")


# -- tagged JSON -------------------------------------------------------------------------------


class _Unstorable(Exception):
    """A value the entry cannot hold exactly."""


def _dataclass_types() -> dict[str, type]:
    from traceinsight.analysis.alignment import Alignment

    return {"Alignment": Alignment}


def _encode(value, frames: dict[str, pl.DataFrame]):
    if value is None or isinstance(value, (bool, str)):
        return value
    if type(value) is int:
        return value
    if type(value) is float:
        if math.isfinite(value):
            return value
        return {"__float__": repr(value)}  # nan, inf: JSON has no literal for them
    if isinstance(value, pl.DataFrame):
        name = f"{frames['prefix']}-{len(frames)}.arrow"
        frames[name] = value
        return {"__frame__": name}
    if type(value) is list:
        return [_encode(item, frames) for item in value]
    if type(value) is tuple:
        return {"__tuple__": [_encode(item, frames) for item in value]}
    if type(value) is dict:
        if all(type(key) is str and not key.startswith("__") for key in value):
            return {key: _encode(item, frames) for key, item in value.items()}
        return {"__dict__": [[_encode(key, frames), _encode(item, frames)] for key, item in value.items()]}
    if dataclasses.is_dataclass(value) and _dataclass_types().get(type(value).__name__) is type(value):
        return {"__dataclass__": type(value).__name__,
                "fields": {f.name: _encode(getattr(value, f.name), frames) for f in dataclasses.fields(value)}}
    raise _Unstorable(type(value).__name__)


def _decode(value, frames: dict[str, pl.DataFrame]):
    if type(value) is list:
        return [_decode(item, frames) for item in value]
    if type(value) is not dict:
        return value
    if "__frame__" in value:
        return frames[value["__frame__"]]
    if "__float__" in value:
        return float(value["__float__"])
    if "__tuple__" in value:
        return tuple(_decode(item, frames) for item in value["__tuple__"])
    if "__dict__" in value:
        return {_decode(key, frames): _decode(item, frames) for key, item in value["__dict__"]}
    if "__dataclass__" in value:
        cls = _dataclass_types()[value["__dataclass__"]]
        return cls(**{name: _decode(item, frames) for name, item in value["fields"].items()})
    return {key: _decode(item, frames) for key, item in value.items()}


class _StoredFrame:
    """A frame of an entry, named but not read: :func:`_same` reads it when it compares it,
    so that checking an entry holds one stored frame in memory at a time, not all of them."""

    def __init__(self, path: str) -> None:
        self.path = path


class _StoredFrames(dict):
    """``_decode``'s frames for checking a folder: each name stands for its file."""

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = folder

    def __missing__(self, name: str) -> _StoredFrame:
        return _StoredFrame(os.path.join(self.folder, name))


def _same(a, b) -> bool:
    """Equal values of identical types, all the way down (frames: schema and values)."""
    if type(a) is _StoredFrame:
        return isinstance(b, pl.DataFrame) and _stored_frame_equals(a.path, b)
    if type(a) is not type(b):
        return False
    if isinstance(a, pl.DataFrame):
        return a.schema == b.schema and a.equals(b, null_equal=True)
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(k, j) and _same(a[k], b[j]) for k, j in zip(a, b))
    if dataclasses.is_dataclass(a):
        return all(_same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    return a == b


def _write(folder: str, name: str, value) -> None:
    """``value`` as ``name`` (tagged JSON) and its frames as Arrow IPC files in ``folder``;
    the JSON last, so that it never names a frame not yet written."""
    frames: dict = {"prefix": os.path.splitext(name)[0]}
    text = json.dumps(_encode(value, frames), allow_nan=False)
    for frame_name, frame in frames.items():
        if frame_name != "prefix":
            # zstd: half the size of lz4 here, and polars decodes it faster in parallel
            # (the second question reads every frame; measured in docs/performance.md).
            frame.write_ipc(os.path.join(folder, frame_name), compression="zstd")
    with open(os.path.join(folder, name), "w", encoding="utf-8") as handle:
        handle.write(text)


#: The read-back check reads a stored frame in batches of columns of about this many bytes.
#: It runs after the analysis, beside every finding, and sets the peak of a first run with
#: the caches on once the analysis holds no model columns for the timelines: 8 MiB batches
#: instead of 32 lowered that peak on the emit_nvtx flood at 1x from 445 to 423 MiB, and
#: the check's time stayed 0.36-0.40 s.
CHECK_BATCH_BYTES = 8 * 2**20


def _column_batches(frame: pl.DataFrame) -> list[list[str]]:
    """``frame``'s columns in order, cut into batches of at most :data:`CHECK_BATCH_BYTES`
    in memory (a larger column alone)."""
    limit = CHECK_BATCH_BYTES
    batches: list[list[str]] = [[]]
    used = 0
    for name in frame.columns:
        size = frame.get_column(name).estimated_size()
        if batches[-1] and used + size > limit:
            batches.append([])
            used = 0
        batches[-1].append(name)
        used += size
    return batches


def _stored_frame_equals(path: str, frame: pl.DataFrame) -> bool:
    """Whether the Arrow IPC file at ``path`` holds ``frame`` (schema and values), read in
    batches of columns: the largest findings hold 100 MB frames, checked beside the analysis,
    so a copy of a whole one is not held; a read per column took twice as long (0.9 s
    against 0.45 s for the emit_nvtx flood's findings)."""
    if list(pl.read_ipc_schema(path).items()) != list(frame.schema.items()):
        return False
    if not frame.width:
        return pl.read_ipc(path).height == frame.height
    for batch in _column_batches(frame):
        stored = pl.read_ipc(path, columns=batch)
        if not all(stored.get_column(name).equals(frame.get_column(name), null_equal=True) for name in batch):
            return False
    return True


def _document(folder: str, name: str):
    with open(os.path.join(folder, name), encoding="utf-8") as handle:
        return json.load(handle)


def _reads_back_equal(folder: str, name: str, value) -> bool:
    """Whether ``name`` in ``folder`` holds ``value`` exactly, reading its frames one by one."""
    return _same(_decode(_document(folder, name), _StoredFrames(folder)), value)


def _read(folder: str, name: str, later: Collection[str] = ()):
    """The value kept as ``name``; the frames of its top-level fields named in ``later`` are
    not read but stand as :class:`_StoredFrame` (see :func:`_findings_reading_on_use`)."""
    document = _document(folder, name)
    deferred = [document[key]["__frame__"] for key in later
                if type(document.get(key)) is dict and "__frame__" in document[key]]
    names: list[str] = []

    def collect(node) -> None:
        if type(node) is list:
            for item in node:
                collect(item)
        elif type(node) is dict:
            if "__frame__" in node and node["__frame__"] not in names and node["__frame__"] not in deferred:
                names.append(node["__frame__"])
            for item in node.values():
                collect(item)

    collect(document)
    # All frames in one collect: polars decodes the files on all cores at once (a second
    # question's time is mostly this and the imports).
    read = pl.collect_all([pl.scan_ipc(os.path.join(folder, name)) for name in names])
    frames = dict(zip(names, read))
    frames.update({name: _StoredFrame(os.path.join(folder, name)) for name in deferred})
    return _decode(document, frames)


@functools.cache
def _findings_reading_on_use() -> type:
    """A :class:`~traceinsight.analysis.findings.Findings` whose fields may be stored frames
    not yet read: each is read the first time it is used, then kept."""
    from traceinsight.analysis.findings import Findings

    class FindingsReadOnUse(Findings):
        def __getattribute__(self, name: str):
            value = object.__getattribute__(self, name)
            if type(value) is _StoredFrame:
                value = pl.read_ipc(value.path)
                object.__setattr__(self, name, value)
            return value

    return FindingsReadOnUse


# -- entries -----------------------------------------------------------------------------------


def load(entry: str, *, with_timelines: bool = False, read_later: Collection[str] = ()):
    """``(findings, timelines)`` kept in ``entry`` (see :func:`entry_path`); ``timelines``
    is ``None`` unless asked for and present. ``None`` when there is no valid entry.

    The frames of the fields named in ``read_later`` are read when first used, not now: a
    command that never uses them (``analyze`` never reads the frames kept for ``explain``)
    does not pay for them.
    """
    from traceinsight.analysis.findings import Findings

    if not os.path.exists(os.path.join(entry, "findings.json")):
        return None
    try:
        fields = _read(entry, "findings.json", read_later)
        findings = (_findings_reading_on_use() if read_later else Findings)(**fields)
        timelines = None
        if with_timelines and os.path.exists(os.path.join(entry, _TIMELINES)):
            timelines = _read(entry, _TIMELINES)
    except (OSError, ValueError, KeyError, TypeError, pl.exceptions.PolarsError):
        shutil.rmtree(entry, ignore_errors=True)  # damaged: dropped, and analyzed again
        return None
    return findings, timelines


def store(entry: str, findings, timelines: dict | None = None) -> bool:
    """Write ``entry``; ``False`` (and nothing written) when the model entry it belongs in
    is missing, the findings cannot be stored exactly or the folder cannot be written.
    Never fails the run."""
    fields = {f.name: getattr(findings, f.name) for f in dataclasses.fields(findings)}
    model_entry = os.path.dirname(entry)
    if not os.path.exists(os.path.join(model_entry, "meta.json")):
        return False  # never create a model entry's folder: the model cache would trust it
    try:
        final = entry
        if os.path.exists(final):
            return True
        staging = tempfile.mkdtemp(prefix=".staging-", dir=model_entry)
        try:
            _write(staging, "findings.json", fields)
            if not _reads_back_equal(staging, "findings.json", fields):
                raise _Unstorable("findings do not read back equal")
            if timelines is not None:
                _write(staging, _TIMELINES, timelines)
                if not _reads_back_equal(staging, _TIMELINES, timelines):
                    raise _Unstorable("timelines do not read back equal")
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    except (OSError, _Unstorable, ValueError, TypeError, pl.exceptions.PolarsError):
        return False
    return True


def store_timelines(entry: str, timelines: dict) -> bool:
    """Add the HTML report's timelines to the existing ``entry``."""
    if not os.path.isdir(entry):
        return False
    try:
        staging = tempfile.mkdtemp(prefix=".staging-", dir=entry)
        try:
            _write(staging, _TIMELINES, timelines)
            if not _reads_back_equal(staging, _TIMELINES, timelines):
                raise _Unstorable("timelines do not read back equal")
            for name in sorted(os.listdir(staging), key=lambda n: n == _TIMELINES):
                os.replace(os.path.join(staging, name), os.path.join(entry, name))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except (OSError, _Unstorable, ValueError, TypeError, pl.exceptions.PolarsError):
        return False
    return True
