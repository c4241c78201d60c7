"""Query and fetch: the export opened untouched and read untrusted, table by table.

- :func:`_open_untouched`: read-only and without locks; a database with a write-ahead log or
  a rollback journal beside it is read from a private copy, so that no file changes;
- :func:`_interruptible`: the schema's SQL is never run, nothing can be written, and every
  query stops at SIGINT/SIGTERM or past a deadline;
- :class:`_Export`: which tables and columns exist (nsys creates tables lazily and changes
  columns between versions), and typed reads of them; :func:`_check_memory` refuses an
  export too large for memory before anything is read.
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

import traceinsight.ingest.guard as guard
from traceinsight.errors import TraceFormatError, TraceInputError, one_line

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

_INT = pl.Int64()
_STR = pl.String()


#: Files SQLite keeps beside a database while it is written: a write-ahead log, or the
#: rollback journal of an interrupted transaction.
_SIDECARS = ("-wal", "-journal")
#: Seconds a read of one export may take: a base plus one second per MiB of file (reading
#: runs at tens of MiB per second). Only a database built to hang gets there.
SQLITE_DEADLINE_S = 120.0
SQLITE_DEADLINE_S_PER_MIB = 1.0
#: The most rows the Arrow read takes in its one batch (the driver's limit is below 2**31);
#: a larger table is read through sqlite3.
ARROW_MAX_ROWS = 1_000_000_000


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
        arrow = self._arrow_read(table, fields, present, suffix)
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
        self, table: str, fields: list[tuple[str, str, pl.DataType]], present: set[str], suffix: str
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
        # One batch for the whole result: the driver infers each column's type from its
        # first batch (a later batch of another type is an error), and it reserves memory
        # for a batch's rows up front, so the batch is sized to the table, not to a limit.
        (rows,) = self.rows(f'SELECT count(*) FROM "{table}"')[0]
        if not isinstance(rows, int) or rows >= ARROW_MAX_ROWS:
            return None
        frame = self._arrow_query(connection, f"SELECT {', '.join(columns)}{suffix}", batch_rows=rows + 1)
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

    def _arrow_query(self, connection: Any, sql: str, *, frame: bool = True,
                     batch_rows: int = 1) -> pl.DataFrame | None:
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
                statement.set_options(**{"adbc.sqlite.query.batch_rows": str(batch_rows)})
                statement.set_sql_query(sql)
                if frame:
                    stream, _ = statement.execute_query()
                    result["frame"] = pl.DataFrame(stream)
                else:
                    statement.execute_update()
                    result["frame"] = pl.DataFrame()
            except Exception:  # noqa: BLE001 - any failure means: use sqlite3 (no "frame")
                pass
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


def _check_memory(export: _Export) -> None:
    """Refuse, before reading, an export whose event tables clearly do not fit in memory."""
    if guard.memory_budget() is None:
        return
    rows = 0
    for base in (
        KERNEL_TABLE, MEMCPY_TABLE, MEMSET_TABLE, SYNC_TABLE, RUNTIME_TABLE, NVTX_TABLE,
        OSRT_TABLE, OSRT_CALLCHAIN_TABLE, SAMPLE_TABLE, SAMPLE_CALLCHAIN_TABLE, STRING_TABLE,
    ):
        table = export.table(base)
        if table is None:
            continue
        try:  # rowids grow from 1 in an export: the largest is the row count, read in O(log n)
            (largest,) = export.rows(f'SELECT max(rowid) FROM "{table}"')[0]
        except sqlite3.OperationalError:  # a view or a WITHOUT ROWID table
            continue
        rows += _parse_int(largest) or 0
    # A row takes at least a byte of the file: a damaged rowid cannot claim more.
    rows = min(rows, os.path.getsize(export.path))
    guard.check_memory(
        export.path,
        rows * guard.NSYS_BYTES_PER_ROW,
        what=f"{rows:,} rows in its event and string tables",
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
