"""The ``traceinsight`` command: a thin click layer over ingest → analysis → report.

Exit codes: 0 success, 2 bad input (a one-line message says which file and what is wrong),
1 internal error (``--debug`` shows the traceback), 3 ``diff --fail-if-slower PCT``: the median
step got slower by more than PCT percent.
"""

from __future__ import annotations

import functools
import os
import sys

import click

from traceinsight.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, TraceInputError

_debug = False


def _guarded(command):
    """Turn exceptions into one-line messages and documented exit codes."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            _check_options(kwargs)  # before any file is read
            return command(*args, **kwargs)
        except TraceInputError as exc:
            if _debug:
                raise
            click.echo(f"traceinsight: error: {exc}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except MemoryError:
            if _debug:
                raise
            click.echo("traceinsight: error: out of memory while analyzing; try fewer ranks "
                       "at once", err=True)
            sys.exit(EXIT_INTERNAL)
        except BrokenPipeError:
            # Whoever read the output went away (`| head`): stop quietly, with rich's exit code.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(EXIT_INTERNAL)
        except OSError as exc:
            if _debug or not exc.filename:
                raise
            # The system refused a file (no space left, permissions): the user can fix that.
            click.echo(f"traceinsight: error: {exc.filename}: {exc.strerror or exc}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except Exception as exc:  # noqa: BLE001 - the last line of defence
            if _debug:
                raise
            first_line = (str(exc).strip().splitlines() or [""])[0][:300]
            click.echo(
                f"traceinsight: internal error: {type(exc).__name__}: {first_line}\n"
                "traceinsight: this is a bug; please report it, with the traceback that --debug "
                "shows (traceinsight --debug ...)",
                err=True,
            )
            sys.exit(EXIT_INTERNAL)

    return wrapper


def _check_options(options: dict) -> None:
    """Refuse, before any trace is read, a --step-marker / --comm-pattern regex that cannot
    work and an output path that cannot be written."""
    from traceinsight.errors import check_pattern

    from traceinsight.report.output import refuse_inputs_as_outputs

    for key in ("json_path", "html_path", "output"):
        if options.get(key) and options[key] != "-":
            _check_writable(options[key])
    refuse_inputs_as_outputs(
        [(flag, options.get(key)) for key, flag in _OUTPUT_OPTIONS.items()],
        [*options.get("paths", ()), *options.get("before", ()), *options.get("after", ())],
    )
    _check_numbers(options)
    if options.get("step_marker"):
        check_pattern(options["step_marker"], option="--step-marker", groups=1)
    for pattern in options.get("comm_patterns") or ():
        check_pattern(pattern, option="--comm-pattern")


_OUTPUT_OPTIONS = {"json_path": "--json", "html_path": "--html", "output": "-o"}


def _check_numbers(options: dict) -> None:
    from traceinsight.errors import check_finite

    check_finite(options.get("min_cpu_us"), option="--min-cpu-us", example="50")
    check_finite(options.get("fail_if_slower"), option="--fail-if-slower", example="5 (percent)")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="traceinsight-moe", prog_name="traceinsight")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.option("--cache-dir", metavar="DIR", envvar="TRACEINSIGHT_CACHE_DIR",
              help="Where parsed traces are cached (default ~/.cache/traceinsight).")
@click.option("--no-cache", is_flag=True, envvar="TRACEINSIGHT_NO_CACHE",
              help="Parse every file again; neither read nor write the cache.")
@click.option("--jobs", "-j", type=click.IntRange(min=0), default=0, envvar="TRACEINSIGHT_JOBS",
              help="Files parsed at once in worker processes (default: all cores for large inputs).")
def main(debug: bool, cache_dir: str | None, no_cache: bool, jobs: int) -> None:
    """Why was this MoE step slow, and who waited for whom.

    Reads Nsight Systems SQLite exports (nsys export --type sqlite) and PyTorch profiler
    traces (.json / .json.gz), one file per rank or several processes per file.
    """
    global _debug
    _debug = debug
    from traceinsight.errors import exit_cleanly_on_sigterm

    exit_cleanly_on_sigterm()  # SIGTERM removes temporary files as SIGINT does
    _loading.update(cache_dir=None if no_cache else (cache_dir or _default_cache_dir()), jobs=jobs)


_loading: dict = {"cache_dir": None, "jobs": 0}


def _default_cache_dir() -> str:
    from traceinsight.ingest.cache import default_cache_dir

    return default_cache_dir()


def _load(paths, *, salvage: bool = False, progress: bool | None = None):
    """``traceinsight.load`` with the group's cache and parallelism options and, on a
    terminal (or with ``--progress``), a bar of the bytes read on stderr."""
    from traceinsight.ingest import expand_paths, load
    from traceinsight.progress import Reporter, wanted

    files = expand_paths(paths)
    jobs = _loading["jobs"]
    if not jobs:
        # Worker processes cost a second or two to start: only worth it for big inputs.
        total = sum(os.path.getsize(f) for f in files if os.path.exists(f))
        jobs = min(len(files), os.cpu_count() or 1) if total > 64 * 2**20 else 1
    options = {"salvage": salvage, "cache_dir": _loading["cache_dir"], "jobs": jobs}
    with Reporter(wanted(progress)).reading(files) as on_done:
        return load(files, on_done=on_done, **options)


def _analyze(model, options, progress: bool | None, *, free_model: bool = False, before_freeing=None):
    """``analyze_model`` with, where progress is shown, its phase and rank on stderr."""
    from traceinsight.analysis.engine import analyze_model
    from traceinsight.progress import Reporter, wanted

    with Reporter(wanted(progress)).analysis() as on_phase:
        return analyze_model(model, options, on_phase=on_phase, free_model=free_model,
                             before_freeing=before_freeing)


def _console(width: int | None):
    """The terminal summary's console: ``--width``, else ``COLUMNS``, else the terminal's
    width (80 when not a terminal). rich is imported here, by the commands that print."""
    from rich.console import Console

    return Console(width=width) if width else Console()


def _report_options(command):
    """``--width`` and ``--progress/--no-progress`` for the commands that print reports."""
    command = click.option("--progress/--no-progress", "progress", default=None,
                           help="Show progress on stderr (default: only when stderr is a terminal).")(command)
    return click.option("--width", type=click.IntRange(min=40), metavar="COLUMNS",
                        help="Width of the terminal summary (default: COLUMNS, else the terminal's; "
                             "80 when piped).")(command)


class _OptionalHtmlCommand(click.Command):
    """``--html`` takes an optional FILE: only a next argument named ``*.html`` / ``*.htm`` is its
    value, so ``analyze -q --html trace_dir`` writes the default file and reads ``trace_dir``
    (``--html=FILE`` always takes FILE)."""

    def parse_args(self, ctx, args):
        default = next((p.flag_value for p in self.params if p.name == "html_path"), None)
        rewritten: list[str] = []
        for position, arg in enumerate(args):
            if arg == "--":
                rewritten.extend(args[position:])
                break
            following = args[position + 1] if position + 1 < len(args) else None
            if (arg == "--html" and default and following is not None and not following.startswith("-")
                    and not following.lower().endswith((".html", ".htm"))):
                rewritten.append(f"--html={default}")
                continue
            rewritten.append(arg)
        return super().parse_args(ctx, rewritten)


def _said(text: str, quiet: bool) -> None:
    """Where an output went: on stdout, or on stderr when stdout is kept quiet (``-q``, ``--json -``)."""
    click.echo(text, err=quiet)


#: Findings that only ``explain`` and ``diff`` read (the GPU activities and the places of
#: every range instance and gap): from the cache, ``analyze`` reads them only if used.
_POSTMORTEM_FIELDS = ("gpu", "place_cpu", "place_gpu", "place_tree")


def _findings(paths, options, *, salvage: bool = False, with_timelines: bool = False, progress: bool | None = None,
              read_later: tuple[str, ...] = ()):
    """``(findings, timelines)`` of ``paths``: from the findings cache when it holds this
    analysis (see :mod:`traceinsight.analysis.findings_cache`), else analyzed and stored.
    ``timelines`` (the HTML report's) are computed and stored with the findings whenever the
    model is at hand, so that a later ``--html`` needs no model either. Cached fields named in
    ``read_later`` are read when first used."""
    from traceinsight.analysis import findings_cache
    from traceinsight.analysis.timeline import PackedTimelineRows, timelines_for_report
    from traceinsight.ingest import expand_paths

    cache_dir, entry = _loading["cache_dir"], None
    if cache_dir:
        try:
            entry = findings_cache.entry_path(cache_dir, expand_paths(paths), options, salvage=salvage)
        except (OSError, TraceInputError):
            entry = None  # a missing or unreadable file: _load says what is wrong with it
        hit = findings_cache.load(entry, with_timelines=with_timelines, read_later=read_later) if entry else None
        if hit is not None:
            findings, timelines = hit
            if with_timelines and timelines is None:
                timelines = timelines_for_report(_load(paths, salvage=salvage, progress=progress), findings)
                findings_cache.store_timelines(entry, timelines)
            return findings, timelines
    model = _load(paths, salvage=salvage, progress=progress)
    # The model is not needed after the analysis but for the timelines (drawn now, or
    # stored with the findings for a later --html), which read a few of its columns: the
    # analysis packs those small just before it empties the model, ahead of its peak.
    # (Reading the model again from its cache for the timelines raised the peak: the range
    # instances keep the first model's names alive beside the second copy; keeping the
    # columns unpacked held them beside the peak; docs/performance.md, fifth and eighth
    # rounds.)
    wants_timelines = bool(with_timelines or entry)
    packed: list = []
    findings = _analyze(model, options, progress, free_model=True,
                        before_freeing=(lambda whole: packed.append(PackedTimelineRows(whole)))
                        if wants_timelines else None)
    # An analysis that never emptied the model (no rank reached that point) left it whole.
    kept = packed[0] if packed else model
    timelines = timelines_for_report(kept, findings) if wants_timelines else None
    del model, kept  # freed before storing: the store's read-back check is the next peak
    packed.clear()
    if entry:
        findings_cache.store(entry, findings, timelines)
    return findings, timelines


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of text.")
@click.option("--step-marker", metavar="REGEX", help="Step marker regex with one capture group.")
@click.option("--show-host", is_flag=True, help="Include host names from the traces.")
@click.option("--salvage", is_flag=True, help="Read a Kineto trace cut short up to its last complete event.")
@_report_options
@_guarded
def info(paths, as_json, step_marker, show_host, salvage, width, progress):
    """What is in each trace file: format, ranks, GPUs, events, steps, top kernels."""
    from traceinsight.analysis.inventory import describe
    from traceinsight.ingest import expand_paths, read_file
    from traceinsight.ingest.detect import detect_format

    descriptions = []
    for path in expand_paths(paths):
        model = read_file(path, salvage=salvage)
        descriptions.append(describe(model, path=path, fmt=detect_format(path),
                                     step_pattern=step_marker, show_host=show_host))
    if as_json:
        import msgspec

        click.echo(msgspec.json.format(msgspec.json.encode({"traces": descriptions}), indent=1).decode())
    else:
        from traceinsight.report.terminal import render_info

        render_info(descriptions, _console(width))


@main.command(cls=_OptionalHtmlCommand)
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--json", "json_path", metavar="FILE", help="Write the findings as JSON to FILE ('-' for stdout).")
@click.option("--step-marker", metavar="REGEX", help="Step marker regex with one capture group (the step number).")
@click.option("--comm-pattern", "comm_patterns", multiple=True, metavar="REGEX",
              help="Extra regex naming communication kernels (repeatable).")
@click.option("--show-host", is_flag=True, help="Include host names from the traces.")
@click.option("--salvage", is_flag=True, help="Read a Kineto trace cut short up to its last complete event.")
@click.option("--quiet", "-q", is_flag=True, help="No terminal summary.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Where per-rank work runs: this process, or Ray actors next to the files.")
@click.option("--ray-address", metavar="ADDR", help="Ray cluster to join (default: start a local one).")
@click.option("--html", "html_path", is_flag=False, flag_value="traceinsight-report.html", default=None,
              metavar="[FILE.html]", help="Write the HTML report to FILE.html (default traceinsight-report.html; "
                                          "a next argument not named .html is a trace path).")
@click.option("--all-steps", is_flag=True, help="List every step with its breakdown (default: the flagged ones).")
@_report_options
@_guarded
def analyze(paths, json_path, step_marker, comm_patterns, show_host, salvage, quiet, engine, ray_address,
            html_path, all_steps, width, progress):
    """Steps, where their time went, CPU-gap causes, ranges and kernels."""
    from traceinsight.analysis.options import DEFAULT_COMM_PATTERNS, Options

    options = Options(step_pattern=step_marker, comm_patterns=DEFAULT_COMM_PATTERNS + tuple(comm_patterns))
    if engine == "ray":
        from traceinsight.engines.ray_engine import analyze_with_ray

        findings = analyze_with_ray(paths, options=options, address=ray_address, salvage=salvage,
                                    cache_dir=_loading["cache_dir"])
    else:
        findings, timelines = _findings(paths, options, salvage=salvage, with_timelines=bool(html_path),
                                        progress=progress, read_later=_POSTMORTEM_FIELDS)
    outputs = []  # rendered in full before the first is written: a failure leaves none
    if json_path:
        from traceinsight.report.json_report import render_json

        quiet |= _queue_output(json_path, render_json(findings, show_host=show_host), outputs)
    if html_path:
        from traceinsight.report.html import render_html

        from traceinsight.progress import Reporter, wanted

        _check_html_path(html_path, "report")
        if engine == "ray":
            timelines = {}
        with Reporter(wanted(progress)).step("drawing the HTML report"):
            outputs.append((html_path, render_html(findings, timelines, show_host=show_host, as_bytes=True)))
    if not quiet:
        from traceinsight.report.terminal import render_findings

        render_findings(findings, _console(width), show_host=show_host, all_steps=all_steps)
    _write_outputs(outputs)
    if json_path and json_path != "-" and not quiet:
        click.echo(f"findings written to {json_path}")
    if html_path:  # even with -q: a bare --html names no file, so say which one
        _said(f"report written to {html_path}", quiet)


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--step", "step", type=int, required=True, help="The step number (the integer in its marker).")
@click.option("--rank", "rank", type=int, help="The rank (default: where the step was slowest).")
@click.option("--json", "json_path", metavar="FILE", help="Also write the post-mortem as JSON ('-' for stdout).")
@click.option("--step-marker", metavar="REGEX", help="Step marker regex with one capture group.")
@click.option("--salvage", is_flag=True, help="Read a Kineto trace cut short up to its last complete event.")
@_report_options
@_guarded
def explain(paths, step, rank, json_path, step_marker, salvage, width, progress):
    """Post-mortem of one step: where it differs from the typical step, and why."""
    import msgspec

    from traceinsight.analysis.options import Options
    from traceinsight.analysis.postmortem import step_postmortem

    findings, _ = _findings(paths, Options(step_pattern=step_marker), salvage=salvage, progress=progress)
    report = step_postmortem(findings, step=step, rank=rank)
    if json_path:
        data = msgspec.json.format(msgspec.json.encode(report), indent=1)
        if json_path == "-":
            click.echo(data.decode())
            return
        _check_writable(json_path)
    from traceinsight.report.terminal import render_postmortem

    render_postmortem(report, _console(width))
    if json_path:
        _write_outputs([(json_path, data)])


def _write_outputs(outputs: list[tuple[str, bytes]]) -> None:
    """Write each (path, data) atomically; if one write fails, remove those this run already
    wrote, so that a failed command leaves no output behind."""
    from traceinsight.report.output import write_atomic

    written = []
    try:
        for path, data in outputs:
            write_atomic(path, data)
            written.append(path)
    except BaseException:
        for path in written:
            try:
                os.unlink(path)
            except OSError:
                pass
        raise


def _queue_output(path: str, data: bytes, outputs: list) -> bool:
    """Print ``data`` for ``-`` (and say so: the terminal summary must then stay quiet), or
    queue it for :func:`_write_outputs` after checking the destination."""
    if path == "-":
        click.echo(data.decode())
        return True
    _check_writable(path)
    outputs.append((path, data))
    return False


def _check_html_path(path: str, what: str) -> None:
    """``--html`` takes an optional value, so ``--html trace.sqlite ...`` takes the trace as
    the output: never overwrite a file that is not HTML."""
    if os.path.isfile(path) and not path.lower().endswith((".html", ".htm")):
        raise TraceInputError(f"--html would overwrite {path}, which is not an .html file; "
                              f"give the {what} a .html name or put --html after the trace paths")
    _check_writable(path)


def _check_writable(path: str) -> None:
    from traceinsight.errors import OutputError

    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OutputError(f"cannot write {path}: folder {folder} does not exist; create it or "
                          "choose another path")
    if os.path.isdir(path):
        raise OutputError(f"cannot write {path}: it is a folder; give a file name")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"cannot write {path}: no permission to write in {folder}")


# --- merge and diff ---------------------------------------------------------------------------


def _step_range(ctx, param, value):
    """``20-30`` or ``27`` -> ``(20, 30)`` / ``(27, 27)``; None stays None."""
    if value is None:
        return None
    import re

    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", value)
    if not match:
        raise click.BadParameter(f"{value!r} is not a step range like 20-30 or 27", ctx=ctx, param=param)
    first, last = int(match.group(1)), int(match.group(2) or match.group(1))
    if last < first:
        raise click.BadParameter(f"{value!r}: the range ends before it starts", ctx=ctx, param=param)
    return first, last


def _rank_list(ctx, param, value):
    """``0,3`` or ``0-3,6`` -> ``[0, 3]`` / ``[0, 1, 2, 3, 6]``; None stays None."""
    if value is None:
        return None
    ranks: set[int] = set()
    for part in value.split(","):
        part = part.strip()
        bounds = _step_range(ctx, param, part) if part else None
        if bounds is None:
            raise click.BadParameter(f"{value!r} is not a rank list like 0,3 or 0-3", ctx=ctx, param=param)
        from traceinsight.errors import OptionError, check_rank_bounds

        try:
            check_rank_bounds(*bounds, text=value, already=len(ranks))
        except OptionError as exc:
            raise click.BadParameter(exc.message, ctx=ctx, param=param) from None
        ranks.update(range(bounds[0], bounds[1] + 1))
    return sorted(ranks)


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", "output", required=True, metavar="FILE",
              help="Merged trace to write (.json, or .json.gz for gzip).")
@click.option("--steps", "steps", callback=_step_range, metavar="A-B",
              help="Only events overlapping steps A to B (e.g. 20-30).")
@click.option("--ranks", "ranks", callback=_rank_list, metavar="LIST", help="Only these ranks (e.g. 0,3 or 0-3).")
@click.option("--min-cpu-us", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Drop CPU ops, Python frames and OS-runtime calls shorter than this (µs).")
@click.option("--step-marker", metavar="REGEX", help="Step marker regex with one capture group.")
@click.option("--show-host", is_flag=True, help="Put host names into the process names.")
@click.option("--salvage", is_flag=True, help="Read a Kineto trace cut short up to its last complete event.")
@_guarded
def merge(paths, output, steps, ranks, min_cpu_us, step_marker, show_host, salvage):
    """All ranks on one aligned timeline: a Chrome trace for Perfetto UI / chrome://tracing.

    One process per rank, CPU threads and GPU streams apart, clocks aligned from the
    collectives (offsets in the file's "traceinsight" metadata), and a "traceinsight" track per
    rank with the steps (anomalous ones named with their cause), cross-rank waits inside their
    collectives and arrows from each waiting rank to the straggler.
    """
    from traceinsight.analysis.pipeline import analyze as run_analysis
    from traceinsight.report.chrome_trace import write_merged

    _check_writable(output)
    if os.path.isfile(output) and not output.lower().endswith((".json", ".json.gz")):
        raise TraceInputError(f"-o {output}: the merged trace must be named .json or .json.gz "
                              "(refusing to overwrite another kind of file)")
    model = _load(paths, salvage=salvage)
    findings = run_analysis(model, step_pattern=step_marker)
    result = write_merged(output, model, findings, steps=steps, ranks=ranks, min_cpu_us=min_cpu_us,
                          show_host=show_host)
    from traceinsight.errors import printable

    for note in dict.fromkeys(findings.warnings + result.notes):
        click.echo(f"note: {printable(note)}", err=True)  # notes quote trace strings
    counts = result.counts
    trace_counts = ", ".join(f"{cat} {n:,}" for cat, n in sorted(counts.items(), key=lambda kv: -kv[1])
                             if not cat.startswith("traceinsight") and cat not in ("flows", "metadata") and n)
    size = f"{result.bytes_written / 2**20:,.1f} MiB"
    if result.bytes_written != result.json_bytes:
        size += f" ({result.json_bytes / 2**20:,.1f} MiB of JSON)"
    click.echo(f"merged {len(result.ranks)} rank(s) into {output}: {size}, {result.events:,} events")
    click.echo(f"  trace events: {trace_counts or 'none'}")
    click.echo(f"  traceinsight: {counts.get('traceinsight.step', 0):,} steps, "
               f"{counts.get('traceinsight.anomaly', 0):,} anomalous ranges, "
               f"{counts.get('traceinsight.wait', 0):,} waits, {counts.get('flows', 0):,} arrows; "
               f"{counts.get('metadata', 0):,} metadata events")


class _AgainstCommand(_OptionalHtmlCommand):
    """Lets ``--against`` take several paths: ``--against A B C`` = ``--against A --against B ...``.

    The paths after ``--against`` run up to the next option (or ``--``).
    """

    def parse_args(self, ctx, args):
        rewritten: list[str] = []
        collecting = False
        for position, arg in enumerate(args):
            if arg == "--":
                rewritten.extend(args[position:])
                break
            if arg == "--against":
                collecting = True
                continue
            if arg.startswith("--against="):
                rewritten += ["--against", arg.split("=", 1)[1]]
                collecting = True
                continue
            if collecting and not arg.startswith("-"):
                rewritten += ["--against", arg]
                continue
            collecting = False
            rewritten.append(arg)
        return super().parse_args(ctx, rewritten)


@main.command(cls=_AgainstCommand)
@click.argument("before", nargs=-1, required=True, type=click.Path())
@click.option("--against", "after", multiple=True, required=True, metavar="AFTER...",
              help="The files of the run to compare with (several may follow --against).")
@click.option("--steps-before", callback=_step_range, metavar="A-B", help="Compare only steps A to B of BEFORE.")
@click.option("--steps-after", callback=_step_range, metavar="A-B", help="Compare only steps A to B of AFTER.")
@click.option("--json", "json_path", metavar="FILE", help="Write the diff as JSON to FILE ('-' for stdout).")
@click.option("--fail-if-slower", type=float, metavar="PCT",
              help="Exit with status 3 when the median step is slower (beyond the noise) by more than PCT percent.")
@click.option("--by-rank/--no-by-rank", default=None,
              help="Also compare per rank (default: when both sides have the same ranks).")
@click.option("--step-marker", metavar="REGEX", help="Step marker regex with one capture group.")
@click.option("--salvage", is_flag=True, help="Read a Kineto trace cut short up to its last complete event.")
@click.option("--quiet", "-q", is_flag=True, help="No terminal tables.")
@click.option("--html", "html_path", is_flag=False, flag_value="traceinsight-diff.html", default=None,
              metavar="[FILE.html]", help="Write the comparison as an HTML page to FILE.html (default "
                                          "traceinsight-diff.html; a next argument not named .html is a path).")
@_report_options
@_guarded
def diff(before, after, steps_before, steps_after, json_path, fail_if_slower, by_rank, step_marker, salvage,
         quiet, html_path, width, progress):
    """Before/after: what got slower or faster per step category, range and kernel.

    Each side is one or more trace files (or folders) of one run; the same files may be given
    on both sides with --steps-before/--steps-after. A change counts only when it exceeds the
    spread of both sides' medians. Exit status: 0 done, 2 bad input, 1 internal error,
    3 with --fail-if-slower when the median step is "slower" (the verdict printed: beyond the
    noise) by more than PCT percent.
    """
    from traceinsight.analysis.diff import EXIT_SLOWER, DiffOptions, diff_findings, slower_than
    from traceinsight.analysis.options import Options

    if html_path:
        _check_html_path(html_path, "page")
    options = Options(step_pattern=step_marker)
    # A diff compares steps, ranges and kernels: the places kept for explain are never read.
    unread = tuple(field for field in _POSTMORTEM_FIELDS if field.startswith("place_"))
    before_findings, _ = _findings(before, options, salvage=salvage, progress=progress, read_later=unread)
    if sorted(map(os.path.abspath, before)) == sorted(map(os.path.abspath, after)):
        after_findings = before_findings  # the same run: analyze it once
    else:
        after_findings, _ = _findings(after, options, salvage=salvage, progress=progress, read_later=unread)
    result = diff_findings(before_findings, after_findings, steps_before=steps_before, steps_after=steps_after,
                           options=DiffOptions(by_rank=by_rank))
    outputs = []  # rendered in full before the first is written: a failure leaves none
    if json_path:
        from traceinsight.report.json_report import render_diff_json

        quiet |= _queue_output(json_path, render_diff_json(result), outputs)
    if html_path:
        from traceinsight.report.html import render_diff_html

        def label(paths, steps) -> str:
            names = [os.path.basename(os.path.normpath(p)) or p for p in paths]
            text = ", ".join(names[:2]) + (f" +{len(names) - 2} more" if len(names) > 2 else "")
            return text + (f" steps {steps[0]}-{steps[1]}" if steps else "")

        outputs.append((html_path, render_diff_html(result, before_label=label(before, steps_before),
                                                    after_label=label(after, steps_after), as_bytes=True)))
    if not quiet:
        from traceinsight.report.diff_report import render_diff

        render_diff(result, _console(width))
    _write_outputs(outputs)
    if json_path and json_path != "-" and not quiet:
        click.echo(f"diff written to {json_path}")
    if html_path:  # even with -q: a bare --html names no file, so say which one
        _said(f"report written to {html_path}", quiet)
    if fail_if_slower is not None and slower_than(result, fail_if_slower):
        summary = result.summary
        click.echo(f"traceinsight: median step slower by {summary['step_change_pct']:.1f}% "
                   f"(more than {fail_if_slower:g}%, beyond the noise of ±{summary['step_noise_ms']:.3f} ms)",
                   err=True)
        sys.exit(EXIT_SLOWER)


def run() -> None:
    """The ``traceinsight`` command: :func:`main`, then the quickest exit that is safe.

    A normal interpreter exit frees every object and module one by one, which costs 0.2 s
    even after only importing polars and numpy on the development machine (a second
    question is answered in little more than that). Once the command is done its outputs
    are written (atomically) and flushed, so the process ends with ``os._exit`` unless
    something still needs the regular exit: a worker thread or child process still alive,
    an object finalizer waiting (a temporary folder to remove), Ray (its shutdown runs at
    exit), or output that cannot be flushed (the regular exit reports that).
    """
    _import_libraries_frozen()
    try:
        main()
        code = 0
    except SystemExit as stop:
        code = stop.code
    if not isinstance(code, int):  # sys.exit's other forms: None is success, text an error
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        sys.exit(code)
    if _needs_regular_exit():
        sys.exit(code)
    os._exit(code)


def _import_libraries_frozen() -> None:
    """Import polars and numpy, which every command needs, with the cyclic garbage collector
    off, then freeze what exists: their hundreds of thousands of module-level objects live
    until the process ends, and a collection that walks them cost 0.1 s of a second question
    (its median here: 0.85 -> 0.73 s in process). Later garbage is collected as usual."""
    import gc

    gc.disable()
    try:
        import numpy  # noqa: F401
        import polars  # noqa: F401
    finally:
        gc.freeze()
        gc.enable()


def _needs_regular_exit() -> bool:
    import threading
    import weakref

    if "ray" in sys.modules or any(t.is_alive() and not t.daemon for t in threading.enumerate()
                                   if t is not threading.main_thread()):
        return True
    if "multiprocessing" in sys.modules:
        import multiprocessing

        if multiprocessing.active_children():
            return True
    return any(info.atexit for info in getattr(weakref.finalize, "_registry", {}).values())


if __name__ == "__main__":  # pragma: no cover
    run()
