"""Recognize a trace file's format from its first bytes, not its name."""

from __future__ import annotations

import gzip
import os
import zlib

from traceinsight.errors import TraceInputError

SQLITE_MAGIC = b"SQLite format 3\x00"
GZIP_MAGIC = b"\x1f\x8b"

NSYS_SQLITE = "nsys-sqlite"
KINETO_JSON = "kineto-json"


def _json_start(head: bytes) -> bytes:
    return head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]


def detect_format(path: str) -> str:
    """Return ``"nsys-sqlite"`` or ``"kineto-json"`` for ``path``.

    Raises
    ------
    TraceInputError
        The path is missing, empty, unreadable or neither format.
    """
    if not os.path.exists(path):
        raise TraceInputError("no such file", path=path)
    if os.path.isdir(path):
        raise TraceInputError("is a directory; pass the trace files in it", path=path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(64)
    except OSError as exc:
        raise TraceInputError(f"cannot read: {exc.strerror}", path=path) from None
    if not head:
        raise TraceInputError("empty file", path=path)
    if head.startswith(SQLITE_MAGIC):
        return NSYS_SQLITE
    if head.startswith(GZIP_MAGIC):
        try:
            with gzip.open(path, "rb") as handle:
                inner = handle.read(64)
        except (OSError, EOFError, zlib.error) as exc:
            raise TraceInputError(f"corrupt gzip data ({exc})", path=path) from None
        if _json_start(inner) in (b"{", b"["):
            return KINETO_JSON
        raise TraceInputError(
            "gzip file does not hold a JSON trace (expected a PyTorch profiler trace)", path=path
        )
    if _json_start(head) in (b"{", b"["):
        return KINETO_JSON
    if head.rstrip(b"\x00 \t\r\n") == b"" :
        raise TraceInputError("file holds only blank or zero bytes", path=path)
    raise TraceInputError(
        "not a trace: expected an Nsight Systems SQLite export (nsys export --type sqlite) "
        "or a PyTorch profiler JSON trace (.json / .json.gz)",
        path=path,
    )
