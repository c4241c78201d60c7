"""The ``traceinsight`` command: a thin click layer over ingest → analysis → report.

Exit codes: 0 success, 2 bad input (a one-line message says which file and what is wrong),
1 internal error (``--debug`` shows the traceback).
"""

from __future__ import annotations

import functools
import os
import sys

import click
from rich.console import Console

from traceinsight.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, TraceInputError

_debug = False


def _guarded(command):
    """Turn exceptions into one-line messages and documented exit codes."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
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
        except Exception as exc:  # noqa: BLE001 - the last line of defence
            if _debug:
                raise
            click.echo(
                f"traceinsight: internal error: {type(exc).__name__}: {exc} "
                "(run with --debug for the traceback and please report it)",
                err=True,
            )
            sys.exit(EXIT_INTERNAL)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="traceinsight-moe", prog_name="traceinsight")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def main(debug: bool) -> None:
    """Why was this MoE step slow, and who waited for whom.

    Reads Nsight Systems SQLite exports (nsys export --type sqlite) and PyTorch profiler
    traces (.json / .json.gz), one file per rank or several processes per file.
    """
    global _debug
    _debug = debug


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of text.")
@click.option("--step-marker", metavar="REGEX", help="Step marker regex with one capture group.")
@click.option("--show-host", is_flag=True, help="Include host names from the traces.")
@click.option("--salvage", is_flag=True, help="Read a Kineto trace cut short up to its last complete event.")
@_guarded
def info(paths, as_json, step_marker, show_host, salvage):
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

        render_info(descriptions, Console())


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--json", "json_path", metavar="FILE", help="Write the findings as JSON to FILE ('-' for stdout).")
@click.option("--step-marker", metavar="REGEX", help="Step marker regex with one capture group (the step number).")
@click.option("--comm-pattern", "comm_patterns", multiple=True, metavar="REGEX",
              help="Extra regex naming communication kernels (repeatable).")
@click.option("--show-host", is_flag=True, help="Include host names from the traces.")
@click.option("--salvage", is_flag=True, help="Read a Kineto trace cut short up to its last complete event.")
@click.option("--quiet", "-q", is_flag=True, help="No terminal summary.")
@click.option("--html", "html_path", is_flag=False, flag_value="traceinsight-report.html", default=None,
              metavar="[FILE]", help="Write the HTML report to FILE (default traceinsight-report.html).")
@_guarded
def analyze(paths, json_path, step_marker, comm_patterns, show_host, salvage, quiet, html_path):
    """Steps, where their time went, CPU-gap causes, ranges and kernels."""
    import traceinsight
    from traceinsight.analysis.classify import DEFAULT_COMM_PATTERNS
    from traceinsight.analysis.pipeline import analyze as run_analysis

    model = traceinsight.load(paths, salvage=salvage)
    findings = run_analysis(model, step_pattern=step_marker,
                            comm_patterns=DEFAULT_COMM_PATTERNS + tuple(comm_patterns))
    if json_path:
        from traceinsight.report.json_report import render_json
        from traceinsight.report.output import write_atomic

        data = render_json(findings, show_host=show_host)
        if json_path == "-":
            click.echo(data.decode())
            quiet = True
        else:
            _check_writable(json_path)
            write_atomic(json_path, data)
    if html_path:
        from traceinsight.analysis.timeline import timelines_for_report
        from traceinsight.report.html import render_html
        from traceinsight.report.output import write_atomic

        # "--html trace.sqlite ..." takes the trace as FILE: never overwrite a non-HTML file.
        if os.path.isfile(html_path) and not html_path.lower().endswith((".html", ".htm")):
            raise TraceInputError(f"--html would overwrite {html_path}, which is not an .html file; "
                                  "give the report a .html name or put --html after the trace paths")
        _check_writable(html_path)
        write_atomic(html_path, render_html(findings, timelines_for_report(model, findings), show_host=show_host))
    if not quiet:
        from traceinsight.report.terminal import render_findings

        render_findings(findings, Console(), show_host=show_host)
        if json_path and json_path != "-":
            click.echo(f"findings written to {json_path}")
        if html_path:
            click.echo(f"report written to {html_path}")


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--step", "step", type=int, required=True, help="The step number (the integer in its marker).")
@click.option("--rank", "rank", type=int, help="The rank (default: where the step was slowest).")
@click.option("--json", "json_path", metavar="FILE", help="Also write the post-mortem as JSON ('-' for stdout).")
@click.option("--step-marker", metavar="REGEX", help="Step marker regex with one capture group.")
@click.option("--salvage", is_flag=True, help="Read a Kineto trace cut short up to its last complete event.")
@_guarded
def explain(paths, step, rank, json_path, step_marker, salvage):
    """Post-mortem of one step: where it differs from the typical step, and why."""
    import msgspec

    import traceinsight
    from traceinsight.analysis.pipeline import analyze as run_analysis
    from traceinsight.analysis.postmortem import step_postmortem

    findings = run_analysis(traceinsight.load(paths, salvage=salvage), step_pattern=step_marker)
    report = step_postmortem(findings, step=step, rank=rank)
    if json_path:
        data = msgspec.json.format(msgspec.json.encode(report), indent=1)
        if json_path == "-":
            click.echo(data.decode())
            return
        from traceinsight.report.output import write_atomic

        _check_writable(json_path)
        write_atomic(json_path, data)
    from traceinsight.report.terminal import render_postmortem

    render_postmortem(report, Console())


def _check_writable(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise TraceInputError(f"output folder {folder} does not exist")
    if os.path.isdir(path):
        raise TraceInputError(f"output path {path} is a directory")


if __name__ == "__main__":  # pragma: no cover
    main()
