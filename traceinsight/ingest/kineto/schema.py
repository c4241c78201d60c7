"""What is read of a Kineto file: the msgspec structs that its events and top-level keys
decode into, for every format era.

Only the keys listed here are materialised; msgspec skips everything else (including args
such as "Comms Id" whose integers exceed 64 bits). The *fast* types cover every file seen;
the *lenient* variant (``Any``) is used only when a file breaks them.

Format eras (see ``shared/traces/kineto/FORMAT.md``)
----------------------------------------------------
- 2020: a bare JSON list of events; categories ``Operator``/``Runtime``/``Kernel``/
  ``Memcpy``/``Memset``; GPU ``tid`` is the string ``"stream 7"``, CPU ``tid`` a numeric
  string; ``Input dims``; runtime/GPU events link to ops through lower-case ``external id``.
- 2021: a JSON object (``schemaVersion``, ``deviceProperties``, ``traceEvents``), old
  categories still, ``Input Dims``.
- 2022 to early 2024: today's category names (``cpu_op``, ``cuda_runtime``, ``kernel``…),
  integer epoch µs; runtime/GPU ``External id`` is a copy of their own ``correlation``.
- 2024: fractional µs (``x.yyy``), ``baseTimeNanoseconds`` with relative ``ts``, real
  ``External id`` links, collective args on ``record_param_comms`` and NCCL kernels.
- 2025-2026: ``python_function``, ``cuda_driver``, ``Rank``/``Seq`` collective args; some
  tools re-serialise files (other indentation, no ``M`` events, metadata after the events).
"""

from __future__ import annotations

import decimal
from typing import Any

import msgspec

#: (attribute, JSON key in ``args``, fast type)
_ARG_FIELDS: list[tuple[str, str, Any]] = [
    ("external_id", "External id", int | None),
    ("legacy_external_id", "external id", int | None),  # 2020–2021 runtime/GPU events
    ("correlation", "correlation", int | None),
    ("device", "device", int | None),
    ("stream", "stream", int | str | None),  # ROCm hip* runtime rows hold a string
    ("bytes", "bytes", int | str | None),  # likewise
    ("input_dims", "Input Dims", msgspec.Raw),  # kept as raw JSON text: cheap, exact
    ("legacy_input_dims", "Input dims", msgspec.Raw),  # 2020 spelling
    ("collective_name", "Collective name", str | None),
    ("in_msg_nelems", "In msg nelems", int | None),
    ("out_msg_nelems", "Out msg nelems", int | None),
    ("group_size", "Group size", int | None),
    ("process_group_name", "Process Group Name", str | int | None),
    ("seq", "Seq", int | str | None),
    ("in_split_size", "In split size", str | None),
    ("out_split_size", "Out split size", str | None),
    ("rank", "Rank", int | None),
    ("cuda_sync_kind", "cuda_sync_kind", str | None),
]

#: (attribute, fast type, default) of a trace event; ``args`` is added per variant.
_EVENT_FIELDS: list[tuple[str, Any, Any]] = [
    ("ph", str, ""),
    ("cat", str, ""),
    ("name", str, ""),
    ("pid", int | float | str | None, None),
    ("tid", int | float | str | None, None),
    ("ts", float | None, None),  # msgspec accepts JSON integers for float fields
    ("dur", float | None, None),
]

#: Top-level keys read besides ``traceEvents`` (small; decoded loosely).
_TOP_FIELDS = [
    "baseTimeNanoseconds",
    "distributedInfo",
    "deviceProperties",
    "schemaVersion",
    "cuda_runtime_version",
    "cuda_driver_version",
    "cupti_version",
    "hip_runtime_version",
    "hip_driver_version",
    "roctracer_version",
]


def _arg_struct(lenient: bool) -> type[msgspec.Struct]:
    fields = [
        (
            attribute,
            key_type if (not lenient or key_type is msgspec.Raw) else Any,
            msgspec.field(default=None, name=key),
        )
        for attribute, key, key_type in _ARG_FIELDS
    ]
    # frozen: one shared instance can stand in for absent args; gc=False: millions of these
    # must not be walked by the cyclic garbage collector.
    name = "_LenientArgs" if lenient else "_Args"
    return msgspec.defstruct(name, fields, frozen=True, gc=False)


_Args = _arg_struct(lenient=False)
_LenientArgs = _arg_struct(lenient=True)
_NO_ARGS = _Args()
_NO_LENIENT_ARGS = _LenientArgs()

_Event = msgspec.defstruct(
    "_Event",
    [*_EVENT_FIELDS, ("args", _Args, _NO_ARGS)],
    gc=False,
)
_LenientEvent = msgspec.defstruct(
    "_LenientEvent",
    [
        *((name, Any, default) for name, _, default in _EVENT_FIELDS),
        ("args", _LenientArgs | None, None),
    ],
    gc=False,
)


def _top_struct(name: str, event_type: type) -> type[msgspec.Struct]:
    return msgspec.defstruct(
        name, [("traceEvents", list[event_type]), *((key, Any, None) for key in _TOP_FIELDS)]
    )


_TraceFile = _top_struct("_TraceFile", _Event)
_LenientTraceFile = _top_struct("_LenientTraceFile", _LenientEvent)


class _ExactTime(msgspec.Struct, gc=False):
    """Timestamps decoded as :class:`decimal.Decimal`: every digit of the text is kept."""

    ts: decimal.Decimal | None = None
    dur: decimal.Decimal | None = None


class _ExactTraceFile(msgspec.Struct):
    traceEvents: list[_ExactTime]


_TopLevel = msgspec.defstruct(
    "_TopLevel", [("traceEvents", msgspec.Raw), *((key, Any, None) for key in _TOP_FIELDS)]
)
