"""What the user chose for an analysis (:class:`Options`).

Its own small module: the command line builds it for every question, also for those
answered from the findings cache (whose key includes its ``repr``), which then need none of
the analyses' modules.
"""

from __future__ import annotations

from dataclasses import dataclass

from traceinsight.analysis.anomaly_options import AnomalyOptions

#: Kernels that move data between ranks: NCCL/RCCL, DeepEP and common custom all-reduce
#: kernels. Matched against the kernel's short name and its full signature.
DEFAULT_COMM_PATTERNS: tuple[str, ...] = (
    r"(?i)\bnccl",  # ncclKernel_*, ncclDevKernel_* (also RCCL, which keeps the nccl prefix)
    r"(?i)\brccl",
    r"(?i)deep_?ep::",  # deep_ep::intranode::dispatch<...>, deep_ep::internode::combine
    r"(?i)\bep::(?:intra|inter)node::",  # forks that rename the namespace (dpsk::ep::...)
    r"(?i)cross_device_reduce|custom_?all_?reduce|all_?reduce_?kernel|one_?shot_?all_?reduce",
    r"(?i)\bmscclpp|\bnvshmem",
)


@dataclass(frozen=True)
class Options:
    """What the user chose for the analysis."""

    step_pattern: str | None = None
    comm_patterns: tuple[str, ...] = DEFAULT_COMM_PATTERNS
    anomaly_options: AnomalyOptions = AnomalyOptions()
