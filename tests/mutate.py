"""Ways to damage a copy of a trace file, shared by the robustness and mutation tests.

Every function reads its source and writes a new file; the source is never touched.
"""

from __future__ import annotations

import gzip
import json
import random
import shutil
import sqlite3
from pathlib import Path


def truncate(source: Path, target: Path, fraction: float) -> Path:
    """The first ``fraction`` of ``source``'s bytes (at least one byte)."""
    data = source.read_bytes()
    target.write_bytes(data[: max(1, int(len(data) * fraction))])
    return target


def flip_bytes(source: Path, target: Path, *, seed: int, count: int = 3, width: int = 1,
               skip: int = 0) -> Path:
    """``count`` runs of ``width`` random bytes at random places after the first ``skip``."""
    data = bytearray(source.read_bytes())
    rng = random.Random(seed)
    for _ in range(count):
        position = rng.randrange(skip, len(data) - width)
        data[position : position + width] = rng.randbytes(width)
    target.write_bytes(bytes(data))
    return target


def loosened_copy(source: Path, target: Path) -> Path:
    """A copy of an SQLite export whose tables have no NOT NULL or type constraints, so that
    tests can write NULLs and text where nsys writes integers."""
    shutil.copyfile(source, target)
    connection = sqlite3.connect(target)
    try:
        tables = [
            name
            for (name,) in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        ]
        for table in tables:
            connection.execute(f'CREATE TABLE "_loose" AS SELECT * FROM "{table}"')
            connection.execute(f'DROP TABLE "{table}"')
            connection.execute(f'ALTER TABLE "_loose" RENAME TO "{table}"')
        connection.commit()
    finally:
        connection.close()
    return target


def sqlite_edit(source: Path, target: Path, *statements: str) -> Path:
    """A loosened copy of ``source`` with ``statements`` applied (all must succeed)."""
    loosened_copy(source, target)
    connection = sqlite3.connect(target)
    try:
        for statement in statements:
            connection.execute(statement)
        connection.commit()
    finally:
        connection.close()
    return target


def sqlite_tables(path: Path) -> set[str]:
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {name for (name,) in connection.execute("SELECT name FROM sqlite_master")}
    finally:
        connection.close()


def overwrite_page(source: Path, target: Path, *, page: int, fill: bytes = b"\xa5") -> Path:
    """``source`` with one whole database page overwritten (page 1 holds the schema)."""
    data = bytearray(source.read_bytes())
    size = int.from_bytes(data[16:18], "big")
    size = 65536 if size == 1 else size
    start = (page - 1) * size + (100 if page == 1 else 0)
    end = page * size
    data[start:end] = (fill * (end - start))[: end - start]
    target.write_bytes(bytes(data))
    return target


def kineto_json(source: Path) -> dict:
    """The decoded JSON of a Kineto trace (``.json`` or ``.json.gz``)."""
    raw = source.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return json.loads(raw)


def write_json(document, target: Path, *, compress: bool = False) -> Path:
    text = json.dumps(document).encode()
    target.write_bytes(gzip.compress(text, mtime=0) if compress else text)
    return target


def complete_events(document: dict) -> list[dict]:
    return [event for event in document["traceEvents"] if isinstance(event, dict) and event.get("ph") == "X"]


def run_cli_case(args: list[str], output: str) -> dict:
    """Run ``traceinsight ARGS`` in this process (a pool worker) and describe what happened:
    exit code, stdout, stderr, seconds, whether ``output`` exists and what else is beside it."""
    import os
    import time

    from click.testing import CliRunner

    from traceinsight.cli import main

    started = time.perf_counter()
    result = CliRunner().invoke(main, args)
    seconds = time.perf_counter() - started
    folder = os.path.dirname(output)
    return {
        "exit_code": result.exit_code,
        "stdout": result.stdout[-4000:],
        "stderr": result.stderr[-4000:],
        "exception": None
        if result.exception is None or isinstance(result.exception, SystemExit)
        else repr(result.exception),
        "seconds": seconds,
        "output_exists": os.path.exists(output),
        "beside_output": sorted(os.listdir(folder)) if os.path.isdir(folder) else [],
    }
