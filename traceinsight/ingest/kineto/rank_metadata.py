"""The file's one ``ranks`` row: rank, world size, GPUs, process, clock origin, tool versions.

One rank per file: ``distributedInfo.rank``, else the ``Rank`` arg of ``record_param_comms``,
else 0. ``world_size`` comes from ``distributedInfo``; ``gpu_names`` from the
``deviceProperties`` entries of the devices the GPU events use (all distinct names when the
ids do not match, as with ROCm's offset device numbers).
"""

from __future__ import annotations

from typing import Any

import polars as pl

import traceinsight.ingest.guard as guard
from traceinsight.ingest.kineto.columns import _as_int
from traceinsight.model import RANK_SCHEMA

FORMAT_NAME = "kineto-json"


def _rank(trace: Any, frame: pl.DataFrame) -> tuple[int, str]:
    info = trace.distributedInfo
    if isinstance(info, dict):
        rank = _count(info.get("rank"), minimum=0)
        if rank is not None:
            return rank, "distributedInfo"
    ranks = frame.get_column("arg_rank").drop_nulls()
    ranks = ranks.filter((ranks >= 0) & (ranks < 2**31))
    if not ranks.is_empty():
        return int(ranks[0]), "record_param_comms"
    return 0, "file order"


def _count(value: Any, *, minimum: int) -> int | None:
    """A rank or world size: an integer from ``minimum`` up to int32, else None."""
    number = _as_int(value)
    return number if number is not None and minimum <= number < 2**31 else None


def _rank_frame(trace: Any, facts: dict[str, Any], *, path: str) -> pl.DataFrame:
    info = trace.distributedInfo if isinstance(trace.distributedInfo, dict) else {}
    devices: list[int] = facts["devices"]
    row = {
        "rank": facts["rank"],
        "rank_source": facts["rank_source"],
        "source": path,
        "format": FORMAT_NAME,
        "tool_version": guard.scrub_value(_tool_version(trace, info)),
        "pid": facts["pid"],
        "hostname": None,  # Kineto has no reliable host field (worker names are user-chosen)
        "gpu_names": [guard.scrub_value(n) for n in _gpu_names(trace.deviceProperties, devices)],
        "devices": devices,
        "world_size": _count(info.get("world_size"), minimum=1),
        "clock_origin_ns": facts["origin_ns"],
    }
    return pl.DataFrame([row], schema=RANK_SCHEMA)


def _gpu_names(properties: Any, devices: list[int]) -> list[str]:
    """Names of the devices used; all distinct names when ids do not match (ROCm offsets)."""
    if not isinstance(properties, list):
        return []
    by_id = {
        _as_int(entry.get("id")): entry.get("name")
        for entry in properties
        if isinstance(entry, dict) and isinstance(entry.get("name"), str)
    }
    if devices and all(device in by_id for device in devices):
        return [by_id[device] for device in devices]
    return list(dict.fromkeys(name for name in by_id.values()))


def _version_text(value: Any) -> str | None:
    """CUDA encodes 12.9 as 12090; show both forms that people search for."""
    number = _as_int(value)
    if number is None:
        return None if value is None else str(value)
    if 1000 <= number < 100000:
        return f"{number // 1000}.{number % 1000 // 10}"
    return str(number)


def _tool_version(trace: Any, info: dict[str, Any]) -> str:
    schema = trace.schemaVersion
    parts = [
        f"kineto schemaVersion {schema}" if schema is not None else "kineto (no schemaVersion)"
    ]
    for key, label in (
        ("cuda_runtime_version", "CUDA runtime"),
        ("cuda_driver_version", "CUDA driver"),
    ):
        text = _version_text(getattr(trace, key))
        if text:
            parts.append(f"{label} {text}")
    for key, label in (
        ("cupti_version", "CUPTI"),
        ("hip_runtime_version", "HIP runtime"),
        ("hip_driver_version", "HIP driver"),
        ("roctracer_version", "roctracer"),
    ):
        value = getattr(trace, key)
        if value is not None:
            parts.append(f"{label} {value}")
    if isinstance(info.get("nccl_version"), str):
        parts.append(f"NCCL {info['nccl_version']}")
    return ", ".join(parts)
