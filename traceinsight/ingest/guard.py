"""Defences shared by the readers against broken, hostile and huge trace files.

- **Memory**: :func:`check_memory` refuses, before reading, a file whose model would clearly
  not fit in the memory available (``/proc/meminfo`` and the cgroup limit), instead of being
  killed by the OOM killer halfway. ``TRACEINSIGHT_MEMORY_LIMIT=8G`` sets the budget by
  hand; ``TRACEINSIGHT_NO_MEMORY_CHECK=1`` turns the check off.
- **Untrusted text**: :func:`scrub_text` replaces terminal control characters (ESC, C1
  controls, ...) in every string read from a trace and shortens absurdly long ones, so a
  kernel name can neither drive the terminal nor stall a regex over millions of rows.
- **Model invariants**: :func:`valid_intervals` and :func:`valid_samples` drop the rows the
  analyses cannot use (no time, a time past the int64 range, an end before the start, no
  rank, a CPU row without a thread) and say in ``warnings`` how many and why; nameless rows
  get the name ``<unnamed>``.
"""

from __future__ import annotations

import math
import os
import re

import polars as pl

from traceinsight.errors import TraceTooLargeError

#: Environment variable: the memory budget to check against (``8G``, ``512M``, bytes).
MEMORY_LIMIT_ENV = "TRACEINSIGHT_MEMORY_LIMIT"
#: Environment variable: set to 1 to skip the memory check.
NO_MEMORY_CHECK_ENV = "TRACEINSIGHT_NO_MEMORY_CHECK"

#: Peak bytes of memory per byte of (decompressed) Kineto JSON while reading it as a
#: stream: measured 0.8 for the read and 0.97 for the whole analysis of a 333 MB trace; the
#: check uses a lower bound so it only refuses clear cases.
KINETO_BYTES_PER_JSON_BYTE = 1
#: The same for the whole-file path (malformed files, salvage, loosely typed fields), which
#: holds the text and its decoded events at once: measured 3.6.
KINETO_WHOLE_FILE_BYTES_PER_JSON_BYTE = 3
#: Peak bytes per row of an nsys event table while reading it (measured about 550).
NSYS_BYTES_PER_ROW = 300
#: Profiler JSON compresses at least this well (10-30x is usual).
MIN_JSON_COMPRESSION = 4
#: Deflate cannot compress better than this, so a larger claimed size is not believable.
MAX_DEFLATE_RATIO = 1032

#: Longest string kept from a trace (a demangled kernel signature is a few KiB; TensorRT
#: layer descriptions reach 35 KiB).
MAX_TEXT = 65536
#: Times further than this from the clock origin (about 73 years in ns) are garbage, and
#: keeping them could overflow int64 arithmetic downstream.
MAX_ABS_TIME_NS = 2**61

UNNAMED = "<unnamed>"

# C0 controls except tab and newline, DEL and the C1 controls (U+009B is a one-character CSI).
_CONTROL = "[\x00-\x08\x0b-\x1f\x7f-\x9f]"
_CONTROL_RE = re.compile(_CONTROL)
_REPLACEMENT = "\ufffd"

#: CPU-side kinds whose rows belong to a thread (sync rows may lack the waiting thread).
_THREAD_KINDS = ("cuda_api", "annotation", "cpu_op", "python", "osrt")


# -- what may be read -----------------------------------------------------------------------


def _kind_of(mode: int) -> str:
    import stat

    for test, what in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "not a regular file"


def not_regular_error(path: str, mode: int):
    from traceinsight.errors import TraceInputError

    return TraceInputError(
        f"is {_kind_of(mode)}, not a trace file; reading it could block forever; save the trace "
        "to a file and pass that", path=path,
    )


def open_regular(path: str):
    """Open ``path`` for reading (binary) only if it is a regular file.

    A FIFO, a device or a socket is refused (:class:`~traceinsight.errors.TraceInputError`)
    instead of blocking forever: the file is opened without blocking, checked with
    ``fstat`` (no race with a file swapped after a check) and only then read normally.
    Missing files and other refusals raise ``OSError`` as ``open`` does.
    """
    import stat

    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(descriptor).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(21, "Is a directory", path)
        if not stat.S_ISREG(mode):
            raise not_regular_error(path, mode)
        if hasattr(os, "set_blocking"):
            os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def check_regular(path: str) -> None:
    """Refuse (without opening it) a path that exists but is not a regular file or folder."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # the reader says what is wrong
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise not_regular_error(path, mode)


# -- memory ---------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """``"8G"``, ``"512M"``, ``"1.5GiB"`` or a byte count -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r} (write e.g. 8G, 512M or a number of bytes)")
    number, unit = match.groups()
    return int(float(number) * 1024 ** "_kmgt".index(unit.lower() or "_"))


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _read_number(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as handle:
            text = handle.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" means no limit


def _cgroup_available() -> int | None:
    """Memory left under this process's cgroup limit (v2, else v1), if there is a limit."""
    # cgroup v2: the group of this process is named in /proc/self/cgroup ("0::/path").
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        if line.startswith("0::"):
            folder = "/sys/fs/cgroup" + line[3:].rstrip("/")
            limit = _read_number(folder + "/memory.max") or _read_number("/sys/fs/cgroup/memory.max")
            used = _read_number(folder + "/memory.current") or _read_number(
                "/sys/fs/cgroup/memory.current"
            )
            if limit is not None:
                return max(limit - (used or 0), 0)
    limit = _read_number("/sys/fs/cgroup/memory/memory.limit_in_bytes")
    if limit is not None and limit < 2**60:  # v1 writes a huge number for "no limit"
        used = _read_number("/sys/fs/cgroup/memory/memory.usage_in_bytes") or 0
        return max(limit - used, 0)
    return None


def available_memory() -> int | None:
    """Bytes this process can still allocate without swapping or an OOM kill (best guess)."""
    candidates = [value for value in (_meminfo_available(), _cgroup_available()) if value is not None]
    return min(candidates) if candidates else None


def memory_budget() -> int | None:
    """The budget reads are checked against; ``None`` when the check is off or unknowable."""
    if os.environ.get(NO_MEMORY_CHECK_ENV, "").strip().lower() not in ("", "0", "false", "no"):
        return None
    explicit = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
    if explicit:
        try:
            return parse_size(explicit)
        except ValueError:
            from traceinsight.errors import OptionError

            raise OptionError(
                f"{MEMORY_LIMIT_ENV}={explicit!r} is not a size; write e.g. 8G, 512M or bytes"
            ) from None
    return available_memory()


def human_bytes(count: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:,.0f} {unit}" if unit == "bytes" else f"{count:,.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def check_memory(path: str, needed: int, *, what: str) -> None:
    """Raise :class:`TraceTooLargeError` if ``needed`` bytes clearly exceed the budget.

    ``what`` says where the estimate comes from ("a 2.1 GiB gzip file holding about 31 GiB
    of JSON").
    """
    budget = memory_budget()
    if budget is None or needed <= budget:
        return
    if os.environ.get(MEMORY_LIMIT_ENV, "").strip():
        source, remedy = f"are allowed by {MEMORY_LIMIT_ENV}", f"raise {MEMORY_LIMIT_ENV}"
    else:
        source, remedy = "are available", "free memory or analyze fewer files at once"
    raise TraceTooLargeError(
        f"reading it needs about {human_bytes(needed)} of memory ({what}) but only "
        f"{human_bytes(budget)} {source}; {remedy}, or set {NO_MEMORY_CHECK_ENV}=1 to try anyway",
        path=path,
    )


def inflated_size_estimate(compressed: int, isize: int | None) -> int:
    """A lower bound of a gzip file's decompressed size.

    The trailer's ISIZE is the size modulo 4 GiB (of the last member only), and a truncated
    file ends in arbitrary bytes, so it is only a hint: the estimate is the smallest size
    that agrees with ISIZE and is at least ``MIN_JSON_COMPRESSION`` times the file, and falls
    back to that floor when no believable size agrees.
    """
    floor = compressed * MIN_JSON_COMPRESSION
    if isize is None:
        return floor
    wraps = max(0, math.ceil((floor - isize) / 2**32))
    size = isize + wraps * 2**32
    return size if size <= compressed * MAX_DEFLATE_RATIO else floor


def check_kineto_memory(path: str) -> int | None:
    """Check a Kineto file before reading it (size, and the gzip trailer); return the memory
    budget (``None``: unlimited), from which the reader derives how many bytes of JSON it
    lets a file decompress to, because a gzip trailer can lie."""
    budget = memory_budget()
    if budget is None:
        return None
    try:
        with open_regular(path) as handle:
            size = os.fstat(handle.fileno()).st_size
            gzipped = handle.read(2) == b"\x1f\x8b"
            isize = None
            if gzipped and size >= 18:
                handle.seek(-4, os.SEEK_END)
                isize = int.from_bytes(handle.read(4), "little")
    except OSError:
        return None  # the reader says what is wrong with the file
    if gzipped:
        json_bytes = inflated_size_estimate(size, isize)
        what = f"a {human_bytes(size)} gzip file holding about {human_bytes(json_bytes)} of JSON"
    else:
        json_bytes = size
        what = f"{human_bytes(size)} of JSON"
    check_memory(path, json_bytes * KINETO_BYTES_PER_JSON_BYTE, what=what)
    return budget


#: A gzip stream that inflates to more than this many times the compressed bytes it has
#: consumed is not a profiler trace (they compress 10-30x; deflate's limit is 1032x, which
#: only long runs of one byte reach): a gzip bomb. Checked once the output passes
#: :data:`INFLATE_RATIO_FLOOR`, on the running totals of the whole file (all members).
MAX_TRACE_COMPRESSION = 200
INFLATE_RATIO_FLOOR = 64 * 2**20


def bomb_check_on() -> bool:
    """False when ``TRACEINSIGHT_NO_MEMORY_CHECK`` turns the checks off."""
    return os.environ.get(NO_MEMORY_CHECK_ENV, "").strip().lower() in ("", "0", "false", "no")


def check_inflation(path: str, inflated: int, consumed: int) -> None:
    """Raise :class:`TraceTooLargeError` when ``inflated`` bytes came out of only
    ``consumed`` compressed bytes: a ratio no trace has (see :data:`MAX_TRACE_COMPRESSION`).
    This looks at what the stream really inflates to, so neither a lying size trailer nor
    a bomb member after a valid one gets past it, and it stops after about 64 MiB of
    output instead of the gigabytes a bomb holds."""
    if inflated > INFLATE_RATIO_FLOOR and inflated > MAX_TRACE_COMPRESSION * max(consumed, 1) and bomb_check_on():
        raise TraceTooLargeError(
            f"decompresses to more than {human_bytes(inflated)} of JSON from only {human_bytes(consumed)} "
            f"of gzip data (over {MAX_TRACE_COMPRESSION} times; profiler traces compress 10-30 times): "
            f"a gzip bomb, not a trace; set {NO_MEMORY_CHECK_ENV}=1 to try anyway",
            path=path,
        )


def inflate_limit_error(path: str, limit: int) -> TraceTooLargeError:
    return TraceTooLargeError(
        f"decompresses to more than {human_bytes(limit)} of JSON, more than the available "
        f"memory can read; free memory, or set {NO_MEMORY_CHECK_ENV}=1 to try anyway",
        path=path,
    )


# -- untrusted text -------------------------------------------------------------------------


def _needs_scrub(expression: pl.Expr) -> pl.Expr:
    return expression.str.contains(_CONTROL) | (expression.str.len_chars() > MAX_TEXT)


def _scrubbed(expression: pl.Expr) -> pl.Expr:
    cut = pl.when(expression.str.len_chars() > MAX_TEXT).then(
        expression.str.slice(0, MAX_TEXT - 1) + pl.lit("…")
    ).otherwise(expression)
    return cut.str.replace_all(_CONTROL, _REPLACEMENT)


def scrub_text(frame: pl.DataFrame, warnings: list[str] | None = None) -> pl.DataFrame:
    """Every string (and list-of-string) column with control characters replaced by U+FFFD
    and values longer than :data:`MAX_TEXT` characters shortened (with a warning)."""
    frame, shortened = scrub_columns(frame)
    if shortened and warnings is not None:
        warnings.append(shortened_note(shortened))
    return frame


def shortened_note(count: int) -> str:
    """The warning for ``count`` values shortened by :func:`scrub_columns`."""
    return f"{count:,} name{'' if count == 1 else 's'} longer than {MAX_TEXT:,} characters were shortened"


def scrub_columns(frame: pl.DataFrame) -> tuple[pl.DataFrame, int]:
    """:func:`scrub_text` without the warning: the scrubbed frame and how many string
    values were shortened (a reader scrubbing chunk by chunk words one warning at the end)."""
    if frame.is_empty():
        return frame, 0
    checks = {}
    for name, dtype in frame.schema.items():
        if dtype == pl.String:
            checks[name] = _needs_scrub(pl.col(name)).any()
        elif dtype == pl.List(pl.String):
            checks[name] = pl.col(name).list.eval(_needs_scrub(pl.element())).list.any().any()
    if not checks:
        return frame, 0
    flagged = [name for name, hit in frame.select(**checks).row(0, named=True).items() if hit]
    if not flagged:
        return frame, 0
    strings = [name for name in flagged if frame.schema[name] == pl.String]
    shortened = (
        frame.select(pl.sum_horizontal((pl.col(name).str.len_chars() > MAX_TEXT).sum() for name in strings)).item()
        if strings
        else 0
    )
    frame = frame.with_columns(
        (
            _scrubbed(pl.col(name))
            if frame.schema[name] == pl.String
            else pl.col(name).list.eval(_scrubbed(pl.element()))
        ).alias(name)
        for name in flagged
    )
    return frame, shortened


def scrub_value(text: str | None) -> str | None:
    """One untrusted string, as :func:`scrub_text` treats a column."""
    if text is None:
        return None
    if len(text) > MAX_TEXT:
        text = text[: MAX_TEXT - 1] + "…"
    return _CONTROL_RE.sub(_REPLACEMENT, text)


# -- model invariants -----------------------------------------------------------------------


def _kinds_note(frame: pl.DataFrame, mask: pl.Expr) -> str:
    counts = frame.filter(mask).group_by("kind").len().sort("len", descending=True)
    return ", ".join(f"{kind or 'unknown'} {n:,}" for kind, n in counts.iter_rows())


def _events(count: int) -> str:
    return f"{count:,} event" + ("" if count == 1 else "s")


def valid_intervals(intervals: pl.DataFrame, warnings: list[str]) -> pl.DataFrame:
    """Rows the analyses can use, in the same order; a warning per kind of row dropped.

    Kept rows have a start and an end within :data:`MAX_ABS_TIME_NS`, ``end_ns >=
    start_ns``, a rank and, for CPU rows other than syncs, a pid and tid. Nameless rows are
    named :data:`UNNAMED`. (Text is scrubbed where the readers read it, with
    :func:`scrub_text`: once per string table is cheaper than once per row.)
    """
    if intervals.is_empty():
        return intervals
    start, end = pl.col("start_ns"), pl.col("end_ns")
    no_time = start.is_null() | end.is_null()
    out_of_range = ~no_time & ((start.abs() > MAX_ABS_TIME_NS) | (end.abs() > MAX_ABS_TIME_NS))
    backwards = ~no_time & ~out_of_range & (end < start)
    no_rank = pl.col("rank").is_null()
    no_thread = pl.col("kind").is_in(_THREAD_KINDS) & (pl.col("pid").is_null() | pl.col("tid").is_null())
    reasons = [
        (no_time, "whose start or end time is missing or not a number"),
        (out_of_range, "with times beyond ±73 years of the clock origin"),
        (backwards, "that end before they start"),
        (no_rank & ~no_time & ~out_of_range & ~backwards, "that belong to no process (no pid)"),
        (
            no_thread & ~no_rank & ~no_time & ~out_of_range & ~backwards,
            "on the CPU without a numeric pid or thread id",
        ),
    ]
    counts = intervals.select(
        *(mask.sum().alias(str(i)) for i, (mask, _) in enumerate(reasons)),
        unnamed=pl.col("name").is_null().sum(),
    ).row(0)
    *dropped, unnamed = counts
    if any(dropped):
        for (mask, why), count in zip(reasons, dropped):
            if count:
                warnings.append(
                    f"skipped {_events(count)} ({_kinds_note(intervals, mask)}) {why}"
                )
        bad = no_time | out_of_range | backwards | no_rank | no_thread
        intervals = intervals.filter(~bad)
    if unnamed:
        warnings.append(
            f"{_events(unnamed)} without a name (missing from the trace or its string table) "
            f"are called {UNNAMED}"
        )
        intervals = intervals.with_columns(pl.col("name").fill_null(UNNAMED))
    return intervals


def valid_samples(samples: pl.DataFrame, warnings: list[str]) -> pl.DataFrame:
    """CPU samples with a time (within range) and a rank."""
    if samples.is_empty():
        return samples
    time = pl.col("time_ns")
    bad = time.is_null() | (time.abs() > MAX_ABS_TIME_NS) | pl.col("rank").is_null()
    count = samples.select(bad.sum()).item()
    if count:
        warnings.append(
            f"skipped {count:,} CPU sample{'' if count == 1 else 's'} whose time or process is "
            "missing or not a number"
        )
        samples = samples.filter(~bad)
    return samples
