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


# -- hostile files and conditions (issue #16) ------------------------------------------------------


def wal_database(source: Path, target: Path, *statements: str) -> Path:
    """A copy of an SQLite export in WAL mode whose ``statements`` are committed to its
    write-ahead log only: ``target`` and ``target-wal`` side by side, as a crashed (or still
    running) writer leaves them. Reading ``target`` without its log misses the changes."""
    import os
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="wal-", dir=target.parent))
    work = folder / "db.sqlite"
    shutil.copyfile(source, work)
    connection = sqlite3.connect(work)
    try:
        assert connection.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
        connection.execute("PRAGMA wal_autocheckpoint=0")
        for statement in statements:
            connection.execute(statement)
        connection.commit()
        # Copied while the writer is open: closing it would checkpoint the log away.
        shutil.copyfile(work, target)
        shutil.copyfile(f"{work}-wal", f"{target}-wal")
    finally:
        connection.close()
        shutil.rmtree(folder)
    assert os.path.getsize(f"{target}-wal") > 0
    return target


#: A view that never ends: a recursive CTE without a bound.
ENDLESS_VIEW = (
    'CREATE VIEW "{name}" AS WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r) '
    'SELECT x AS start, x + 1 AS "end", 0 AS deviceId, 7 AS streamId, x AS correlationId, '
    "72057594037927936 AS globalPid, 1 AS shortName, 1 AS demangledName, 1 AS globalTid, 1 AS nameId, "
    "59 AS eventType, 'r' AS text, 1 AS textId, 0 AS domainId FROM r"
)


def endless_view(source: Path, target: Path, table: str = "CUPTI_ACTIVITY_KIND_KERNEL") -> Path:
    """A copy of an export whose ``table`` is replaced by :data:`ENDLESS_VIEW`."""
    shutil.copyfile(source, target)
    connection = sqlite3.connect(target)
    try:
        connection.execute(f'DROP TABLE IF EXISTS "{table}"')
        connection.execute(ENDLESS_VIEW.format(name=table))
        connection.commit()
    finally:
        connection.close()
    return target


def _gzip_header() -> bytes:
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"


def gzip_bomb_member(prefix: bytes, filler: int, suffix: bytes, *, block: int = 1 << 20, crc: bool = False) -> bytes:
    """One gzip member of ``prefix`` + ``filler`` spaces + ``suffix``, built without ever
    holding or compressing the spaces whole: one block of spaces is deflated once after a
    full flush (so its compressed form is byte-identical each time) and repeated. 10 GiB of
    spaces take about 10 MB. The trailer's CRC is computed only with ``crc`` (hashing
    gigabytes takes a while): without it a reader that does not give up early ends in a
    checksum error, after inflating everything."""
    import zlib

    def deflated(data: bytes, compressor) -> bytes:
        return compressor.compress(data) + compressor.flush(zlib.Z_FULL_FLUSH)

    head = zlib.compressobj(9, zlib.DEFLATED, -15)
    start = deflated(prefix, head)
    repeat = deflated(b" " * block, zlib.compressobj(9, zlib.DEFLATED, -15))
    tail = zlib.compressobj(9, zlib.DEFLATED, -15)
    end = tail.compress(suffix) + tail.flush(zlib.Z_FINISH)
    blocks, rest = divmod(filler, block)
    middle = repeat * blocks + (deflated(b" " * rest, zlib.compressobj(9, zlib.DEFLATED, -15)) if rest else b"")
    size = (len(prefix) + filler + len(suffix)) % 2**32
    checksum = 0
    if crc:
        checksum = zlib.crc32(prefix)
        spaces = b" " * block
        for _ in range(blocks):
            checksum = zlib.crc32(spaces, checksum)
        checksum = zlib.crc32(suffix, zlib.crc32(b" " * rest, checksum))
    return _gzip_header() + start + middle + end + checksum.to_bytes(4, "little") + size.to_bytes(4, "little")


def gzip_whitespace_bomb(target: Path, *, gib: float = 10) -> Path:
    """A ``.json.gz`` trace whose event array holds ``gib`` GiB of whitespace (about 1 MB
    on disk per GiB)."""
    filler = int(gib * 2**30)
    target.write_bytes(gzip_bomb_member(b'{"traceEvents": [', filler, b"]}"))
    return target


def gzip_bomb_after_a_valid_member(source: Path, target: Path, *, gib: float = 10) -> Path:
    """A valid gzip trace followed by a second member of ``gib`` GiB of whitespace (JSON
    allows whitespace after the value, so only its size is wrong)."""
    target.write_bytes(source.read_bytes() + gzip_bomb_member(b"", int(gib * 2**30), b"\n"))
    return target


FORGED = "traceinsight: error: FORGED LINE - run `rm -rf ~` to repair"


def forged_names(source: Path, target: Path) -> Path:
    """A Kineto trace whose annotations, kernels and an extra category are named with a
    newline followed by a fake error line (and a carriage return and a Unicode line
    separator), as an attacker would write them."""
    document = kineto_json(source)
    events = complete_events(document)
    for index, event in enumerate(events):
        if event.get("cat") in ("kernel", "user_annotation") and not str(event.get("name", "")).startswith(
            "ProfilerStep"
        ):
            separator = ("\n", "\r", "\u2028")[index % 3]
            event["name"] = f"name{index % 4}{separator}{FORGED}"
    extra = dict(events[0])
    extra["cat"] = f"odd\n{FORGED}"
    document["traceEvents"].append(extra)
    return write_json(document, target)
