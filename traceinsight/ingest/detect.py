"""Recognize a trace file's format from its first bytes, not its name.

Files that are not traces are named as what they are where that helps the user (an Nsight
Systems report that still needs ``nsys export``, an image, an archive, another compression)
instead of a generic "not a trace". The file is only ever opened for reading.
"""

from __future__ import annotations

import gzip
import os
import zlib

from traceinsight.errors import TraceFormatError, TraceInputError, one_line
import traceinsight.ingest.guard as guard

SQLITE_MAGIC = b"SQLite format 3\x00"
GZIP_MAGIC = b"\x1f\x8b"
#: The first bytes of an Nsight Systems report (``.nsys-rep``, formerly ``.qdrep``).
NSYS_REPORT_MAGIC = b"NVIDIA Tegra Profiler Report"

NSYS_SQLITE = "nsys-sqlite"
KINETO_JSON = "kineto-json"

_EXPECTED = (
    "expected an Nsight Systems SQLite export (nsys export --type sqlite) or a PyTorch "
    "profiler JSON trace (.json / .json.gz)"
)

#: (magic bytes, what the file is, what to do) for formats people pass by mistake.
_KNOWN_OTHER_FORMATS: tuple[tuple[bytes, str, str], ...] = (
    (
        NSYS_REPORT_MAGIC,
        "an Nsight Systems report, not its SQLite export",
        "convert it first: nsys export --type sqlite FILE",
    ),
    (b"\x89PNG\r\n\x1a\n", "a PNG image", _EXPECTED),
    (b"\xff\xd8\xff", "a JPEG image", _EXPECTED),
    (b"GIF8", "a GIF image", _EXPECTED),
    (b"%PDF", "a PDF document", _EXPECTED),
    (b"PK\x03\x04", "a ZIP archive", "unpack it and pass the trace files inside"),
    (b"\x7fELF", "an executable (ELF)", _EXPECTED),
    (b"\xfd7zXZ\x00", "xz-compressed", "decompress it first (xz -d FILE); gzip is read directly"),
    (b"(\xb5/\xfd", "zstd-compressed", "decompress it first (zstd -d FILE); gzip is read directly"),
    (b"BZh", "bzip2-compressed", "decompress it first (bunzip2 FILE); gzip is read directly"),
    (b"\x04\x22\x4d\x18", "lz4-compressed", "decompress it first (lz4 -d FILE); gzip is read directly"),
    (b"\x80\x02", "a Python pickle", _EXPECTED),
)


def _json_start(head: bytes) -> bytes:
    return head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]


def detect_format(path: str) -> str:
    """Return ``"nsys-sqlite"`` or ``"kineto-json"`` for ``path``.

    Raises
    ------
    TraceInputError
        The path is missing, a folder, unreadable, empty or of no supported format
        (:class:`~traceinsight.errors.TraceFormatError` for the last two).
    """
    if not os.path.exists(path):
        raise TraceInputError("no such file", path=path)
    if os.path.isdir(path):
        raise TraceInputError("is a directory; pass the trace files in it", path=path)
    try:
        with guard.open_regular(path) as handle:  # a FIFO or a device is refused, not waited on
            head = handle.read(64)
    except OSError as exc:
        raise TraceInputError(f"cannot read: {exc.strerror}", path=path) from None
    if not head:
        raise TraceFormatError(
            "empty file (0 bytes); was the profiler stopped before it wrote the trace?",
            path=path,
        )
    if head.startswith(SQLITE_MAGIC):
        return NSYS_SQLITE
    if head.startswith(GZIP_MAGIC):
        try:
            with gzip.open(path, "rb") as handle:
                inner = handle.read(64)
        except EOFError:
            raise TraceFormatError(
                "gzip file is cut short before its first bytes of JSON; nothing can be read",
                path=path,
            ) from None
        except (OSError, zlib.error) as exc:
            raise TraceFormatError(
                f"corrupt gzip data ({one_line(str(exc), limit=160)})", path=path
            ) from None
        if _json_start(inner) in (b"{", b"["):
            return KINETO_JSON
        if not inner:
            raise TraceFormatError("gzip file holds no data", path=path)
        raise TraceFormatError(
            "gzip file does not hold a JSON trace (expected a PyTorch profiler trace)", path=path
        )
    if _json_start(head) in (b"{", b"["):
        return KINETO_JSON
    for magic, what, todo in _KNOWN_OTHER_FORMATS:
        if head.startswith(magic):
            raise TraceFormatError(f"not a trace: the file is {what}; {todo}", path=path)
    if head.rstrip(b"\x00 \t\r\n") == b"":
        raise TraceFormatError(
            "file holds only blank or zero bytes (never written, or damaged)", path=path
        )
    if path.lower().endswith((".nsys-rep", ".qdrep")):
        raise TraceFormatError(
            "not a readable Nsight Systems report; export the report with "
            "nsys export --type sqlite FILE and pass the .sqlite file",
            path=path,
        )
    raise TraceFormatError(f"not a trace: {_EXPECTED}", path=path)
