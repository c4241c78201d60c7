"""Progress on stderr while traces are read and analyzed (``--progress``; on by default on a terminal).

Reading shows the *bytes read* of the input files: a small thread polls, every 0.2 s, the
offset of every open descriptor (of this process and of its worker processes) that points at
one of the files, from ``/proc``; a file that finished counts whole. Where ``/proc`` is missing
(not Linux) or a reader does not move its offset (SQLite reads with ``pread``), the bar moves
file by file. Analysis shows its phase (steps and collectives, breakdown, details) and the rank
it is on. Nothing is printed when stderr is not a terminal, unless forced.
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.progress import Progress

# rich is imported where a bar is drawn: importing it costs about 0.07 s, which a command that
# shows no progress (stderr not a terminal) and answers from the cache should not pay.

__all__ = ["Reporter", "wanted"]


def wanted(force: bool | None) -> bool:
    """Progress on: forced with ``True``, off with ``False``, else only when stderr is a terminal."""
    if force is not None:
        return force
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                out += [int(p) for p in handle.read().split()]
    except OSError:
        pass
    return out


def _offsets(paths: set[str]) -> dict[str, int]:
    """Largest offset of an open descriptor per path, over this process and its children."""
    found: dict[str, int] = {}
    for pid in [os.getpid(), *_children(os.getpid())]:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target not in paths:
                continue
            try:
                with open(f"/proc/{pid}/fdinfo/{fd}") as handle:
                    position = int(handle.readline().split()[1])  # "pos:\t<offset>"
            except (OSError, ValueError, IndexError):
                continue
            found[target] = max(found.get(target, 0), position)
    return found


class Reporter:
    """Progress bars on stderr; every method does nothing when disabled."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._progress: Progress | None = None
        self._phase_task = None

    @contextmanager
    def reading(self, files: list[str]):
        """While ``files`` are read: a bar of bytes read. Yields ``on_done(path)``."""
        if not self.enabled:
            yield None
            return
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        sizes = {os.path.realpath(f): os.path.getsize(f) for f in files if os.path.isfile(f)}
        total = sum(sizes.values()) or 1
        done: set[str] = set()
        stop = threading.Event()
        progress = Progress(TextColumn("[bold]reading[/] {task.description}"), BarColumn(), DownloadColumn(),
                            TimeElapsedColumn(), TimeRemainingColumn(),
                            console=Console(stderr=True, force_terminal=True), transient=True)
        task = progress.add_task(f"{len(files)} file(s)", total=total)

        last = [0]

        def update() -> None:
            offsets = _offsets(set(sizes) - done)
            read = sum(sizes[p] for p in done) + sum(min(v, sizes[p]) for p, v in offsets.items())
            last[0] = max(last[0], read)  # a file closed before on_done says so does not go back to 0
            progress.update(task, completed=last[0])

        def poll() -> None:
            while not stop.wait(0.2):
                update()

        def on_done(path: str) -> None:
            done.add(os.path.realpath(path))
            update()

        thread = threading.Thread(target=poll, name="traceinsight-progress", daemon=True)
        with progress:
            thread.start()
            try:
                yield on_done
            finally:
                stop.set()
                thread.join()

    @contextmanager
    def analysis(self):
        """While the analysis runs: its phase. Yields ``on_phase(name, done, total)`` (or None)."""
        if not self.enabled:
            yield None
            return
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(TextColumn("[bold]analyzing[/] {task.description}"), BarColumn(),
                            TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                            console=Console(stderr=True, force_terminal=True), transient=True)
        task = progress.add_task("", total=None)

        def on_phase(name: str, done: int, total: int) -> None:
            progress.update(task, description=name, completed=done, total=total)

        with progress:
            yield on_phase

    @contextmanager
    def step(self, text: str):
        """A spinner with ``text`` while a step without a bar runs (rendering a report)."""
        if not self.enabled:
            yield
            return
        from rich.console import Console

        with Console(stderr=True, force_terminal=True).status(text):
            yield
