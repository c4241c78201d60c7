"""Write output files safely.

- :func:`write_atomic`: a temporary file in the same folder, renamed when complete; a
  failure (no space left, a signal) removes the temporary file and leaves no partial output.
- :func:`refuse_inputs_as_outputs`: an output path that is one of the input traces (the same
  file, also through a symbolic or hard link, or a trace inside an input folder) is refused
  before anything is read.

SIGTERM ends the process as SIGINT does (:func:`traceinsight.errors.exit_cleanly_on_sigterm`),
so that every ``finally``/``except BaseException`` that removes temporary files runs.
"""

from __future__ import annotations

import errno
import os
import tempfile

from traceinsight.errors import OutputError


def write_atomic(path: str, data: bytes | str) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either absent/old or complete.

    The bytes go to a temporary file beside ``path`` (same file system, so the rename is
    atomic) and replace ``path`` only after a successful write and flush; on any failure the
    temporary file is removed and nothing is left behind.

    Raises
    ------
    OutputError
        The system refused the write (no space left on device, quota, file too large, I/O
        error, permissions): one line naming ``path`` and the reason.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        handle, temporary = tempfile.mkstemp(prefix=".traceinsight-", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise _output_error(path, exc) from None
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
    except BaseException as exc:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            raise _output_error(path, exc) from None
        raise


def _output_error(path: str, exc: OSError) -> OutputError:
    reason = exc.strerror or (errno.errorcode.get(exc.errno or 0)) or str(exc) or "write failed"
    return OutputError(reason, path=path)


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): compare where they would be
        return os.path.realpath(a) == os.path.realpath(b)


def refuse_inputs_as_outputs(outputs: list[tuple[str, str]], inputs: list[str]) -> None:
    """Raise :class:`OutputError` if an output path is one of the inputs, or two outputs
    are one file.

    ``outputs`` holds ``(option, path)`` pairs (``("--json", "out.json")``; ``-`` for stdout
    is skipped); ``inputs`` are the trace paths as given, files or folders. Nothing is read:
    the check compares files (``os.path.samefile``: the same inode, so symbolic and hard
    links are caught) and, for an input folder, the files in it.
    """
    outputs = [(option, path) for option, path in outputs if path and path != "-"]
    for option, path in outputs:
        for given in inputs:
            given = os.fspath(given)
            if os.path.isdir(given):
                try:
                    names = os.listdir(given)
                except OSError:
                    names = []
                if any(_same_file(path, os.path.join(given, name)) for name in names):
                    raise OutputError(
                        f"{option} {path} is a file in the input folder {given}; writing it would "
                        "destroy a trace; choose another output path"
                    )
            elif _same_file(path, given):
                raise OutputError(
                    f"{option} {path} is one of the input traces ({given}); writing it would destroy "
                    "the trace; choose another output path"
                )
    for index, (option, path) in enumerate(outputs):
        for other_option, other in outputs[index + 1 :]:
            if _same_file(path, other):
                raise OutputError(f"{option} and {other_option} name the same file ({path}); give each "
                                  "output its own path")
