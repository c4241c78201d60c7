"""Table decoding: each event table of the export as a frame of the model's columns.

Mapping
-------
===============================================  ===============================================
export table                                     model
===============================================  ===============================================
``CUPTI_ACTIVITY_KIND_KERNEL``                   ``kernel``: name = ``shortName``, detail = the
                                                 demangled signature, device/stream/correlation
``CUPTI_ACTIVITY_KIND_MEMCPY``                   ``memcpy``: name ``Memcpy HtoD``…, detail = the
                                                 direction, bytes
``CUPTI_ACTIVITY_KIND_MEMSET``                   ``memset``: name ``Memset``, bytes
``CUPTI_ACTIVITY_KIND_SYNCHRONIZATION``          ``sync``: the host-side wait, named after the
                                                 API call that caused it
                                                 (``cudaStreamSynchronize``), detail = sync
                                                 type; thread from that call
``CUPTI_ACTIVITY_KIND_RUNTIME``                  ``cuda_api``: runtime and driver calls,
                                                 ``_vNNNN`` suffix stripped, detail ``runtime``
                                                 / ``driver``
``NVTX_EVENTS``                                  ``annotation``: push/pop and start/end ranges,
                                                 marks (zero length); domain named by the
                                                 domain-create rows of the same process
``OSRT_API`` + ``OSRT_CALLCHAINS``               ``osrt``: with ``stack``, innermost frame first
``COMPOSITE_EVENTS`` + ``SAMPLING_CALLCHAINS``   ``samples``: one row per CPU sample; frames and
                                                 modules innermost first
===============================================  ===============================================

Identifiers: ``globalTid``/``globalPid`` pack ``(host << 48) | (pid << 24) | tid``. The part
above the thread bits (``g >> 24``) identifies a process across hosts of one report and keys
every per-process join, because CUDA correlation ids and NVTX domain ids are only unique
within a process.
"""

from __future__ import annotations

import re

import polars as pl

import traceinsight.ingest.guard as guard
from traceinsight.ingest.kernel_names import short_kernel_name
from traceinsight.ingest.nsys.sqlite_export import KERNEL_TABLE, MEMCPY_TABLE, MEMSET_TABLE, NVTX_TABLE, OSRT_TABLE
from traceinsight.ingest.nsys.sqlite_export import OSRT_CALLCHAIN_TABLE, RUNTIME_TABLE, SAMPLE_CALLCHAIN_TABLE
from traceinsight.ingest.nsys.sqlite_export import SAMPLE_TABLE, STRING_TABLE, SYNC_TABLE, _INT, _STR, _Export
from traceinsight.ingest.nsys.sqlite_export import _parse_int

# A globalTid is (host << 48) | (pid << 24) | tid; integer division keeps it in polars
# expressions (no bit-shift operator there) and matches NVIDIA's own `/ 0x1000000 % 0x1000000`.
_ID_SPAN = 1 << 24

# CUPTI reports "no stream" (event and context syncs) as an all-ones 32-bit id.
_NO_STREAM = 0xFFFFFFFF

_HEX_SYMBOL = r"^0[xX][0-9a-fA-F]+$"
_PATH_DIRECTORY = r"^.*[/\\]"

# Built-in copies of the ENUM_* tables (ddl/enums.txt): 2022.1 and older exports have no ENUM
# tables and newer ones write only some of them.
_MEMCPY_DIRECTIONS = {
    0: "Unknown",
    1: "HtoD",
    2: "DtoH",
    3: "HtoA",
    4: "AtoH",
    5: "AtoA",
    6: "AtoD",
    7: "DtoA",
    8: "DtoD",
    9: "HtoH",
    10: "PtoP",
    11: "UVM HtoD",
    12: "UVM DtoH",
    13: "UVM DtoD",
}
_SYNC_TYPES = {
    0: "Unknown",
    1: "Event sync",
    2: "Stream wait sync",
    3: "Stream sync",
    4: "Context sync",
}
_THREAD_STATES = {
    0: "Unknown",
    1: "Running",
    2: "Interruptible",
    3: "Uninterruptible",
    4: "Stopped",
    5: "Terminated",
    6: "Unscheduled",
    7: "Waiting",
    8: "OS runtime",
    9: "Initialized",
    10: "Transition",
}
_API_EVENT_CLASSES = {0: "runtime", 1: "driver"}

# ENUM_NSYS_EVENT_TYPE ids of the NVTX rows we read (identical in 2022.4 and 2026.2 exports);
# looked up by name in the file's own enum table when it has one.
_NVTX_RANGE_TYPES = (
    "NvtxPushPopRange",
    "NvtxStartEndRange",
    "NvtxtPushPopRange",
    "NvtxtStartEndRange",
)
_NVTX_MARK_TYPES = ("NvtxMark", "NvtxtMark")
_NVTX_DOMAIN_CREATE = "NvtxDomainCreate"
_NVTX_EVENT_TYPE_IDS = {
    "NvtxPushPopRange": 59,
    "NvtxStartEndRange": 60,
    "NvtxtPushPopRange": 70,
    "NvtxtStartEndRange": 71,
    "NvtxMark": 34,
    "NvtxtMark": 65,
    "NvtxDomainCreate": 75,
}


#: Signatures longer than this keep the export's shortName (no demangler writes such names;
#: a damaged or hostile string table might).
_MAX_SIGNATURE = 10_000


def _qualified_names(frame: pl.DataFrame) -> pl.Expr:
    """The kernel's qualified name with its template head (``dpsk::ep::internode::combine<...>``)
    from the demangled signature, where it names the same function as ``shortName``; null
    elsewhere (the caller falls back to ``shortName``)."""
    pairs = frame.select("_short", "detail").unique().drop_nulls()
    mapping = {}
    for short, signature in pairs.iter_rows():
        if len(signature) > _MAX_SIGNATURE:
            continue
        qualified = short_kernel_name(signature)
        base = qualified.rsplit("::", 1)[-1].removesuffix("<...>")
        if base == short:
            mapping[(short, signature)] = qualified
    if not mapping:
        return pl.lit(None, pl.String)
    keys = pl.DataFrame({"_short": [k[0] for k in mapping], "detail": [k[1] for k in mapping],
                         "_qualified": list(mapping.values())}, schema={"_short": pl.String, "detail": pl.String,
                                                                         "_qualified": pl.String})
    joined = frame.select("_short", "detail").join(keys, on=["_short", "detail"], how="left", maintain_order="left")
    return pl.lit(joined.get_column("_qualified"))


def _process_columns(global_id: str, *, with_thread: bool) -> list[pl.Expr]:
    """``_proc`` (host and pid: the per-process join key), ``pid`` and optionally ``tid``."""
    ids = pl.col(global_id)
    columns = [
        (ids // _ID_SPAN).alias("_proc"),
        ((ids // _ID_SPAN) % _ID_SPAN).alias("pid"),
    ]
    if with_thread:
        columns.append((ids % _ID_SPAN).alias("tid"))
    return columns


def _module_basename(column: str) -> pl.Expr:
    # Frames carry the full path of their module; people know "libc.so.6", not the path.
    return pl.col(column).str.replace(_PATH_DIRECTORY, "")


def _strip_api_version(column: str) -> pl.Expr:
    # cudaLaunchKernel_v7000 -> cudaLaunchKernel; driver names have no suffix.
    return pl.col(column).str.replace(r"_v\d+$", "")


class _EventTables:
    """The export's event tables as frames of the model's columns, each with ``_proc``
    (the per-process key); a table the export lacks gives ``None``."""

    def __init__(self, export: _Export, warnings: list[str]) -> None:
        self.export = export
        self.warnings = warnings
        self._strings: pl.DataFrame | None = None

    def _usable(self, table: str | None, *columns: str) -> bool:
        """True if ``table`` exists with ``columns``; a table without them is named in a
        warning (its rows cannot be placed in time or in a process) and skipped."""
        if table is None:
            return False
        missing = [column for column in columns if column not in self.export.columns(table)]
        if missing:
            self.warnings.append(
                f"table {table} lacks column(s) {', '.join(missing)}; its rows were skipped"
            )
        return not missing

    # -- strings -------------------------------------------------------------------------

    @property
    def strings(self) -> pl.DataFrame:
        """StringIds as (id, value); empty if the export has none."""
        if self._strings is None:
            table = self.export.table(STRING_TABLE)
            if self.export.has_columns(table, "id", "value"):
                where = ""
                streams = self.export.table("ProcessStreams")
                if self.export.has_columns(streams, "contentId"):
                    # Captured stdout/stderr can be megabytes and is never needed. Strings are
                    # interned, so a short content may double as a name: skip only long ones.
                    where = (
                        f'NOT (id IN (SELECT contentId FROM "{streams}") AND length(value) > 4096)'
                    )
                # Untrusted text: control characters out and huge strings cut, once, before
                # any regex or join runs over the names.
                self._strings = guard.scrub_text(
                    self.export.read(
                        table, [("id", "id", _INT), ("value", "value", _STR)], where=where
                    ),
                    self.warnings,
                )
            else:
                self._strings = pl.DataFrame(schema={"id": _INT, "value": _STR})
        return self._strings

    def _with_string(self, frame: pl.DataFrame, id_column: str, alias: str) -> pl.DataFrame:
        """Add ``alias``: the StringIds value of ``id_column`` (null where unknown)."""
        lookup = self.strings.rename({"id": id_column, "value": alias})
        return frame.join(lookup, on=id_column, how="left")

    # -- CUDA ----------------------------------------------------------------------------

    def _gpu_activity(
        self, base: str, extra: list[tuple[str, str, pl.DataType]]
    ) -> pl.DataFrame | None:
        table = self.export.table(base)
        if not self._usable(table, "start", "end", "globalPid"):
            return None
        fields = [
            ("start_ns", "start", _INT),
            ("end_ns", "end", _INT),
            ("device", "deviceId", _INT),
            ("stream", "streamId", _INT),
            ("correlation", "correlationId", _INT),
            ("_global_pid", "globalPid", _INT),
            *extra,
        ]
        frame = self.export.read(table, fields)
        return frame.with_columns(_process_columns("_global_pid", with_thread=False)).drop(
            "_global_pid"
        )

    def kernels(self) -> pl.DataFrame | None:
        frame = self._gpu_activity(
            KERNEL_TABLE,
            [("_short_id", "shortName", _INT), ("_demangled_id", "demangledName", _INT)],
        )
        if frame is None:
            return None
        frame = self._with_string(frame, "_short_id", "_short")
        frame = self._with_string(frame, "_demangled_id", "detail")
        return frame.with_columns(
            kind=pl.lit("kernel"),
            # Very old exports may lack shortName; the signature is better than nothing.
            name=pl.coalesce(_qualified_names(frame), "_short", "detail"),
        ).drop("_short_id", "_demangled_id", "_short")

    def memcpys(self) -> pl.DataFrame | None:
        frame = self._gpu_activity(
            MEMCPY_TABLE, [("bytes", "bytes", _INT), ("_copy_kind", "copyKind", _INT)]
        )
        if frame is None:
            return None
        directions = dict(_MEMCPY_DIRECTIONS)
        for kind_id, enum_name in self.export.enum(
            "ENUM_CUDA_MEMCPY_OPER", {}, column="name"
        ).items():
            # CUDA_MEMCPY_KIND_HTOD -> HtoD, CUDA_MEMCPY_KIND_UVM_DTOH -> UVM DtoH
            match = re.fullmatch(r"(?:CUDA_MEMCPY_KIND_)?(UVM_)?([A-Z])TO([A-Z])", enum_name)
            if match:
                uvm, source, target = match.groups()
                directions[kind_id] = f"{'UVM ' if uvm else ''}{source}to{target}"
        direction = pl.col("_copy_kind").replace_strict(
            directions, default="Unknown", return_dtype=_STR
        )
        return frame.with_columns(
            kind=pl.lit("memcpy"), detail=direction, name=pl.lit("Memcpy ") + direction
        ).drop("_copy_kind")

    def memsets(self) -> pl.DataFrame | None:
        frame = self._gpu_activity(MEMSET_TABLE, [("bytes", "bytes", _INT)])
        if frame is None:
            return None
        return frame.with_columns(kind=pl.lit("memset"), name=pl.lit("Memset"))

    def _thread_events(self, base: str, extra: list[tuple[str, str, pl.DataType]]) -> pl.DataFrame | None:
        """Start, end and ``_global_tid`` of a table of CPU-thread events, with ``extra``
        fields; ``None`` where the table or those columns are missing."""
        table = self.export.table(base)
        if not self._usable(table, "start", "end", "globalTid"):
            return None
        return self.export.read(
            table,
            [("start_ns", "start", _INT), ("end_ns", "end", _INT), ("_global_tid", "globalTid", _INT), *extra],
        )

    def cuda_api(self) -> pl.DataFrame | None:
        frame = self._thread_events(RUNTIME_TABLE, [
            ("correlation", "correlationId", _INT),
            ("_name_id", "nameId", _INT),
            ("_event_class", "eventClass", _INT),
        ])
        if frame is None:
            return None
        # Strip the version suffix once per distinct name, not once per call.
        used_ids = frame.select(pl.col("_name_id").unique().alias("id"))
        names = self.strings.join(used_ids, on="id", how="semi").select(
            pl.col("id").alias("_name_id"), _strip_api_version("value").alias("name")
        )
        return (
            frame.join(names, on="_name_id", how="left")
            .with_columns(
                *_process_columns("_global_tid", with_thread=True),
                kind=pl.lit("cuda_api"),
                detail=pl.col("_event_class").replace_strict(
                    _API_EVENT_CLASSES, default=None, return_dtype=_STR
                ),
            )
            .drop("_global_tid", "_name_id", "_event_class")
        )

    def syncs(self, runtime: pl.DataFrame | None) -> pl.DataFrame | None:
        frame = self._gpu_activity(SYNC_TABLE, [("_sync_type", "syncType", _INT)])
        if frame is None:
            return None
        enum_label = pl.col("_sync_type").replace_strict(
            self.export.enum("ENUM_CUPTI_SYNC_TYPE", _SYNC_TYPES), default=None, return_dtype=_STR
        )
        if runtime is not None and not runtime.is_empty():
            # The wait runs on the thread that called the sync API; find that call by
            # (process, correlation) because correlation ids repeat across processes.
            keys = ["_proc", "correlation"]
            calls = (
                runtime.join(frame.select(keys), on=keys, how="semi")
                .select(*keys, pl.col("tid"), pl.col("name").alias("_api"))
                .unique(subset=keys, keep="first")
            )
            frame = frame.join(calls, on=keys, how="left")
        else:
            frame = frame.with_columns(tid=pl.lit(None, _INT), _api=pl.lit(None, _STR))
        api = pl.col("_api")
        # syncType numbering is not stable across nsys versions (2024+ exports label every
        # cudaStreamSynchronize "Stream wait sync"), so the API that waited names the type
        # where it is known and the enum label is only the fallback.
        sync_type = (
            pl.when(api.str.contains("StreamWaitEvent"))
            .then(pl.lit("Stream wait sync"))
            .when(api.str.contains("EventSynchronize|EventQuery"))
            .then(pl.lit("Event sync"))
            .when(api.str.contains("StreamSynchronize|StreamQuery"))
            .then(pl.lit("Stream sync"))
            .when(api.str.contains("DeviceSynchronize|CtxSynchronize|ThreadSynchronize"))
            .then(pl.lit("Context sync"))
            .otherwise(enum_label)
        )
        return frame.with_columns(
            kind=pl.lit("sync"),
            name=pl.coalesce(api, enum_label),
            detail=sync_type,
            stream=pl.when(pl.col("stream") == _NO_STREAM).then(None).otherwise(pl.col("stream")),
        ).drop("_sync_type", "_api")

    # -- NVTX ----------------------------------------------------------------------------

    def annotations(self) -> pl.DataFrame | None:
        table = self.export.table(NVTX_TABLE)
        if not self._usable(table, "start", "eventType", "globalTid"):
            return None
        type_ids = dict(_NVTX_EVENT_TYPE_IDS)
        enum_table = self.export.table("ENUM_NSYS_EVENT_TYPE")
        if self.export.has_columns(enum_table, "id", "name"):
            for type_id, type_name in self.export.rows(f'SELECT id, name FROM "{enum_table}"'):
                if type_name in type_ids and _parse_int(type_id) is not None:
                    type_ids[type_name] = _parse_int(type_id)
        range_ids = [type_ids[name] for name in _NVTX_RANGE_TYPES]
        mark_ids = [type_ids[name] for name in _NVTX_MARK_TYPES]
        domain_create_id = type_ids[_NVTX_DOMAIN_CREATE]
        wanted = ", ".join(str(i) for i in [*range_ids, *mark_ids, domain_create_id])
        frame = self.export.read(
            table,
            [
                ("start_ns", "start", _INT),
                ("end_ns", "end", _INT),
                ("_event_type", "eventType", _INT),
                ("_text", "text", _STR),
                ("_text_id", "textId", _INT),
                ("_global_tid", "globalTid", _INT),
                ("_domain_id", "domainId", _INT),
            ],
            where=f"eventType IN ({wanted})",
        )
        frame = guard.scrub_text(frame, self.warnings)  # inline text is not in StringIds
        # Registered strings live in StringIds, unregistered ones inline: one file has both.
        frame = self._with_string(frame, "_text_id", "_registered_text").with_columns(
            *_process_columns("_global_tid", with_thread=True),
            name=pl.coalesce("_text", "_registered_text"),
        )

        event_type = pl.col("_event_type")
        domains = (
            frame.filter(event_type == domain_create_id)
            .select("_proc", "_domain_id", pl.col("name").alias("domain"))
            .unique(subset=["_proc", "_domain_id"], keep="first")
        )
        is_mark = event_type.is_in(mark_ids)
        events = frame.filter(event_type.is_in(range_ids) | is_mark)
        del frame  # the filtered rows share its buffers; the rest is not needed
        unterminated = events.filter(~is_mark & pl.col("end_ns").is_null()).height
        if unterminated:
            self.warnings.append(
                f"{unterminated} NVTX range(s) never ended (no end time) and were dropped"
            )
        events = events.filter(is_mark | pl.col("end_ns").is_not_null()).with_columns(
            # A mark is an instant: zero length, whatever the end column holds.
            end_ns=pl.when(is_mark)
            .then(pl.col("start_ns"))
            .otherwise(pl.col("end_ns"))
        )
        # The domain of each range from a join of the keys alone, set beside the ranges in
        # their order: joining the ranges themselves would copy every name (hundreds of MB
        # for an emit_nvtx flood).
        keys = ["_proc", "_domain_id"]
        events = events.hstack(
            events.select(keys).join(domains, on=keys, how="left", maintain_order="left").select("domain"))
        nameless = (
            events.filter((pl.col("_domain_id") != 0) & pl.col("domain").is_null())
            .select("_proc", "_domain_id")
            .unique()
            .height
        )
        if nameless:
            self.warnings.append(
                f"NVTX domain names missing for {nameless} domain(s) (no domain-create row in "
                "the export); their ranges have no domain"
            )
        return events.with_columns(kind=pl.lit("annotation")).drop(
            "_event_type", "_text", "_text_id", "_registered_text", "_global_tid", "_domain_id"
        )

    # -- OS runtime and CPU samples ------------------------------------------------------

    def _callchains(self, base: str) -> pl.DataFrame | None:
        """(id, stackDepth, symbol, module) of a callchain table, strings resolved."""
        table = self.export.table(base)
        if not self._usable(table, "id", "stackDepth", "symbol"):
            return None
        frame = self.export.read(
            table,
            [
                ("id", "id", _INT),
                ("_depth", "stackDepth", _INT),
                ("_symbol_id", "symbol", _INT),
                ("_module_id", "module", _INT),
            ],
        )
        frame = self._with_string(frame, "_symbol_id", "symbol")
        frame = self._with_string(frame, "_module_id", "_module_path")
        return frame.with_columns(module=_module_basename("_module_path")).drop(
            "_symbol_id", "_module_id", "_module_path"
        )

    def osrt_calls(self) -> pl.DataFrame | None:
        frame = self._thread_events(OSRT_TABLE, [("_name_id", "nameId", _INT), ("_callchain", "callchainId", _INT)])
        if frame is None:
            return None
        frame = self._with_string(frame, "_name_id", "name").with_columns(
            *_process_columns("_global_tid", with_thread=True), kind=pl.lit("osrt")
        )
        chains = self._callchains(OSRT_CALLCHAIN_TABLE)
        if chains is not None and not chains.is_empty():
            # An unresolved frame's symbol is a bare address; its module says more.
            frame_label = (
                pl.when(pl.col("symbol").is_null() | pl.col("symbol").str.contains(_HEX_SYMBOL))
                .then(pl.col("module"))
                .otherwise(pl.col("symbol"))
            )
            stacks = chains.group_by("id").agg(frame_label.sort_by("_depth").alias("stack"))
            # callchainId 0 (or NULL) means "no backtrace"; it matches no chain id.
            frame = frame.join(stacks, left_on="_callchain", right_on="id", how="left")
        return frame.drop("_global_tid", "_name_id", "_callchain")

    def samples(self) -> pl.DataFrame | None:
        table = self.export.table(SAMPLE_TABLE)
        if not self._usable(table, "id", "start", "globalTid"):
            return None
        frame = self.export.read(
            table,
            [
                ("_sample_id", "id", _INT),
                ("time_ns", "start", _INT),
                ("_thread_state", "threadState", _INT),
                ("_global_tid", "globalTid", _INT),
            ],
        )
        states = self.export.enum("ENUM_SAMPLING_THREAD_STATE", _THREAD_STATES)
        frame = frame.with_columns(
            *_process_columns("_global_tid", with_thread=True),
            state=pl.col("_thread_state").replace_strict(states, default=None, return_dtype=_STR),
        )
        chains = self._callchains(SAMPLE_CALLCHAIN_TABLE)
        if chains is not None and not chains.is_empty():
            stacks = chains.group_by("id").agg(
                pl.col("symbol").sort_by("_depth").alias("frames"),
                pl.col("module").sort_by("_depth").alias("modules"),
            )
            frame = frame.join(stacks, left_on="_sample_id", right_on="id", how="left")
        return frame.drop("_sample_id", "_thread_state", "_global_tid")
