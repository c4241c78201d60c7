"""Fuzz the trace readers (and, by default, the analyses and the JSON report behind them).

Any input must end in a model or in ``TraceInputError`` (the user's "bad input" error);
every other exception is a bug. Two ways to run it, from the repository root:

With atheris (coverage-guided, libFuzzer; ``pip install atheris``)::

    python fuzz/fuzz_ingest.py -atheris_runs=20000 fuzz/corpus

``fuzz/corpus`` is created with seeds (small real traces of both formats) when it does not
exist; other libFuzzer flags work too (``-max_total_time=600``, ``-jobs=2``...).

Without atheris (or with ``--plain``): seeded random mutations of the same seeds::

    python fuzz/fuzz_ingest.py --iterations 2000 [--seed 1] [--no-analyze]
    nice python fuzz/fuzz_ingest.py --seconds 600     # as many inputs as 10 minutes allow

An input that takes longer than ``--slow`` seconds (30) counts as a crash (a hang).

Inputs that crash are written to ``fuzz/crashes/`` (``--crash-dir``); reproduce one with
``python fuzz/fuzz_ingest.py --replay fuzz/crashes/FILE``. The exit status is 1 when a
crash was found.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import io
import random
import shutil
import sqlite3
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The checkout this file belongs to, not whichever traceinsight is installed.
sys.path.insert(0, str(ROOT))
SAMPLES = ROOT / "sample_traces"
DEFAULT_CORPUS = ROOT / "fuzz" / "corpus"
DEFAULT_CRASHES = ROOT / "fuzz" / "crashes"

try:
    import atheris
except ImportError:  # the plain loop needs nothing beyond traceinsight itself
    atheris = None


def _import_targets():
    # Everything an input reaches, imported now: atheris instruments only modules imported
    # inside its block, and the readers are otherwise imported lazily.
    import traceinsight.analysis.pipeline  # noqa: F401
    import traceinsight.ingest.guard  # noqa: F401
    import traceinsight.ingest.kineto  # noqa: F401
    import traceinsight.ingest.merged  # noqa: F401
    import traceinsight.ingest.nsys  # noqa: F401
    import traceinsight.report.json_report  # noqa: F401


if atheris is not None:
    with atheris.instrument_imports(include=["traceinsight"]):
        _import_targets()
        from traceinsight.errors import TraceInputError
        from traceinsight.ingest import read_file
else:
    _import_targets()
    from traceinsight.errors import TraceInputError
    from traceinsight.ingest import read_file

#: Where each input is written for the readers (they read paths, not bytes).
_WORK = Path(tempfile.mkdtemp(prefix="traceinsight-fuzz-"))
ANALYZE = True


def check_input(data: bytes, *, salvage: bool = False) -> str:
    """Read ``data`` as a trace file (then analyze it); return ``"model"`` or ``"refused"``.

    Raises whatever a bug raises: anything but :class:`TraceInputError`.
    """
    path = _WORK / "input.trace"
    path.write_bytes(data)
    try:
        model = read_file(str(path), salvage=salvage)
    except TraceInputError as error:
        message = str(error)
        if "\n" in message or not message:
            raise AssertionError(f"error message must be one non-empty line: {message!r}") from None
        return "refused"
    if ANALYZE:
        from traceinsight.analysis.pipeline import analyze
        from traceinsight.report.json_report import render_json

        try:
            findings = analyze(model)
        except TraceInputError:
            return "refused"  # e.g. a file without any event: nothing to analyze
        render_json(findings)
        _check_terminal(findings)
    return "model"


def _check_terminal(findings) -> None:
    """The terminal summary prints and no trace string starts a line of its own."""
    from rich.console import Console

    from traceinsight.report.terminal import render_findings

    out = io.StringIO()
    render_findings(findings, Console(file=out, width=160, color_system=None))
    for line in out.getvalue().splitlines():
        if line.startswith("traceinsight: error") or "\x1b" in line:
            raise AssertionError(f"a trace string forged a terminal line: {line[:200]!r}")


def _atheris_entry(data: bytes) -> None:
    # The first byte picks --salvage; the rest is the file.
    if not data:
        return
    with contextlib.redirect_stdout(io.StringIO()):
        check_input(data[1:], salvage=bool(data[0] & 1))


# -- seeds ------------------------------------------------------------------------------------------


def _small_kineto(events: int = 300) -> bytes:
    """The first events of the 2-rank sample's rank 0, as a complete JSON trace."""
    import json

    document = json.loads(gzip.decompress((SAMPLES / "moe_2rank" / "rank0.json.gz").read_bytes()))
    document["traceEvents"] = document["traceEvents"][:events]
    return json.dumps(document).encode()


def _small_nsys(rows: int = 200) -> bytes:
    """The single-GPU sample export cut to its first ``rows`` rows per table, vacuumed."""
    folder = Path(tempfile.mkdtemp(prefix="traceinsight-seed-"))
    try:
        path = folder / "seed.sqlite"
        shutil.copyfile(SAMPLES / "moe_single_nsys.sqlite", path)
        connection = sqlite3.connect(path)
        tables = [name for (name,) in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
        for table in tables:
            if table != "StringIds":
                connection.execute(f'DELETE FROM "{table}" WHERE rowid > {rows}')
        connection.commit()
        connection.execute("VACUUM")
        connection.close()
        return path.read_bytes()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _nsys_with_view() -> bytes:
    """The small export with its NVTX table replaced by a view over an endless recursion."""
    folder = Path(tempfile.mkdtemp(prefix="traceinsight-seed-"))
    try:
        path = folder / "seed.sqlite"
        path.write_bytes(_small_nsys(50))
        connection = sqlite3.connect(path)
        connection.execute("DROP TABLE IF EXISTS NVTX_EVENTS")
        connection.execute('CREATE VIEW NVTX_EVENTS AS WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL '
                           'SELECT x + 1 FROM r) SELECT x AS start, x + 1 AS "end", 59 AS eventType, '
                           "'r' AS text, 1 AS globalTid, 0 AS domainId, NULL AS textId FROM r")
        connection.commit()
        connection.execute("VACUUM")
        connection.close()
        return path.read_bytes()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _forged_kineto(json_text: bytes) -> bytes:
    """Names with line breaks followed by a fake error line."""
    forged = b"\\ntraceinsight: error: FORGED\\r\\u2028x"
    return json_text.replace(b'"name": "', b'"name": "' + forged, 40)


def seeds() -> dict[str, bytes]:
    json_text = _small_kineto()
    return {
        "kineto-forged.json": _forged_kineto(json_text),
        # a valid member, then one of whitespace only (JSON allows it after the value)
        "kineto-2members.json.gz": gzip.compress(json_text, mtime=0) + gzip.compress(b" " * 100_000, mtime=0),
        "nsys-view.sqlite": _nsys_with_view(),
        "kineto.json": json_text,
        "kineto.json.gz": gzip.compress(json_text, mtime=0),
        "kineto-2020-list.json": b'[{"ph": "X", "cat": "Operator", "name": "aten::mm", "pid": 1, "tid": "2",'
                                 b' "ts": 10, "dur": 5}, {"ph": "X", "cat": "Kernel", "name": "k", "pid": 0,'
                                 b' "tid": "stream 7", "ts": 12, "dur": 2, "args": {"external id": 1}}]',
        "nsys.sqlite": _small_nsys(),
    }


def write_corpus(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in seeds().items():
        (folder / name).write_bytes(b"\x00" + data)  # the leading byte: --salvage off


# -- the plain mutation loop --------------------------------------------------------------------------


def mutate(data: bytes, rng: random.Random, pool: list[bytes]) -> bytes:
    """One to four random edits: flips, inserts, deletions, truncation, duplication, splicing,
    or edits inside a gzip stream (recompressed so the damage reaches the JSON)."""
    if data[:2] == b"\x1f\x8b" and rng.random() < 0.5:
        try:
            return gzip.compress(mutate(gzip.decompress(data), rng, pool), mtime=0)
        except (OSError, EOFError):
            pass
    buffer = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(8)
        position = rng.randrange(len(buffer) + 1)
        if choice == 0 and buffer:  # flip a bit
            index = min(position, len(buffer) - 1)
            buffer[index] ^= 1 << rng.randrange(8)
        elif choice == 1 and buffer:  # a random byte
            buffer[min(position, len(buffer) - 1)] = rng.randrange(256)
        elif choice == 2:  # insert interesting bytes
            buffer[position:position] = rng.choice(
                [b"{", b"}", b"[", b"]", b",", b'"', b"\\", b"null", b"-1", b"1e309", b"\x00", b"\xff\xfe",
                 b'"ts": "x"', b'"dur": -5', b"\x1b[2J", b"[bold]", rng.randbytes(rng.randint(1, 16))]
            )
        elif choice == 3:  # delete a range
            end = min(len(buffer), position + rng.randint(1, 64))
            del buffer[position:end]
        elif choice == 4:  # truncate
            del buffer[position:]
        elif choice == 5 and buffer:  # duplicate a chunk
            end = min(len(buffer), position + rng.randint(1, 256))
            buffer[position:position] = buffer[position:end]
        elif choice == 6 and pool:  # splice in part of another input
            other = rng.choice(pool)
            start = rng.randrange(len(other) + 1)
            buffer[position:] = other[start:]
        else:  # overwrite a page-sized block (SQLite damage)
            end = min(len(buffer), position + 4096)
            buffer[position:end] = rng.randbytes(end - position)
    return bytes(buffer)


def plain_loop(iterations: int | None, seed: int, crash_dir: Path, *, seconds: float | None = None,
               slow_s: float = 30.0) -> int:
    rng = random.Random(seed)
    pool = list(seeds().values())
    outcomes: dict[str, int] = {}
    crashes = 0
    slowest = (0.0, "")
    started = time.perf_counter()
    iteration = -1
    while True:
        iteration += 1
        if iterations is not None and iteration >= iterations:
            break
        if seconds is not None and time.perf_counter() - started >= seconds:
            break
        data = mutate(rng.choice(pool), rng, pool)
        salvage = rng.random() < 0.3
        began = time.perf_counter()
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                outcome = check_input(data, salvage=salvage)
            if time.perf_counter() - began > slow_s:
                raise AssertionError(f"took {time.perf_counter() - began:.1f} s (a hang?)")
        except Exception:  # noqa: BLE001 - a crash is what we look for
            crashes += 1
            outcome = "crash"
            crash_dir.mkdir(parents=True, exist_ok=True)
            name = hashlib.sha1(data).hexdigest()[:16]
            (crash_dir / f"crash-{name}").write_bytes(bytes([int(salvage)]) + data)
            print(f"iteration {iteration}: crash saved as {crash_dir / f'crash-{name}'}", file=sys.stderr)
            traceback.print_exc()
        elapsed = time.perf_counter() - began
        slowest = max(slowest, (elapsed, f"iteration {iteration}"))
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if (iteration + 1) % 200 == 0:
            print(f"{iteration + 1} inputs, {outcomes}", file=sys.stderr)
        if pool and outcome == "model" and len(pool) < 64 and rng.random() < 0.05:
            pool.append(data)  # readable mutants make good parents
    total = time.perf_counter() - started
    print(f"done: {iteration} inputs in {total:.1f} s, outcomes {outcomes}, crashes {crashes}, "
          f"slowest {slowest[0]:.2f} s ({slowest[1]})")
    return 1 if crashes else 0


def replay(path: Path) -> int:
    data = path.read_bytes()
    outcome = check_input(data[1:], salvage=bool(data[:1] and data[0] & 1))
    print(f"{path}: {outcome}")
    return 0


def main(argv: list[str]) -> int:
    global ANALYZE
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=True)
    parser.add_argument("--plain", action="store_true", help="the random-mutation loop even with atheris")
    parser.add_argument("--iterations", type=int, help="inputs for the plain loop (implies --plain)")
    parser.add_argument("--seconds", type=float, help="run the plain loop this long (implies --plain)")
    parser.add_argument("--slow", type=float, default=30.0, help="seconds after which an input counts as a hang")
    parser.add_argument("--seed", type=int, default=1, help="random seed of the plain loop")
    parser.add_argument("--no-analyze", action="store_true", help="only the readers, not the analyses")
    parser.add_argument("--crash-dir", type=Path, default=DEFAULT_CRASHES)
    parser.add_argument("--replay", type=Path, help="run one saved input and show what happens")
    options, rest = parser.parse_known_args(argv[1:])
    ANALYZE = not options.no_analyze
    try:
        if options.replay:
            return replay(options.replay)
        if atheris is None or options.plain or options.iterations is not None or options.seconds is not None:
            if atheris is None and options.iterations is None and options.seconds is None:
                print("atheris is not installed: running the plain mutation loop", file=sys.stderr)
            iterations = options.iterations if options.iterations is not None else (
                None if options.seconds is not None else 1000)
            return plain_loop(iterations, options.seed, options.crash_dir, seconds=options.seconds,
                              slow_s=options.slow)
        corpus = [arg for arg in rest if not arg.startswith("-")]
        if not corpus:
            write_corpus(DEFAULT_CORPUS) if not DEFAULT_CORPUS.exists() else None
            rest.append(str(DEFAULT_CORPUS))
        else:
            for folder in corpus:
                if not Path(folder).exists():
                    write_corpus(Path(folder))
        options.crash_dir.mkdir(parents=True, exist_ok=True)
        atheris.Setup([argv[0], f"-artifact_prefix={options.crash_dir}/", *rest], _atheris_entry)
        atheris.Fuzz()
        return 0
    finally:
        shutil.rmtree(_WORK, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
