"""Write output files atomically: a temporary file in the same folder, renamed when complete."""

from __future__ import annotations

import os
import tempfile


def write_atomic(path: str, data: bytes | str) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either absent/old or complete.

    The bytes go to a temporary file beside ``path`` (same file system, so the rename is
    atomic) and replace ``path`` only after a successful write and flush; on any failure the
    temporary file is removed and nothing is left behind.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=".traceinsight-", suffix=".tmp", dir=folder)
    try:
        # mkstemp makes the file private (0600); give it the mode an ordinary write would:
        # the existing file's, else what the umask allows.
        try:
            mode = os.stat(path).st_mode & 0o777
        except FileNotFoundError:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.fchmod(handle, mode)
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
