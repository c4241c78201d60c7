"""Model building: one rank per profiled process, and the ``ranks`` frame.

Ranks: every process that appears in the CUDA, NVTX or OS-runtime tables is one rank. The rank
number comes from ``MPI_RANKS`` where the export has it, else from ``RANK`` / ``LOCAL_RANK`` in
the environment nsys recorded for the launched process (``META_DATA_CAPTURE``; used only when
that environment is unambiguously this process's), else from the order of process ids.

Times stay as the file gives them: integer nanoseconds since the capture session started.
``clock_origin_ns`` in the ranks frame is the Unix-epoch nanosecond of that zero
(``TARGET_INFO_SESSION_START_TIME``, corrected for ``nsys export --ts-normalize/--ts-shift``).
"""

from __future__ import annotations

import polars as pl

import traceinsight.ingest.guard as guard
from traceinsight.ingest.nsys.sqlite_export import _Export, _parse_int
from traceinsight.ingest.nsys.tables import _ID_SPAN
from traceinsight.model import RANK_SCHEMA, empty_frame

FORMAT_NAME = "nsys-sqlite"


def _ranks(
    export: _Export, processes: pl.DataFrame, parts: list[pl.DataFrame], warnings: list[str]
) -> tuple[pl.DataFrame, dict[int, int]]:
    """The ``ranks`` frame, a row per process of ``processes``, and the rank of each process."""
    metadata = export.name_value_table("META_DATA_EXPORT", "EXPORT_META_DATA")
    tool_version = metadata.get("EXPORT_PRODUCT_VERSION")
    clock_origin = _clock_origin(export, metadata, warnings)
    environments, launched_pids = _captured_environments(export)
    hostname = _hostname(export, environments)
    gpu_names = _gpu_names(export)

    process_keys = sorted(processes.get_column("_proc").to_list())
    # Devices each process ran work on (kernels, copies, memsets): the GPUs it used.
    # Sync rows carry a device too, but they are host-side waits.
    gpu_work = [
        part.select("_proc", "device", "kind") for part in parts if "device" in part.columns
    ]
    devices_of: dict[int, list[int]] = {}
    if gpu_work:
        used = (
            pl.concat(gpu_work)
            .filter(pl.col("kind").is_in(["kernel", "memcpy", "memset"]))
            .select("_proc", pl.col("device").cast(pl.Int32, strict=False))
            .drop_nulls()
            .unique()
        )
        for key, device in used.sort("device").iter_rows():
            devices_of.setdefault(key, []).append(device)

    environment_of: dict[int, dict[str, str]] = {}
    for key in process_keys:
        pid = key % _ID_SPAN
        matching = [n for n, launched in launched_pids.items() if launched == pid and pid]
        if matching:
            environment_of[key] = environments.get(matching[0], {})
        elif len(process_keys) == 1 and len(environments) == 1:
            # nsys launched one program and it is the only profiled process: the
            # recorded environment is its own. With several processes (torchrun, mpirun)
            # it is the launcher's, and RANK there would describe no child.
            environment_of[key] = next(iter(environments.values()))

    explicit: dict[int, tuple[int, str]] = {}
    mpi_ranks = _mpi_ranks(export)
    for key in process_keys:
        environment = environment_of.get(key, {})
        if key in mpi_ranks:
            explicit[key] = (mpi_ranks[key], "MPI_RANKS")
            continue
        for variable in ("RANK", "LOCAL_RANK"):
            number = _parse_int(environment.get(variable))
            if number is not None and 0 <= number < 2**31:
                explicit[key] = (number, f"env:{variable}")
                break
    claimed = [rank for rank, _ in explicit.values()]
    use_explicit = len(explicit) == len(process_keys) and len(set(claimed)) == len(claimed)

    rows = []
    rank_of_process: dict[int, int] = {}
    for order, key in enumerate(process_keys):
        if use_explicit:
            rank, rank_source = explicit[key]
        else:
            rank, rank_source = order, "process order"
        rank_of_process[key] = rank
        devices = devices_of.get(key, [])
        rows.append(
            {
                "rank": rank,
                "rank_source": rank_source,
                "source": export.path,
                "format": FORMAT_NAME,
                "tool_version": guard.scrub_value(tool_version),
                "pid": key % _ID_SPAN,
                "hostname": guard.scrub_value(hostname),
                "gpu_names": [gpu_names[d] for d in devices if d in gpu_names],
                "devices": devices,
                "world_size": _world_size(environment_of.get(key, {}).get("WORLD_SIZE")),
                "clock_origin_ns": clock_origin,
            }
        )
    unnamed = sorted({d for used in devices_of.values() for d in used} - set(gpu_names))
    if unnamed:
        warnings.append(
            "GPU names unknown for device(s) "
            + ", ".join(str(d) for d in unnamed)
            + " (the export has no TARGET_INFO_GPU row for them)"
        )
    if explicit and not use_explicit and len(process_keys) > 1:
        warnings.append(
            "rank numbers in the export are incomplete or collide; ranks follow process order"
        )
    ranks = pl.DataFrame(rows, schema=RANK_SCHEMA) if rows else empty_frame(RANK_SCHEMA)
    return ranks, rank_of_process


def _clock_origin(export: _Export, metadata: dict[str, str], warnings: list[str]) -> int | None:
    normalized = str(metadata.get("EXPORT_PARAM_TIME_NORMALIZE", "false")).lower() == "true"
    shift = _parse_int(metadata.get("EXPORT_PARAM_TIME_SHIFT")) or 0
    if normalized:
        # --ts-normalize re-bases timestamps to the Unix epoch already.
        return -shift
    table = export.table("TARGET_INFO_SESSION_START_TIME")
    if not export.has_columns(table, "utcEpochNs"):
        warnings.append(
            "no session start time in the export: times are relative, wall-clock unknown"
        )
        return None
    row = export.rows(f'SELECT utcEpochNs FROM "{table}" LIMIT 1')
    epoch = _parse_int(row[0][0]) if row else None
    if epoch is None:
        return None
    # --ts-shift=N added N to every timestamp: the zero moved N earlier.
    origin = epoch - shift
    return origin if -(2**63) <= origin < 2**63 else None


def _captured_environments(export: _Export) -> tuple[dict[str, dict[str, str]], dict[str, int]]:
    """Environment and pid per launched process (``PROCESS_n``) from META_DATA_CAPTURE.

    Only the few variables the model uses are kept; the rest (paths, user names, secrets)
    is never read into memory.
    """
    table = export.table("META_DATA_CAPTURE")
    environments: dict[str, dict[str, str]] = {}
    launched_pids: dict[str, int] = {}
    if not export.has_columns(table, "name", "value"):
        return environments, launched_pids
    wanted = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "HOSTNAME", "COMPUTERNAME")
    # LIKE patterns: '_' is a wildcard in SQL, so the one in "PROCESS_" is escaped with '!'.
    environment_rows = "PROCESS!_%:ENVIRONMENT_VARIABLE"
    pid_rows = "PROCESS!_%:PID"
    where_name = "name LIKE ? ESCAPE '!'"
    any_wanted = " OR ".join("value LIKE ?" for _ in wanted)
    rows = export.rows(
        f'SELECT name, value FROM "{table}" WHERE {where_name} AND ({any_wanted})',
        (environment_rows, *(f"{variable}=%" for variable in wanted)),
    )
    for name, value in rows:
        process = str(name).partition(":")[0]
        variable, _, raw = str(value).partition("=")
        if variable in wanted:  # LIKE ignores case; the variable names do not
            environments.setdefault(process, {})[variable] = raw.strip().strip('"')
    for name, value in export.rows(
        f'SELECT name, value FROM "{table}" WHERE {where_name}', (pid_rows,)
    ):
        number = _parse_int(value)
        if number is not None:
            launched_pids[str(name).partition(":")[0]] = number
    # A launched process with none of the wanted variables still has an environment.
    for (name,) in export.rows(
        f'SELECT DISTINCT name FROM "{table}" WHERE {where_name}', (environment_rows,)
    ):
        environments.setdefault(str(name).partition(":")[0], {})
    return environments, launched_pids


def _hostname(export: _Export, environments: dict[str, dict[str, str]]) -> str | None:
    table = export.table("TARGET_INFO_SYSTEM_ENV")
    if export.has_columns(table, "name", "value"):
        row = export.rows(
            f"SELECT value FROM \"{table}\" WHERE name = 'Hostname' AND value != '' LIMIT 1"
        )
        if row:
            return str(row[0][0])
    # EXPORT_HOST is where the export ran, often not the profiled machine: not used.
    for environment in environments.values():
        for variable in ("HOSTNAME", "COMPUTERNAME"):
            if environment.get(variable):
                return environment[variable]
    return None


def _gpu_names(export: _Export) -> dict[int, str]:
    names: dict[int, str] = {}
    table = export.table("TARGET_INFO_GPU")
    if table is not None and "name" in export.columns(table):
        # Current exports key GPUs by `id`; the legacy exporter calls it `deviceId`.
        id_column = next(
            (c for c in ("id", "deviceId") if c in export.columns(table)), None
        )
        if id_column:
            for device, name in export.rows(f'SELECT "{id_column}", name FROM "{table}"'):
                if _parse_int(device) is not None and name:
                    names.setdefault(_parse_int(device), guard.scrub_value(str(name).strip()))
    legacy = export.table("TARGET_INFO_CUDA_GPU")
    if not names and legacy is not None and "name" in export.columns(legacy):
        id_column = next(
            (c for c in ("id", "deviceId", "cudaId") if c in export.columns(legacy)), None
        )
        # Without an id column the rows are in CUDA ordinal order.
        select = f'"{id_column}"' if id_column else "rowid - 1"
        for device, name in export.rows(
            f'SELECT {select}, name FROM "{legacy}" ORDER BY rowid'
        ):
            if _parse_int(device) is not None and name:
                names.setdefault(_parse_int(device), guard.scrub_value(str(name).strip()))
    return names


def _mpi_ranks(export: _Export) -> dict[int, int]:
    """Process key -> rank from ``MPI_RANKS(globalTid, rank)`` (``--trace=mpi``)."""
    table = export.table("MPI_RANKS")
    if not export.has_columns(table, "globalTid", "rank"):
        return {}
    ranks: dict[int, int] = {}
    for global_tid, rank in export.rows(
        f'SELECT DISTINCT CAST(globalTid AS INTEGER), CAST(rank AS INTEGER) FROM "{table}"'
    ):
        if global_tid is not None and rank is not None and 0 <= rank < 2**31:
            ranks.setdefault(global_tid // _ID_SPAN, rank)
    return ranks


def _world_size(value: object) -> int | None:
    number = _parse_int(value)
    return number if number is not None and 0 < number < 2**31 else None
