"""Read a file written by ``traceinsight merge`` back into a multi-rank model.

A merged file holds every rank in one Chrome trace, each as its own process, with the
``"traceinsight"`` metadata (format, per-process rank, devices, clock base) written first.
It is split into one Kineto document per rank and each is read by the Kineto reader, so the
steps, waits and offsets of the merged file are those of the inputs.
"""

from __future__ import annotations

import os
import tempfile

import msgspec

from traceinsight.errors import TraceInputError
from traceinsight.model import TraceModel

FORMAT_NAME = "traceinsight-merged"
#: Findings tracks (steps, waits, flows) written by merge; they are not trace events.
FINDINGS_CATEGORY_PREFIX = "traceinsight"
_encode = msgspec.json.encode


def is_merged(head: bytes) -> bool:
    """Whether the first bytes of a (decompressed) JSON trace announce a merged file."""
    return b'"traceinsight":' in head and FORMAT_NAME.encode() in head


class _PidOnly(msgspec.Struct, gc=False):
    pid: int | float | str | None = None
    cat: str | None = None


class _MergedHead(msgspec.Struct):
    traceinsight: dict | None = None
    baseTimeNanoseconds: int | None = None


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise TraceInputError(f"cannot read: {exc.strerror or exc}", path=str(path)) from None
    if raw[:2] != b"\x1f\x8b":
        return raw
    # Inflated as the Kineto reader does: a damaged stream is one line, a gzip bomb stops early.
    import traceinsight.ingest.guard as guard
    from traceinsight.ingest.kineto.whole_file import _gunzip

    budget = guard.memory_budget()
    limit = None if budget is None else budget // guard.KINETO_WHOLE_FILE_BYTES_PER_JSON_BYTE
    return bytes(_gunzip(raw, path=str(path), salvage=False, warnings=[], limit=limit))


def split_merged(path: str | os.PathLike) -> dict[int, bytes]:
    """Regroup a merged file into one Kineto JSON document per rank (findings tracks left out).

    Each document holds that rank's events (``pid = rank + 1``) with ``distributedInfo``
    (rank, world size), ``deviceProperties`` (the rank's GPU names) and ``baseTimeNanoseconds``
    (``epoch_ns_at_ts0``, else ``clock_base_ns``), so that
    :func:`~traceinsight.ingest.kineto.read_kineto` reads each as one rank on the shared clock.
    """
    path = os.fspath(path)
    data = _read_bytes(path)
    try:
        head = msgspec.json.decode(data, type=_MergedHead)
        raw_events = msgspec.json.decode(data, type=dict[str, msgspec.Raw]).get("traceEvents")
        if raw_events is None:
            raise TraceInputError("no traceEvents: not a merged trace", path=path)
        events = msgspec.json.decode(raw_events, type=list[msgspec.Raw])
        keys = msgspec.json.decode(raw_events, type=list[_PidOnly])
    except msgspec.DecodeError as exc:
        raise TraceInputError(f"not a traceinsight merged trace ({exc})", path=path) from None
    meta = head.traceinsight
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise TraceInputError("no 'traceinsight' metadata: not written by traceinsight merge", path=path)
    base = meta.get("epoch_ns_at_ts0")
    if base is None:
        base = meta.get("clock_base_ns", 0)
    groups: dict[int, list[bytes]] = {}
    for raw, key in zip(events, keys):
        if key.cat is not None and key.cat.startswith(FINDINGS_CATEGORY_PREFIX):
            continue
        if isinstance(key.pid, (int, float)) and not isinstance(key.pid, bool):
            groups.setdefault(int(key.pid), []).append(bytes(raw))
    out: dict[int, bytes] = {}
    for pid_text, process in (meta.get("processes") or {}).items():
        pid = int(pid_text)
        rank = int(process["rank"])
        devices = process.get("devices") or []
        gpus = process.get("gpus") or []
        properties = [{"id": device, "name": name} for device, name in zip(devices, gpus)]
        top = {
            "schemaVersion": 1,
            "baseTimeNanoseconds": int(base),
            "distributedInfo": {"rank": rank, "world_size": process.get("world_size")},
            "deviceProperties": properties,
        }
        document = _encode(top)[:-1] + b',"traceEvents":[' + b",".join(groups.get(pid, [])) + b"]}"
        out[rank] = document
    return out


def load_merged(path: str | os.PathLike) -> TraceModel:
    """Read a merged file back into a multi-rank model with the project's Kineto reader."""
    from traceinsight.ingest.ranks import assign_ranks
    from traceinsight.ingest.kineto import read_kineto

    documents = split_merged(path)
    models = []
    with tempfile.TemporaryDirectory(prefix="traceinsight-merged-") as folder:
        for rank, document in sorted(documents.items()):
            part = os.path.join(folder, f"rank{rank}.json")
            with open(part, "wb") as handle:
                handle.write(document)
            models.append(read_kineto(part))
    if not models:
        raise TraceInputError("merged trace holds no rank", path=os.fspath(path))
    return TraceModel.concat(assign_ranks(models))
