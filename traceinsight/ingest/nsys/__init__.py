"""Read an Nsight Systems SQLite export (``nsys export --type sqlite``) into a TraceModel.

The export is opened read-only and probed table by table: nsys creates tables lazily, adds and
drops columns between versions (2021 legacy exports up to 2026.2), and a file without any
event table is normal. Every table and column is therefore looked up before it is queried.

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

Ranks: every process that appears in the CUDA, NVTX or OS-runtime tables is one rank. The rank
number comes from ``MPI_RANKS`` where the export has it, else from ``RANK`` / ``LOCAL_RANK`` in
the environment nsys recorded for the launched process (``META_DATA_CAPTURE``; used only when
that environment is unambiguously this process's), else from the order of process ids.

Times stay as the file gives them: integer nanoseconds since the capture session started.
``clock_origin_ns`` in the ranks frame is the Unix-epoch nanosecond of that zero
(``TARGET_INFO_SESSION_START_TIME``, corrected for ``nsys export --ts-normalize/--ts-shift``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sqlite3
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import polars as pl

from traceinsight.errors import TraceFormatError, TraceInputError, one_line
import traceinsight.ingest.guard as guard
from traceinsight.ingest.kernel_names import short_kernel_name
from traceinsight.model import (
    INTERVAL_SCHEMA,
    RANK_SCHEMA,
    SAMPLE_SCHEMA,
    TraceModel,
    empty_frame,
    with_depth,
)

FORMAT_NAME = "nsys-sqlite"

KERNEL_TABLE = "CUPTI_ACTIVITY_KIND_KERNEL"
MEMCPY_TABLE = "CUPTI_ACTIVITY_KIND_MEMCPY"
MEMSET_TABLE = "CUPTI_ACTIVITY_KIND_MEMSET"
SYNC_TABLE = "CUPTI_ACTIVITY_KIND_SYNCHRONIZATION"
RUNTIME_TABLE = "CUPTI_ACTIVITY_KIND_RUNTIME"
NVTX_TABLE = "NVTX_EVENTS"
OSRT_TABLE = "OSRT_API"
OSRT_CALLCHAIN_TABLE = "OSRT_CALLCHAINS"
SAMPLE_TABLE = "COMPOSITE_EVENTS"
SAMPLE_CALLCHAIN_TABLE = "SAMPLING_CALLCHAINS"
STRING_TABLE = "StringIds"

#: Tables (or table-name prefixes) only an nsys export has; one of them must be present.
_NSYS_MARKER_TABLES = (
    STRING_TABLE,
    "CUPTI_ACTIVITY_KIND_",
    NVTX_TABLE,
    OSRT_TABLE,
    SAMPLE_TABLE,
    "TARGET_INFO_",
    "META_DATA_EXPORT",
    "EXPORT_META_DATA",
    "ThreadNames",
    "ProcessStreams",
)

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

_INT = pl.Int64()
_STR = pl.String()


def read_nsys(path: str) -> TraceModel:
    """Read one Nsight Systems SQLite export into a :class:`~traceinsight.model.TraceModel`.

    The file is opened read-only and never modified. Tables or columns the export lacks are
    skipped (a note lands in ``model.warnings``); only a file that is not an SQLite database,
    is corrupt, or is a database of some other program is refused.

    Parameters
    ----------
    path
        An ``.sqlite`` file written by ``nsys export --type sqlite`` (any version from the
        2021 legacy exporter to 2026.x, Linux, Windows or WSL2 targets).

    Returns
    -------
    TraceModel
        ``intervals`` (kernel, memcpy, memset, sync, cuda_api, annotation, osrt), ``samples``
        (CPU samples with stacks) and ``ranks`` (one row per profiled process).

    Raises
    ------
    TraceInputError
        The file is missing, not an SQLite database, corrupt, or not an nsys export.

    Examples
    --------
    >>> from traceinsight.ingest.nsys import read_nsys
    >>> model = read_nsys("trace.sqlite")  # doctest: +SKIP
    >>> model.of_kind("kernel").select("name", "start_ns", "end_ns").head(3)  # doctest: +SKIP
    >>> model.ranks.select("rank", "rank_source", "pid", "gpu_names")  # doctest: +SKIP
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise TraceInputError("no such file", path=path)
    if os.path.isdir(path):
        raise TraceInputError("is a directory, expected an nsys SQLite export", path=path)
    guard.check_regular(path)  # a FIFO or a device would block the open
    truncated = _truncation(path)
    if truncated:
        raise TraceFormatError(truncated, path=path)
    copy_folder = None
    try:
        connection, copy_folder = _open_untouched(path)
        notes = (
            ["the export has a write-ahead log or rollback journal beside it (an export still being "
             "written, or a crash): it was read from a private copy, so neither file changed"]
            if copy_folder else []
        )
        export = _Export(connection, path)
        export.copied = copy_folder is not None
        with _interruptible(connection, path) as deadline:
            export.deadline = deadline
            reader = _NsysReader(export)
            reader.warnings.extend(notes)
            return reader.read()
    except sqlite3.DatabaseError as exc:
        raise TraceFormatError(_database_error_message(exc), path=path) from None
    except UnicodeDecodeError:
        # SQLite's own error message quoted bytes of a damaged schema that are not UTF-8.
        raise TraceFormatError(
            _database_error_message(sqlite3.DatabaseError("malformed database schema")), path=path
        ) from None
    finally:
        if "export" in locals():
            export.close()
        if "connection" in locals():
            connection.close()
        if copy_folder is not None:
            shutil.rmtree(copy_folder, ignore_errors=True)


#: Files SQLite keeps beside a database while it is written: a write-ahead log, or the
#: rollback journal of an interrupted transaction.
_SIDECARS = ("-wal", "-journal")
#: Seconds a read of one export may take: a base plus one second per MiB of file (reading
#: runs at tens of MiB per second). Only a database built to hang gets there.
SQLITE_DEADLINE_S = 120.0
SQLITE_DEADLINE_S_PER_MIB = 1.0
#: Rows of one Arrow batch: more than any table holds, so each result is one batch.
ARROW_BATCH_ROWS = 1_000_000_000


def _open_untouched(path: str) -> tuple[sqlite3.Connection, str | None]:
    """A connection to ``path`` that can change nothing in or beside it, and the private
    folder to remove afterwards (``None`` when there is none).

    A database alone is opened ``immutable`` (read-only, no locks, no ``-shm`` created).
    A database with a write-ahead log (``-wal``) or a rollback journal beside it holds its
    true content only with that file: opening it in place, even read-only, creates or
    writes ``-shm`` and may checkpoint or roll back, and ``immutable`` would ignore the
    log (and miss tables). Such a database and its log are copied to a private folder and
    the copy is opened, so the user's files stay as they are.
    """
    sidecars = [suffix for suffix in _SIDECARS if os.path.isfile(path + suffix) and os.path.getsize(path + suffix)]
    if not sidecars:
        # A URI built by pathlib escapes '?', '#' and '%' in the path.
        uri = Path(path).resolve().as_uri() + "?mode=ro&immutable=1"
        try:
            return sqlite3.connect(uri, uri=True), None
        except sqlite3.Error as exc:
            raise TraceFormatError(
                f"cannot open as SQLite database ({one_line(str(exc), limit=160)})", path=path
            ) from None
    folder = tempfile.mkdtemp(prefix="traceinsight-sqlite-")
    try:
        copy = os.path.join(folder, "export.sqlite")
        try:
            with guard.open_regular(path) as source, open(copy, "wb") as target:
                shutil.copyfileobj(source, target, 1 << 20)
            for suffix in sidecars:
                shutil.copyfile(path + suffix, copy + suffix)
        except OSError as exc:
            raise TraceInputError(
                f"has a {' and a '.join(s.lstrip('-') for s in sidecars)} file beside it, so it is read from a "
                f"private copy, and copying it to {folder} failed ({exc.strerror or exc}); free space there "
                "(or set TMPDIR), or let the program that writes the database finish",
                path=path,
            ) from None
        try:
            connection = sqlite3.connect(Path(copy).as_uri() + "?mode=rw", uri=True)
        except sqlite3.Error as exc:
            raise TraceFormatError(
                f"cannot open as SQLite database ({one_line(str(exc), limit=160)})", path=path
            ) from None
        return connection, folder
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


@contextlib.contextmanager
def _interruptible(connection: sqlite3.Connection, path: str):
    """Read ``connection`` untrusted: its schema's functions are not run (``trusted_schema``
    off), nothing can be written (``query_only``), and every query stops at SIGINT/SIGTERM
    or past a deadline (a progress handler; SQLite would otherwise not return to Python,
    and the signal's exception would be lost inside the handler)."""
    connection.execute("PRAGMA trusted_schema = OFF")
    connection.execute("PRAGMA query_only = ON")
    # Decode leniently: some exports hold strings that are not valid UTF-8
    # (TARGET_INFO_SYSTEM_ENV values).
    connection.text_factory = lambda raw: raw.decode("utf-8", "replace")
    try:
        size_mib = os.path.getsize(path) / 2**20
    except OSError:
        size_mib = 0.0
    limit_s = SQLITE_DEADLINE_S + SQLITE_DEADLINE_S_PER_MIB * size_mib
    deadline = time.monotonic() + limit_s
    caught: list[tuple[int, Any]] = []

    def progress() -> int:
        return 1 if caught or time.monotonic() > deadline else 0

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for number in (signal.SIGINT, signal.SIGTERM):
            previous = signal.getsignal(number)
            if callable(previous):  # a Python handler that raises (KeyboardInterrupt...)

                def handler(signum, frame, previous=previous):
                    caught.append((signum, previous))
                    previous(signum, frame)

                handlers[number] = previous
                signal.signal(number, handler)
    connection.set_progress_handler(progress, 20_000)
    try:
        yield deadline
    except sqlite3.OperationalError as exc:
        if "interrupt" not in str(exc):
            raise
        if caught:  # the signal's exception was raised inside the progress handler and lost
            signum, previous = caught[0]
            previous(signum, None)
        raise TraceFormatError(
            f"reading the SQLite file did not finish within {limit_s:,.0f} s (a query over it does not "
            "end); it is damaged or built to hang; export it again (nsys export --type sqlite)",
            path=path,
        ) from None
    finally:
        connection.set_progress_handler(None, 0)
        for number, previous in handlers.items():
            signal.signal(number, previous)


def _database_error_message(exc: sqlite3.DatabaseError) -> str:
    text = one_line(str(exc), limit=160)  # SQLite may quote a damaged schema
    if "malformed" in text or "not a database" in text or "corrupt" in text:
        return (
            f"the SQLite file is damaged ({text}): it was cut short or corrupted after nsys "
            "wrote it; export it again (nsys export --type sqlite REPORT.nsys-rep)"
        )
    if "locked" in text or "busy" in text:
        return f"the SQLite file is locked by another program ({text}); retry when it is done"
    return (
        f"not a readable SQLite database ({text}); expected an Nsight Systems export "
        "(nsys export --type sqlite)"
    )


def _truncation(path: str) -> str | None:
    """A message if the file is shorter than its SQLite header says, else None.

    Bytes 16-17 of the header hold the page size (1 means 65536) and bytes 28-31 the page
    count, which is valid when bytes 92-95 equal the change counter at bytes 24-27.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            header = handle.read(100)
    except OSError:
        return None  # the open below reports it
    if len(header) < 100:
        return (
            f"the SQLite file is truncated: only {size:,} bytes, less than its 100-byte header; "
            "copy it again or export it again (nsys export --type sqlite)"
        )
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    if header[92:96] != header[24:28] or not pages or page_size < 512:
        return None
    expected = page_size * pages
    if size < expected:
        return (
            f"the SQLite file is truncated: it holds {size:,} of the {expected:,} bytes its "
            "header announces; copy it again or export it again (nsys export --type sqlite)"
        )
    return None


class _Export:
    """The open export: which tables and columns exist, and typed reads of them."""

    def __init__(self, connection: sqlite3.Connection, path: str) -> None:
        self.connection = connection
        self.path = path
        # Only real tables are read. A view (or a virtual table) would run SQL written by
        # whoever made the file: a recursive view never ends. nsys writes neither.
        self.tables: set[str] = set()
        self.ignored: list[str] = []
        for name, kind, sql in connection.execute("SELECT name, type, sql FROM sqlite_master"):
            if not isinstance(name, str) or kind not in ("table", "view"):
                continue
            if kind == "table" and not str(sql or "").lstrip().upper().startswith("CREATE VIRTUAL"):
                self.tables.add(name)
            else:
                self.ignored.append(name)
        self._columns: dict[str, set[str]] = {}
        #: Set by the caller: the monotonic time past which reads are abandoned; ``copied``
        #: when ``connection`` is to a private copy of the file.
        self.deadline: float | None = None
        self.copied = False
        self._adbc: Any = None

    def is_nsys_export(self) -> bool:
        return any(
            table == marker or table.startswith(marker)
            for table in self.tables
            for marker in _NSYS_MARKER_TABLES
        )

    def table(self, base: str) -> str | None:
        """The table called ``base``, or its highest versioned variant (``base_V3``)."""
        if base in self.tables:
            return base
        versioned = [
            (int(match.group(1)), table)
            for table in self.tables
            if (match := re.fullmatch(re.escape(base) + r"_V(\d+)", table))
        ]
        return max(versioned)[1] if versioned else None

    def columns(self, table: str) -> set[str]:
        if table not in self._columns:
            self._columns[table] = {
                row[1] for row in self.connection.execute(f'PRAGMA table_info("{table}")')
            }
        return self._columns[table]

    def has_columns(self, table: str | None, *names: str) -> bool:
        return table is not None and all(name in self.columns(table) for name in names)

    def rows(self, sql: str, parameters: tuple = ()) -> list[tuple]:
        # sqlite3's own UTF-8 decoding (in C) first: a Python text factory costs a call per
        # string, which for an emit_nvtx export's 400k range names is a large part of the
        # read. Only if some text is not valid UTF-8 is the query read again with the
        # connection's lenient factory, which gives the same strings where they decode.
        lenient = self.connection.text_factory
        if lenient is str:
            return self.connection.execute(sql, parameters).fetchall()
        try:
            self.connection.text_factory = str
            return self.connection.execute(sql, parameters).fetchall()
        except sqlite3.OperationalError as exc:
            if "decode" not in str(exc):
                raise
        finally:
            self.connection.text_factory = lenient
        return self.connection.execute(sql, parameters).fetchall()

    def read(
        self,
        table: str,
        fields: list[tuple[str, str, pl.DataType]],
        *,
        where: str = "",
    ) -> pl.DataFrame:
        """Read ``fields`` (alias, column, dtype) of ``table``; absent columns come back null.

        Values are converted in SQL because SQLite columns are untyped and user-modified
        exports exist: integer columns keep integers, truncate reals and read text only
        when it is an integer written out ("123"); anything else (words, blobs) is NULL, so
        a damaged row is dropped with a warning instead of becoming time 0. Text columns
        read any value as text. The rows go straight into a polars frame.
        """
        present = self.columns(table)
        schema = [(alias, dtype) for alias, _, dtype in fields]
        plain, converted = [], []
        for alias, column, dtype in fields:
            quoted = f'"{column}"'
            if column not in present:
                plain.append(f'NULL AS "{alias}"')
                converted.append(f'NULL AS "{alias}"')
                continue
            plain.append(f'{quoted} AS "{alias}"')
            if dtype == _INT:
                expression = (
                    f"CASE typeof({quoted}) WHEN 'integer' THEN {quoted} "
                    f"WHEN 'real' THEN CAST({quoted} AS INTEGER) "
                    f"WHEN 'text' THEN CASE WHEN CAST(CAST({quoted} AS INTEGER) AS TEXT) = "
                    f"trim({quoted}) THEN CAST({quoted} AS INTEGER) END END"
                )
            else:
                expression = f"CAST({quoted} AS TEXT)"
            converted.append(f'{expression} AS "{alias}"')
        suffix = f' FROM "{table}"' + (f" WHERE {where}" if where else "")
        arrow = self._arrow_read(fields, present, suffix)
        if arrow is not None:
            return arrow
        try:
            # Fast path: an export as nsys wrote it holds the declared types.
            return pl.DataFrame(
                self.rows(f"SELECT {', '.join(plain)}{suffix}"),
                schema=schema,
                orient="row",
                strict=True,
            )
        except (pl.exceptions.PolarsError, TypeError, ValueError, OverflowError):
            return pl.DataFrame(
                self.rows(f"SELECT {', '.join(converted)}{suffix}"),
                schema=schema,
                orient="row",
                strict=False,
            )

    def _arrow_read(
        self, fields: list[tuple[str, str, pl.DataType]], present: set[str], suffix: str
    ) -> pl.DataFrame | None:
        """The rows of a table read straight into Arrow columns (ADBC's SQLite driver), or
        ``None`` where this fast path cannot give the same frame as the sqlite3 one.

        Reading through Python's sqlite3 makes a Python object per value: for an emit_nvtx
        export's 440k ranges that is most of the read's time and memory. Text columns are
        read as bytes and decoded by polars, which refuses invalid UTF-8; any such column, a
        value of another type than declared (a real in an integer column), or any driver
        error sends the read to the sqlite3 path, which handles them.
        """
        connection = self._arrow_connection()
        if connection is None:
            return None
        columns = []
        for alias, column, dtype in fields:
            if column not in present:
                columns.append(f'NULL AS "{alias}"')
            elif dtype == _INT:
                columns.append(f'"{column}" AS "{alias}"')
            else:
                columns.append(f'CAST("{column}" AS BLOB) AS "{alias}"')
        frame = self._arrow_query(connection, f"SELECT {', '.join(columns)}{suffix}")
        if frame is None or frame.width != len(fields):
            return None
        out = []
        for (alias, _, dtype), series in zip(fields, frame.get_columns()):
            if series.null_count() == series.len():
                out.append(pl.Series(alias, [None] * series.len(), dtype=dtype))
            elif dtype == _INT and series.dtype == pl.Int64:
                out.append(series.alias(alias))
            elif dtype != _INT and series.dtype == pl.Binary:
                try:
                    out.append(series.cast(pl.String).alias(alias))
                except pl.exceptions.PolarsError:  # not UTF-8
                    return None
            else:
                return None
        return pl.DataFrame(out)

    def _arrow_connection(self) -> Any:
        """An ADBC connection to the same file, opened immutable and untrusted like the
        sqlite3 one; ``None`` where the driver is missing or the file was read from a
        private copy (a write-ahead log beside it: only sqlite3 reads that as it must)."""
        if self._adbc is False:
            return None
        if self._adbc is None:
            self._adbc = False
            if self.deadline is None or self.copied:
                return None
            try:
                import adbc_driver_manager
                import adbc_driver_sqlite
            except ImportError:
                return None
            uri = Path(self.path).resolve().as_uri() + "?mode=ro&immutable=1"
            try:
                database = adbc_driver_sqlite.connect(uri)
                connection = adbc_driver_manager.AdbcConnection(database)
            except Exception:  # the driver refuses what sqlite3 opened: stay with sqlite3
                return None
            self._adbc_database = database
            self._adbc = connection
            for pragma in ("PRAGMA trusted_schema = OFF", "PRAGMA query_only = ON"):
                if self._arrow_query(connection, pragma, frame=False) is None:
                    self.close()
                    return None
        return self._adbc

    def _arrow_query(self, connection: Any, sql: str, *, frame: bool = True) -> pl.DataFrame | None:
        """Run ``sql`` on the ADBC connection in a worker thread, waiting in short slices:
        the driver cannot be interrupted, so a query still running at the read's deadline
        is abandoned (it raises the same interruption the sqlite3 progress handler does),
        and Ctrl-C reaches the main thread while it waits."""
        import adbc_driver_manager

        if time.monotonic() > self.deadline:  # past the deadline no query starts
            raise sqlite3.OperationalError("interrupted")
        result: dict[str, Any] = {}

        def run() -> None:
            statement = adbc_driver_manager.AdbcStatement(connection)
            try:
                # One batch for the whole result: the driver infers each column's type
                # from its first batch, and a later batch of another type is an error.
                statement.set_options(**{"adbc.sqlite.query.batch_rows": str(ARROW_BATCH_ROWS)})
                statement.set_sql_query(sql)
                if frame:
                    stream, _ = statement.execute_query()
                    result["frame"] = pl.DataFrame(stream)
                else:
                    statement.execute_update()
                    result["frame"] = pl.DataFrame()
            except Exception as exc:  # noqa: BLE001 - any failure means: use sqlite3
                result["error"] = exc
            finally:
                statement.close()

        worker = threading.Thread(target=run, name="traceinsight-adbc", daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(0.05)
            if worker.is_alive() and time.monotonic() > self.deadline:
                self._adbc = False  # abandoned: never used again
                raise sqlite3.OperationalError("interrupted")
        return result.get("frame")

    def close(self) -> None:
        """Close the ADBC connection, if one was opened (the sqlite3 one is the caller's)."""
        connection, self._adbc = self._adbc, False
        if connection not in (None, False):
            connection.close()
            self._adbc_database.close()

    def name_value_table(self, *candidates: str) -> dict[str, str]:
        """First value per name of the first (name, value) metadata table present."""
        for base in candidates:
            table = self.table(base)
            if self.has_columns(table, "name", "value"):
                values: dict[str, str] = {}
                for name, value in self.rows(f'SELECT name, value FROM "{table}"'):
                    if name is not None and name not in values:
                        values[str(name)] = value if value is None else str(value)
                return values
        return {}

    def enum(self, base: str, fallback: dict[int, str], *, column: str = "label") -> dict[int, str]:
        """``id -> label`` of an ENUM_* table, on top of a built-in fallback."""
        labels = dict(fallback)
        table = self.table(base)
        if self.has_columns(table, "id", column):
            for enum_id, label in self.rows(f'SELECT id, "{column}" FROM "{table}"'):
                number = _parse_int(enum_id)
                if number is not None and label is not None:
                    labels[number] = guard.scrub_value(str(label))
        return labels


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


class _NsysReader:
    """Builds the three frames from one open export."""

    def __init__(self, export: _Export) -> None:
        self.export = export
        self.warnings: list[str] = []
        self._strings: pl.DataFrame | None = None

    # -- entry point ---------------------------------------------------------------------

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

    def _check_memory(self) -> None:
        """Refuse, before reading, an export whose event tables clearly do not fit in memory."""
        if guard.memory_budget() is None:
            return
        rows = 0
        for base in (
            KERNEL_TABLE, MEMCPY_TABLE, MEMSET_TABLE, SYNC_TABLE, RUNTIME_TABLE, NVTX_TABLE,
            OSRT_TABLE, OSRT_CALLCHAIN_TABLE, SAMPLE_TABLE, SAMPLE_CALLCHAIN_TABLE, STRING_TABLE,
        ):
            table = self.export.table(base)
            if table is None:
                continue
            try:  # rowids grow from 1 in an export: the largest is the row count, read in O(log n)
                (largest,) = self.export.rows(f'SELECT max(rowid) FROM "{table}"')[0]
            except sqlite3.OperationalError:  # a view or a WITHOUT ROWID table
                continue
            rows += _parse_int(largest) or 0
        # A row takes at least a byte of the file: a damaged rowid cannot claim more.
        rows = min(rows, os.path.getsize(self.export.path))
        guard.check_memory(
            self.export.path,
            rows * guard.NSYS_BYTES_PER_ROW,
            what=f"{rows:,} rows in its event and string tables",
        )

    def read(self) -> TraceModel:
        export = self.export
        if not export.is_nsys_export():
            raise TraceFormatError(
                "SQLite database is not an Nsight Systems export (no StringIds and no nsys "
                "tables); create one with `nsys export --type sqlite`",
                path=export.path,
            )
        self._check_memory()
        if export.ignored:
            names = sorted(guard.scrub_value(one_line(name, limit=80)) for name in export.ignored)
            self.warnings.append(
                f"{len(names)} view(s) or virtual table(s) ignored ({', '.join(names[:5])}"
                f"{', ...' if len(names) > 5 else ''}): only tables are read, the SQL of an untrusted "
                "file is not run"
            )
        if export.table(STRING_TABLE) is None:
            self.warnings.append(
                "the export has no StringIds table: kernel, CUDA API and range names are unknown"
            )
        if export.table(KERNEL_TABLE) is None:
            self.warnings.append(
                f"no {KERNEL_TABLE} table: the export has no GPU kernels (profile with "
                "--trace=cuda to record them)"
            )
        runtime = self._cuda_api()
        parts = [
            self._kernels(),
            self._memcpys(),
            self._memsets(),
            self._syncs(runtime),
            runtime,
            self._annotations(),
            self._osrt_calls(),
        ]
        parts = [part for part in parts if part is not None and not part.is_empty()]
        samples = self._samples()

        event_processes = (
            pl.concat([part.select("_proc") for part in parts]).unique()
            if parts
            else pl.DataFrame(schema={"_proc": _INT})
        )
        if event_processes.is_empty() and samples is not None and not samples.is_empty():
            # A sampling-only capture: the sampled processes are all we know of.
            event_processes = samples.select("_proc").unique()
        event_processes = event_processes.drop_nulls()
        # Rows without a process id (globalTid/globalPid NULL) get no rank; the check of the
        # model below drops them and says how many.
        if samples is not None:
            samples = samples.join(event_processes, on="_proc", how="semi")

        if not parts and (samples is None or samples.is_empty()):
            self.warnings.append(
                "no events: the export has no CUDA, NVTX, OS runtime or CPU sampling rows"
            )

        ranks, rank_of_process = self._ranks(event_processes, parts)
        to_rank = pl.col("_proc").replace_strict(
            rank_of_process, default=None, return_dtype=pl.Int32
        )

        if parts:
            intervals = pl.concat(
                [part.with_columns(rank=to_rank) for part in parts], how="diagonal_relaxed"
            )
            intervals = _conformed(intervals, INTERVAL_SCHEMA).sort(
                ["rank", "start_ns"], nulls_last=True, maintain_order=True
            )
            intervals = with_depth(guard.valid_intervals(intervals, self.warnings))
        else:
            intervals = empty_frame(INTERVAL_SCHEMA)

        if samples is not None and not samples.is_empty():
            samples = _conformed(samples.with_columns(rank=to_rank), SAMPLE_SCHEMA).sort(
                ["rank", "time_ns"], nulls_last=True, maintain_order=True
            )
            samples = guard.valid_samples(samples, self.warnings)
        else:
            samples = empty_frame(SAMPLE_SCHEMA)

        return TraceModel(intervals=intervals, samples=samples, ranks=ranks, warnings=self.warnings)

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

    def _kernels(self) -> pl.DataFrame | None:
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

    def _memcpys(self) -> pl.DataFrame | None:
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

    def _memsets(self) -> pl.DataFrame | None:
        frame = self._gpu_activity(MEMSET_TABLE, [("bytes", "bytes", _INT)])
        if frame is None:
            return None
        return frame.with_columns(kind=pl.lit("memset"), name=pl.lit("Memset"))

    def _cuda_api(self) -> pl.DataFrame | None:
        table = self.export.table(RUNTIME_TABLE)
        if not self._usable(table, "start", "end", "globalTid"):
            return None
        frame = self.export.read(
            table,
            [
                ("start_ns", "start", _INT),
                ("end_ns", "end", _INT),
                ("_global_tid", "globalTid", _INT),
                ("correlation", "correlationId", _INT),
                ("_name_id", "nameId", _INT),
                ("_event_class", "eventClass", _INT),
            ],
        )
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

    def _syncs(self, runtime: pl.DataFrame | None) -> pl.DataFrame | None:
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

    def _annotations(self) -> pl.DataFrame | None:
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
        events = events.join(domains, on=["_proc", "_domain_id"], how="left")
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

    def _osrt_calls(self) -> pl.DataFrame | None:
        table = self.export.table(OSRT_TABLE)
        if not self._usable(table, "start", "end", "globalTid"):
            return None
        frame = self.export.read(
            table,
            [
                ("start_ns", "start", _INT),
                ("end_ns", "end", _INT),
                ("_global_tid", "globalTid", _INT),
                ("_name_id", "nameId", _INT),
                ("_callchain", "callchainId", _INT),
            ],
        )
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

    def _samples(self) -> pl.DataFrame | None:
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

    # -- ranks ---------------------------------------------------------------------------

    def _ranks(
        self, processes: pl.DataFrame, parts: list[pl.DataFrame]
    ) -> tuple[pl.DataFrame, dict[int, int]]:
        export = self.export
        metadata = export.name_value_table("META_DATA_EXPORT", "EXPORT_META_DATA")
        tool_version = metadata.get("EXPORT_PRODUCT_VERSION")
        clock_origin = self._clock_origin(metadata)
        environments, launched_pids = self._captured_environments()
        hostname = self._hostname(environments)
        gpu_names = self._gpu_names()

        process_keys = sorted(processes.get_column("_proc").to_list())
        # Devices each process ran work on (kernels, copies, memsets): the GPUs it used.
        # Sync rows carry a device too, but they are host-side waits.
        gpu_work = [
            part.select("_proc", "device", "kind") for part in parts if "device" in part.columns
        ]
        devices_of: dict[int, list[int]] = {}
        if gpu_work:
            used = (
                pl.concat(gpu_work)
                .filter(pl.col("kind").is_in(["kernel", "memcpy", "memset"]))
                .select("_proc", pl.col("device").cast(pl.Int32, strict=False))
                .drop_nulls()
                .unique()
            )
            for key, device in used.sort("device").iter_rows():
                devices_of.setdefault(key, []).append(device)

        environment_of: dict[int, dict[str, str]] = {}
        for key in process_keys:
            pid = key % _ID_SPAN
            matching = [n for n, launched in launched_pids.items() if launched == pid and pid]
            if matching:
                environment_of[key] = environments.get(matching[0], {})
            elif len(process_keys) == 1 and len(environments) == 1:
                # nsys launched one program and it is the only profiled process: the
                # recorded environment is its own. With several processes (torchrun, mpirun)
                # it is the launcher's, and RANK there would describe no child.
                environment_of[key] = next(iter(environments.values()))

        explicit: dict[int, tuple[int, str]] = {}
        mpi_ranks = self._mpi_ranks()
        for key in process_keys:
            environment = environment_of.get(key, {})
            if key in mpi_ranks:
                explicit[key] = (mpi_ranks[key], "MPI_RANKS")
                continue
            for variable in ("RANK", "LOCAL_RANK"):
                number = _parse_int(environment.get(variable))
                if number is not None and 0 <= number < 2**31:
                    explicit[key] = (number, f"env:{variable}")
                    break
        claimed = [rank for rank, _ in explicit.values()]
        use_explicit = len(explicit) == len(process_keys) and len(set(claimed)) == len(claimed)

        rows = []
        rank_of_process: dict[int, int] = {}
        for order, key in enumerate(process_keys):
            if use_explicit:
                rank, rank_source = explicit[key]
            else:
                rank, rank_source = order, "process order"
            rank_of_process[key] = rank
            devices = devices_of.get(key, [])
            rows.append(
                {
                    "rank": rank,
                    "rank_source": rank_source,
                    "source": export.path,
                    "format": FORMAT_NAME,
                    "tool_version": guard.scrub_value(tool_version),
                    "pid": key % _ID_SPAN,
                    "hostname": guard.scrub_value(hostname),
                    "gpu_names": [gpu_names[d] for d in devices if d in gpu_names],
                    "devices": devices,
                    "world_size": _world_size(environment_of.get(key, {}).get("WORLD_SIZE")),
                    "clock_origin_ns": clock_origin,
                }
            )
        unnamed = sorted({d for used in devices_of.values() for d in used} - set(gpu_names))
        if unnamed:
            self.warnings.append(
                "GPU names unknown for device(s) "
                + ", ".join(str(d) for d in unnamed)
                + " (the export has no TARGET_INFO_GPU row for them)"
            )
        if explicit and not use_explicit and len(process_keys) > 1:
            self.warnings.append(
                "rank numbers in the export are incomplete or collide; ranks follow process order"
            )
        ranks = pl.DataFrame(rows, schema=RANK_SCHEMA) if rows else empty_frame(RANK_SCHEMA)
        return ranks, rank_of_process

    def _clock_origin(self, metadata: dict[str, str]) -> int | None:
        normalized = str(metadata.get("EXPORT_PARAM_TIME_NORMALIZE", "false")).lower() == "true"
        shift = _parse_int(metadata.get("EXPORT_PARAM_TIME_SHIFT")) or 0
        if normalized:
            # --ts-normalize re-bases timestamps to the Unix epoch already.
            return -shift
        table = self.export.table("TARGET_INFO_SESSION_START_TIME")
        if not self.export.has_columns(table, "utcEpochNs"):
            self.warnings.append(
                "no session start time in the export: times are relative, wall-clock unknown"
            )
            return None
        row = self.export.rows(f'SELECT utcEpochNs FROM "{table}" LIMIT 1')
        epoch = _parse_int(row[0][0]) if row else None
        if epoch is None:
            return None
        # --ts-shift=N added N to every timestamp: the zero moved N earlier.
        origin = epoch - shift
        return origin if -(2**63) <= origin < 2**63 else None

    def _captured_environments(self) -> tuple[dict[str, dict[str, str]], dict[str, int]]:
        """Environment and pid per launched process (``PROCESS_n``) from META_DATA_CAPTURE.

        Only the few variables the model uses are kept; the rest (paths, user names, secrets)
        is never read into memory.
        """
        table = self.export.table("META_DATA_CAPTURE")
        environments: dict[str, dict[str, str]] = {}
        launched_pids: dict[str, int] = {}
        if not self.export.has_columns(table, "name", "value"):
            return environments, launched_pids
        wanted = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "HOSTNAME", "COMPUTERNAME")
        # LIKE patterns: '_' is a wildcard in SQL, so the one in "PROCESS_" is escaped with '!'.
        environment_rows = "PROCESS!_%:ENVIRONMENT_VARIABLE"
        pid_rows = "PROCESS!_%:PID"
        where_name = "name LIKE ? ESCAPE '!'"
        any_wanted = " OR ".join("value LIKE ?" for _ in wanted)
        rows = self.export.rows(
            f'SELECT name, value FROM "{table}" WHERE {where_name} AND ({any_wanted})',
            (environment_rows, *(f"{variable}=%" for variable in wanted)),
        )
        for name, value in rows:
            process = str(name).partition(":")[0]
            variable, _, raw = str(value).partition("=")
            if variable in wanted:  # LIKE ignores case; the variable names do not
                environments.setdefault(process, {})[variable] = raw.strip().strip('"')
        for name, value in self.export.rows(
            f'SELECT name, value FROM "{table}" WHERE {where_name}', (pid_rows,)
        ):
            number = _parse_int(value)
            if number is not None:
                launched_pids[str(name).partition(":")[0]] = number
        # A launched process with none of the wanted variables still has an environment.
        for (name,) in self.export.rows(
            f'SELECT DISTINCT name FROM "{table}" WHERE {where_name}', (environment_rows,)
        ):
            environments.setdefault(str(name).partition(":")[0], {})
        return environments, launched_pids

    def _hostname(self, environments: dict[str, dict[str, str]]) -> str | None:
        table = self.export.table("TARGET_INFO_SYSTEM_ENV")
        if self.export.has_columns(table, "name", "value"):
            row = self.export.rows(
                f"SELECT value FROM \"{table}\" WHERE name = 'Hostname' AND value != '' LIMIT 1"
            )
            if row:
                return str(row[0][0])
        # EXPORT_HOST is where the export ran, often not the profiled machine: not used.
        for environment in environments.values():
            for variable in ("HOSTNAME", "COMPUTERNAME"):
                if environment.get(variable):
                    return environment[variable]
        return None

    def _gpu_names(self) -> dict[int, str]:
        names: dict[int, str] = {}
        table = self.export.table("TARGET_INFO_GPU")
        if table is not None and "name" in self.export.columns(table):
            # Current exports key GPUs by `id`; the legacy exporter calls it `deviceId`.
            id_column = next(
                (c for c in ("id", "deviceId") if c in self.export.columns(table)), None
            )
            if id_column:
                for device, name in self.export.rows(f'SELECT "{id_column}", name FROM "{table}"'):
                    if _parse_int(device) is not None and name:
                        names.setdefault(_parse_int(device), guard.scrub_value(str(name).strip()))
        legacy = self.export.table("TARGET_INFO_CUDA_GPU")
        if not names and legacy is not None and "name" in self.export.columns(legacy):
            id_column = next(
                (c for c in ("id", "deviceId", "cudaId") if c in self.export.columns(legacy)), None
            )
            # Without an id column the rows are in CUDA ordinal order.
            select = f'"{id_column}"' if id_column else "rowid - 1"
            for device, name in self.export.rows(
                f'SELECT {select}, name FROM "{legacy}" ORDER BY rowid'
            ):
                if _parse_int(device) is not None and name:
                    names.setdefault(_parse_int(device), guard.scrub_value(str(name).strip()))
        return names

    def _mpi_ranks(self) -> dict[int, int]:
        """Process key -> rank from ``MPI_RANKS(globalTid, rank)`` (``--trace=mpi``)."""
        table = self.export.table("MPI_RANKS")
        if not self.export.has_columns(table, "globalTid", "rank"):
            return {}
        ranks: dict[int, int] = {}
        for global_tid, rank in self.export.rows(
            f'SELECT DISTINCT CAST(globalTid AS INTEGER), CAST(rank AS INTEGER) FROM "{table}"'
        ):
            if global_tid is not None and rank is not None and 0 <= rank < 2**31:
                ranks.setdefault(global_tid // _ID_SPAN, rank)
        return ranks


def _world_size(value: object) -> int | None:
    number = _parse_int(value)
    return number if number is not None and 0 < number < 2**31 else None


def _conformed(frame: pl.DataFrame, schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """``frame`` with exactly the columns of ``schema``, absent ones as typed null literals.

    Same result as :func:`traceinsight.model.conform`, which builds a Python list of ``None``
    per absent column; a null literal instead saves about 0.1 s on a 500k-interval export.
    """
    return frame.select(
        (pl.col(name) if name in frame.columns else pl.lit(None))
        .cast(dtype, strict=False)
        .alias(name)
        for name, dtype in schema.items()
    )


def _parse_int(value: object) -> int | None:
    """An int64 from an integer or its text; anything else (words, blobs, reals with a
    fraction, numbers past int64) is None."""
    if value is None or isinstance(value, (bytes, bytearray)):
        return None
    try:
        number = int(str(value).strip())
    except ValueError:
        try:
            real = float(str(value).strip())
        except ValueError:
            return None
        if not real.is_integer():
            return None
        number = int(real)
    return number if -(2**63) <= number < 2**63 else None
