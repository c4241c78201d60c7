"""What an analysis says about itself (:class:`Analysis`).

Each module of :mod:`traceinsight.analysis.analyzers` describes its one analysis with an
``ANALYSIS = Analysis(...)``: the function, the frames it reads, what it returns and the
:class:`~traceinsight.analysis.findings.Findings` field its result lands in.
:mod:`traceinsight.analysis.registry` lists them in the order the engine runs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Analysis:
    """One analysis: ``function`` reads ``reads`` and returns ``returns``, which becomes the
    ``field`` of the findings (or feeds a later analysis where ``field`` is empty)."""

    name: str
    phase: str
    function: Callable
    reads: tuple[str, ...]
    returns: str
    field: str = ""
