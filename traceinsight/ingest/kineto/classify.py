"""Classification and ownership: each event's ``kind``, the side it lives on (a CPU thread,
or a GPU device and stream) and its per-kind fields.

Mapping (by ``cat``, never by ``pid``; 2020-2021 names in brackets)
-------------------------------------------------------------------
=========================================== ================== ============================
``cat``                                     ``kind``           side
=========================================== ================== ============================
``kernel`` (``Kernel``)                     ``kernel``         GPU
``gpu_memcpy`` (``Memcpy``)                 ``memcpy``         GPU (``bytes``, direction)
``gpu_memset`` (``Memset``)                 ``memset``         GPU (``bytes``)
``gpu_user_annotation``                     ``gpu_annotation`` GPU
``cuda_sync``                               ``sync``           host wait, on a GPU stream
``cuda_runtime`` (``Runtime``)              ``cuda_api``       CPU, ``detail`` ``runtime``
``cuda_driver``                             ``cuda_api``       CPU, ``detail`` ``driver``
``cpu_op`` (``Operator``)                   ``cpu_op``         CPU
``user_annotation``                         ``annotation``     CPU
``python_function``                         ``python``         CPU
=========================================== ================== ============================

- ``ProfilerStep#N`` is an ``annotation`` whatever its category (``user_annotation`` since
  2022, ``Operator`` before, ``cpu_op`` after some third-party rewrites).
- GPU rows get ``device`` from ``args.device`` (else the event's ``pid``), ``stream`` from
  ``args.stream`` (else the ``tid``), a null ``tid``, and the rank's main CPU process as
  ``pid``: Kineto's own GPU ``pid`` is the device index, not a process.
- ``cuda_sync`` events (``Stream Sync``, ``Event Sync``, ``Context Sync``, ``Stream Wait
  Event``) are CUPTI synchronization records. Their span is the time the *host* thread spent
  inside the synchronizing call (``cudaStreamSynchronize``…, whose runtime event carries the
  same correlation id), but Kineto draws them on the GPU stream waited for. They keep
  ``device`` and ``stream`` (null for a context-wide sync) and, as in the nsys reader, take
  the name and thread of that call; ``detail`` is the sync type (``Stream sync``,
  ``Event sync``, ``Context sync``, ``Stream wait sync``).
- Kernels: ``name`` is the qualified function name with its template head (no return type,
  template or call arguments: ``dpsk::ep::internode::combine<...>``) and ``detail`` the full
  demangled signature.
- ``detail`` of ops holds ``Input Dims`` (``Input dims`` in 2020) as compact JSON, e.g.
  ``[[2048, 4096], []]``; of memcpys the direction (``HtoD``…).
- ``record_param_comms`` ops and the NCCL kernels linked to them (2024+) fill the ``comm_*``
  columns from ``Collective name``, ``In/Out msg nelems``, ``Group size``, ``Process Group
  Name``, ``Seq`` and ``In/Out split size``.
- ``external_id`` comes from ``External id`` (``external id`` in 2020-2021, where 0 means
  none). Where runtime/GPU events carry their own ``correlation`` there (2022 to early
  2024), which points at no CPU op, those values are dropped with a warning so that nobody
  joins on them by mistake.
- Not intervals: flows (``ac2g``, ``async``…), ``M`` metadata, instants (``[memory]``, step
  markers), the ``Trace`` span, Kineto ``overhead``. Complete events of other, unknown
  categories are skipped with a warning.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from traceinsight.ingest.kernel_names import short_kernel_name

#: Interval kind of each event category, old (2020–2021) spellings included.
KIND_BY_CATEGORY: dict[str, str] = {
    "kernel": "kernel",
    "Kernel": "kernel",
    "gpu_memcpy": "memcpy",
    "Memcpy": "memcpy",
    "gpu_memset": "memset",
    "Memset": "memset",
    "gpu_user_annotation": "gpu_annotation",
    "cuda_sync": "sync",
    "cuda_runtime": "cuda_api",
    "Runtime": "cuda_api",
    "cuda_driver": "cuda_api",
    "cpu_op": "cpu_op",
    "Operator": "cpu_op",
    "user_annotation": "annotation",
    "python_function": "python",
}
#: CUPTI's "no stream" (a context-wide sync), written as a stream id of 2**32 - 1.
_NO_STREAM = 0xFFFFFFFF
#: Kinds whose rows live on a GPU stream (``device``/``stream`` set, ``tid`` null).
_STREAM_KINDS = ("kernel", "memcpy", "memset", "gpu_annotation", "sync")
#: Complete events of these categories are expected and deliberately not intervals.
_IGNORED_CATEGORIES = frozenset({"Trace", "overhead", "cuda_profiler_range"})


def _kept_events(events: list[Any]) -> list[Any]:
    """The complete events that may be intervals (strictly typed events)."""
    return [e for e in events if e.ph == "X" and e.cat not in _IGNORED_CATEGORIES]


def _classify(frame: pl.DataFrame, unknown_categories: dict[str | None, int]) -> pl.DataFrame:
    """Add ``kind``; drop complete events that are not intervals (counting them by category
    in ``unknown_categories``)."""
    kind = pl.col("cat").replace_strict(KIND_BY_CATEGORY, default=None, return_dtype=pl.String)
    is_step = pl.col("name").str.starts_with("ProfilerStep#")
    frame = frame.with_columns(
        kind=pl.when(kind.is_in(["cpu_op", "annotation"]) & is_step)
        .then(pl.lit("annotation"))
        .otherwise(kind)
    )
    unknown = (
        frame.lazy()
        .filter(pl.col("kind").is_null() & ~pl.col("cat").is_in(list(_IGNORED_CATEGORIES)))
        .group_by("cat")
        .len()
        .collect()
    )
    for cat, count in unknown.iter_rows():
        unknown_categories[cat] = unknown_categories.get(cat, 0) + count
    return frame.filter(pl.col("kind").is_not_null())


def _ownership(frame: pl.DataFrame) -> tuple[pl.DataFrame, int | None]:
    """pid/tid/device/stream by side: CPU rows keep OS ids, GPU rows get device and stream."""
    on_stream = pl.col("kind").is_in(_STREAM_KINDS)
    # Select before filtering: filtering the frame would copy every column.
    cpu_pids = frame.select(pl.col("pid").filter(~on_stream)).to_series().drop_nulls()
    if cpu_pids.is_empty():
        cpu_pids = frame.get_column("pid").drop_nulls()
    main_pid = None if cpu_pids.is_empty() else int(cpu_pids.mode().sort()[0])
    stream = pl.coalesce("arg_stream", "tid_stream", "tid")
    frame = frame.with_columns(
        pid=pl.when(on_stream).then(pl.lit(main_pid, dtype=pl.Int64)).otherwise(pl.col("pid")),
        tid=pl.when(on_stream).then(None).otherwise(pl.col("tid")),
        device=pl.when(on_stream)
        .then(pl.coalesce("arg_device", "pid"))
        .otherwise(None)
        .cast(pl.Int32, strict=False),  # an id past int32 is garbage: no device
        stream=pl.when(on_stream & (stream != _NO_STREAM)).then(stream).otherwise(None),
        bytes=pl.when(pl.col("kind").is_in(["memcpy", "memset"])).then(pl.col("bytes")),
    )
    return frame.drop("arg_device", "arg_stream", "tid_stream"), main_pid


#: Kineto's ``cuda_sync_kind`` spelled as the nsys reader labels CUPTI sync types.
_SYNC_KIND_LABELS = {
    "Stream Sync": "Stream sync",
    "Event Sync": "Event sync",
    "Context Sync": "Context sync",
    "Stream Wait Event": "Stream wait sync",
}
#: ``detail`` of ``cuda_api`` rows, as the nsys reader fills it.
_API_CLASS_BY_CATEGORY = {"cuda_runtime": "runtime", "Runtime": "runtime", "cuda_driver": "driver"}


def _details(frame: pl.DataFrame, short_names: dict[str, str]) -> pl.DataFrame:
    """Kernel short names, and ``detail`` per kind (signature, shapes, direction, sync type).

    ``short_names`` caches kernel short names across chunks (a few hundred distinct names
    in a million launches).
    """
    kind = pl.col("kind")
    kernel_names = frame.select(pl.col("name").filter(kind == "kernel").unique()).to_series()
    for name in kernel_names.drop_nulls().to_list():
        if name not in short_names:
            short_names[name] = short_kernel_name(name)
    short = {name: short_names[name] for name in kernel_names.drop_nulls().to_list()}
    dims = pl.col("input_dims")
    # Kineto writes "[[1, 2], []]"; files re-serialised by other tools spread the lists over
    # lines or drop the spaces. Rewriting every row is slow, so check first.
    if frame.get_column("input_dims").str.contains(r",\S|\s\s|\[\s|\s\]|\n").any():
        dims = dims.str.replace_all(r"\s+", "").str.replace_all(",", ", ", literal=True)
    frame = frame.with_columns(
        detail=pl.when(kind == "kernel")
        .then(pl.col("name"))
        .when(kind == "memcpy")
        .then(pl.col("name").str.extract(r"^Memcpy\s+(\w+)", 1))
        .when(kind == "sync")
        .then(pl.coalesce("sync_kind", "name").replace(_SYNC_KIND_LABELS))
        .when(kind == "cuda_api")
        .then(pl.col("cat").replace_strict(_API_CLASS_BY_CATEGORY, default=None))
        .when(kind.is_in(["cpu_op", "annotation", "python"]))
        .then(dims),
        name=pl.when(kind == "kernel")
        .then(pl.col("name").replace(short))
        .otherwise(pl.col("name")),
    )
    return frame.drop("input_dims", "sync_kind", "cat")


def _link_syncs(frame: pl.DataFrame) -> pl.DataFrame:
    """Give each sync row the thread and name of the API call that waited.

    Kineto draws ``cuda_sync`` on the GPU stream, but the span is the host thread's wait inside
    ``cudaStreamSynchronize`` & co.; that call carries the same correlation id. The nsys
    reader names sync rows after this call too.
    """
    is_sync = pl.col("kind") == "sync"
    syncs = frame.filter(is_sync)
    if syncs.is_empty():
        return frame
    calls = (
        frame.filter(
            (pl.col("kind") == "cuda_api")
            & pl.col("correlation").is_in(syncs.get_column("correlation").drop_nulls().implode())
        )
        .select("correlation", pl.col("tid").alias("_api_tid"), pl.col("name").alias("_api"))
        .unique(subset="correlation", keep="first")
    )
    syncs = syncs.join(calls, on="correlation", how="left").with_columns(
        tid=pl.col("_api_tid"), name=pl.coalesce("_api", "name")
    )
    return pl.concat([frame.filter(~is_sync), syncs.select(frame.columns)])


def _external_ids(frame: pl.DataFrame, warnings: list[str]) -> pl.DataFrame:
    """Merge the two spellings; drop ids that are really the event's own correlation id."""
    launched = pl.col("kind").is_in(["cuda_api", "kernel", "memcpy", "memset", "sync"])
    frame = frame.with_columns(external_id=pl.coalesce("external_id", "legacy_external_id")).drop(
        "legacy_external_id"
    )
    # 2020-2021 runtime/GPU events say "external id": 0 when no op launched them.
    frame = frame.with_columns(
        external_id=pl.when(launched & (pl.col("external_id") == 0))
        .then(None)
        .otherwise(pl.col("external_id"))
    )
    api = frame.filter(
        (pl.col("kind") == "cuda_api")
        & pl.col("external_id").is_not_null()
        & pl.col("correlation").is_not_null()
    )
    if (
        api.height
        and (api.get_column("external_id") == api.get_column("correlation")).mean() >= 0.9
    ):
        # Kineto ~2022 to early 2024 (kineto issue #843): the id points at no CPU op.
        frame = frame.with_columns(
            external_id=pl.when(launched & (pl.col("external_id") == pl.col("correlation")))
            .then(None)
            .otherwise(pl.col("external_id"))
        )
        warnings.append(
            "runtime and GPU events carry their own correlation id as 'External id' "
            "(Kineto 2022 to early 2024), so it cannot link them to CPU ops; those "
            "external_id values were dropped (link launches to ops by time nesting instead)"
        )
    return frame
