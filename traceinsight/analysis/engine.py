"""The analysis as per-rank phases and small cross-rank reductions.

Almost everything traceinsight computes depends on one rank's events only; what crosses
ranks (clock alignment, collective waits, job-level step flags, straggler reasons, the
imbalance model) needs only small summaries. So the analysis runs as three per-rank phases
with a cross-rank reduction after each, and the same code serves two engines:

- **local** (:func:`analyze_model`): the workers live in this process;
- **ray** (:mod:`traceinsight.engines.ray_engine`): each file's workers live in a Ray actor
  next to the file, and only the summaries below travel to the driver.

Per rank (:class:`RankWorker`):

1. :meth:`~RankWorker.steps_and_collectives`: steps, GPU activities, communication kernels
   with their phase and row counts.
2. :meth:`~RankWorker.breakdown`: given the rank's wait spans, the step breakdown and the
   rank's own step flags.
3. :meth:`~RankWorker.finish`: given the job's step flags and the straggler windows to break
   down, CPU-gap causes, ranges, anomalies and their causes, top kernels.

Results are identical between engines by construction: the driver code is the same and
combines per-rank results in rank order.
"""

from __future__ import annotations

from collections.abc import Callable

import polars as pl

from traceinsight.analysis.alignment import Alignment
from traceinsight.analysis.analyzers.cause_totals import summarize_causes
from traceinsight.analysis.analyzers.collective_details import enrich_collectives
from traceinsight.analysis.analyzers.collective_pairing import pair_collectives
from traceinsight.analysis.analyzers.communication_kernels import communication_kernels
from traceinsight.analysis.analyzers.compute_phase_times import compute_phase_times
from traceinsight.analysis.analyzers.cpu_gap_causes import attribute_cpu_gaps
from traceinsight.analysis.analyzers.gpu_activities import gpu_activities
from traceinsight.analysis.analyzers.job_step_flags import flag_job_steps
from traceinsight.analysis.analyzers.judged_durations import judged_durations
from traceinsight.analysis.analyzers.launch_counts import launches_per_step
from traceinsight.analysis.analyzers.load_imbalance import imbalance_from
from traceinsight.analysis.analyzers.range_findings import MAX_RANGE_FINDINGS_PER_STEP, explain_range_instances
from traceinsight.analysis.analyzers.range_flags import flag_range_instances
from traceinsight.analysis.analyzers.range_instances import range_instances
from traceinsight.analysis.analyzers.range_statistics import range_statistics
from traceinsight.analysis.analyzers.step_breakdown import step_breakdown
from traceinsight.analysis.analyzers.step_findings import explain_steps
from traceinsight.analysis.analyzers.step_flags import flag_steps
from traceinsight.analysis.analyzers.steps import find_steps
from traceinsight.analysis.analyzers.straggler_reasons import reasons_from_windows
from traceinsight.analysis.analyzers.straggler_windows import straggler_windows
from traceinsight.analysis.analyzers.top_kernels import top_kernels
from traceinsight.analysis.analyzers.wait_table import wait_table
from traceinsight.analysis.analyzers.waits import match_waits
from traceinsight.analysis.analyzers.window_breakdown import window_breakdown
from traceinsight.analysis.classify import range_group_expr
from traceinsight.analysis.collectives import collective_ops, wait_intervals
from traceinsight.analysis.findings import Findings
from traceinsight.analysis.options import Options
from traceinsight.analysis.job_notes import disjoint_ranks_note, job_identity_note, partial_job_note
from traceinsight.analysis.places import Places
from traceinsight.analysis.schemas import ANOMALY_SCHEMA, frame_of
from traceinsight.analysis.step_table import assign_to_steps
from traceinsight._allocators import release_freed_memory
from traceinsight.model import TraceModel

#: Largest CPU gaps per rank kept when only summaries may travel (the Ray engine).
SUMMARY_GAPS = 500


class RankWorker:
    """One rank's state across the three phases.

    With ``free_model`` the worker owns ``model`` and empties it
    (:meth:`~traceinsight.model.TraceModel.drop_events`) as soon as no phase needs its
    events: once the range instances have taken its annotations, before they are measured,
    flagged and placed (the analysis's largest step). ``before_freeing(model)``, if given,
    is called just before.
    """

    def __init__(self, model: TraceModel, options: Options, *, free_model: bool = False,
                 before_freeing: Callable[[TraceModel], None] | None = None) -> None:
        self.model = model
        self.options = options
        self.free_model = free_model
        self.before_freeing = before_freeing
        self.rank = int(model.ranks.get_column("rank")[0])

    def steps_and_collectives(self) -> dict:
        model, options = self.model, self.options
        self.table = find_steps(model, pattern=options.step_pattern)
        self.marker_names = self.table.marker_names(model.intervals)
        self.gpu = gpu_activities(model, comm_patterns=options.comm_patterns)
        comm = communication_kernels(self.gpu, self.table.steps, collective_ops(model))
        return {
            "steps": self.table.steps,
            "step_source": self.table.source,
            "step_pattern": self.table.pattern,
            "comm": enrich_collectives(model, comm, step_labels=self.marker_names),
            "ranks": model.ranks,
            "warnings": list(model.warnings),
        }

    def breakdown(self, waits: pl.DataFrame) -> pl.DataFrame:
        self.result = step_breakdown(self.model, self.table, waits=waits, gpu=self.gpu)
        return flag_steps(judged_durations(self.result.steps, self.gpu), self.options.anomaly_options)

    def finish(self, steps: pl.DataFrame, windows: pl.DataFrame, *, keep_details: bool) -> dict:
        model, options = self.model, self.options
        # The analyses that need only the model and the GPU activities run first, so that
        # their temporaries are freed before the range instances and CPU gaps pile up.
        compute_times = compute_phase_times(model, self.gpu, steps, step_labels=self.marker_names)
        kernels = top_kernels(model, limit=10)
        launch_counts = launches_per_step(self.gpu, steps)
        release_freed_memory()
        gaps = attribute_cpu_gaps(model, self.result.gaps, marker_names=self.marker_names)
        cause_totals = summarize_causes(gaps)  # as soon as the gaps exist, like what follows
        # The model's last use: with free_model nothing below reads its events, and it is
        # emptied as soon as its annotations are taken.
        if self.free_model and self.before_freeing is not None:
            self.before_freeing(model)
        instances = range_instances(model, gpu=self.gpu, free_model=self.free_model)
        # Step markers are annotations too, but the step table already covers them. Names
        # are grouped without the per-call suffixes of emit_nvtx (the raw name is kept).
        instances = instances.filter(~pl.col("name").is_in(self.marker_names)).with_columns(
            raw_name=pl.col("name"), name=range_group_expr())
        # One step at a time, each result replacing the last: no version of the largest
        # frame is held longer than the step that reads it.
        instances = assign_to_steps(instances, steps)
        instances = self.result.window_breakdown(instances)
        instances = flag_range_instances(instances, options.anomaly_options,
                                         first_is_warmup=self.table.source == "whole trace")
        statistics = range_statistics(instances)
        sync_gaps = self.result.gaps.filter(pl.col("category") == "host_sync")
        places = None
        if steps.get_column("anomalous").any() or instances.get_column("anomalous").any():
            places = Places(steps, instances, gaps, self.gpu, sync_gaps)
        step_anomalies = explain_steps(steps, instances, gaps, launch_counts=launch_counts, places=places)
        if places is not None:
            places.drop_caches()  # the step findings were their only reader
        range_anomalies = explain_range_instances(instances, gaps, steps=steps, places=places)
        left_out = sum(a["others_in_step"] for a in range_anomalies)
        notes = [f"rank {self.rank}: {left_out} more anomalous range instances are not listed (the "
                 f"{MAX_RANGE_FINDINGS_PER_STEP} largest of each step are)"] if left_out else []
        broken = window_breakdown(self.result.sets, windows) if windows.height else windows
        details = {
            "cpu_gaps": gaps,
            "sync_gaps": sync_gaps,
            "range_instances": instances,
            "gpu": self.gpu,
            # Kept so that a later `explain` of a cached analysis need not place them again.
            **(places.frames() if places is not None else {}),
        } if keep_details else {
            "sync_gaps": sync_gaps.sort("start_ns").head(SUMMARY_GAPS),
            "cpu_gaps": gaps.sort("duration_ns", descending=True).head(SUMMARY_GAPS).sort("rank", "start_ns"),
            "range_instances": instances.filter(pl.col("anomalous")),
            "gpu": self.gpu.head(0),
        }
        return {
            **details,
            "cpu_gap_causes": cause_totals,
            "ranges": statistics,
            "top_kernels": kernels,
            "launch_counts": launch_counts,
            "step_anomalies": step_anomalies,
            "range_anomalies": range_anomalies,
            "notes": notes,
            "broken_windows": broken,
            "compute_times": compute_times,
        }


def _frames(parts: list[pl.DataFrame]) -> pl.DataFrame:
    parts = [p for p in parts if p is not None and p.width]
    return pl.concat(parts, how="diagonal_relaxed") if parts else pl.DataFrame()


def _place_frames(done: list[dict]) -> dict[str, pl.DataFrame]:
    """The ranks' place frames as one set: each rank's range tree numbers its nodes from 0,
    so later ranks' node numbers (and the gaps' references to them) move past the earlier
    ones. Empty where some rank built none (no anomaly there): then `explain` builds them."""
    if not done or any("place_tree" not in part for part in done):
        return {}
    cpu, gpu, trees, offset = [], [], [], 0
    for part in done:
        tree, shift = part["place_tree"], pl.lit(offset, pl.Int64)
        if tree.height:
            trees.append(tree.with_columns(pl.col("node") + shift, pl.col("parent") + shift))
        cpu.append(part["place_cpu"].with_columns(
            node=pl.when(pl.col("node") >= 0).then(pl.col("node") + shift).otherwise(pl.col("node"))))
        gpu.append(part["place_gpu"])
        offset += tree.height
    return {"place_cpu": _frames(cpu), "place_gpu": _frames(gpu), "place_tree": _frames(trees)}


def run_phases(call, options: Options):
    """Drive the per-rank phases through ``call(method, per_rank_args) -> {rank: result}``.

    ``call`` runs ``RankWorker.<method>`` on every rank (here or remotely) with that rank's
    arguments from ``per_rank_args`` (a dict rank -> tuple) and returns the results by rank.
    Returns :class:`~traceinsight.analysis.findings.Findings`.
    """
    first = call("steps_and_collectives", None)
    ranks_order = sorted(first)
    if not ranks_order:
        from traceinsight.errors import TraceInputError

        raise TraceInputError("the traces hold no events (no CUDA, NVTX, OS runtime or CPU sample "
                              "rows): nothing to analyze; `traceinsight info` shows what they hold")
    ranks = _frames([first[r]["ranks"] for r in ranks_order])
    warnings = [w for r in ranks_order for w in first[r]["warnings"]]
    sources = {first[r]["step_source"] for r in ranks_order}
    step_source = sources.pop() if len(sources) == 1 else "mixed"
    if step_source.startswith("repeated range"):
        warnings.append(f"steps are the instances of the {step_source} (no numbered step marker), "
                        "numbered by order from 0")
    elif "whole trace" in sources or step_source == "whole trace":
        where = ": the whole trace is one step" if step_source == "whole trace" else \
            " on some ranks: there the whole trace is one step"
        if options.step_pattern:
            warnings.append(f"step marker {options.step_pattern!r} matched no annotation{where}")
        else:
            warnings.append(f"no step markers (ProfilerStep#N, 'step N', 'iteration N'){where}")
    comm = _frames([first[r]["comm"] for r in ranks_order])
    if note := job_identity_note(ranks, _frames([first[r]["steps"] for r in ranks_order]), comm):
        # Not one job: no pairing, no alignment; each file keeps its own clock.
        alignment = Alignment({r: 0 for r in ranks_order}, ranks_order[0], "none", trusted=False, notes=[note])
    else:
        comm, alignment = pair_collectives(comm, ranks)
        if note := partial_job_note(ranks):
            warnings.append(note)
    warnings += alignment.notes
    collectives = match_waits(comm, alignment) if comm.height else pl.DataFrame()
    spans = wait_intervals(collectives)
    flagged = call("breakdown", {r: (spans.filter(pl.col("rank") == r),) for r in ranks_order})
    steps = _frames([flagged[r] for r in ranks_order])
    steps = flag_job_steps(steps, options.anomaly_options)
    if alignment.trusted and (note := disjoint_ranks_note(steps, alignment)):
        warnings.append(note)
    windows = straggler_windows(collectives, steps, alignment)
    done = call("finish", {
        r: (steps.filter(pl.col("rank") == r), windows.filter(pl.col("rank") == r))
        for r in ranks_order
    })
    warnings += [note for r in ranks_order for note in done[r].get("notes", [])]
    range_anomalies = sorted(
        (a for r in ranks_order for a in done[r]["range_anomalies"]),
        key=lambda a: (-a["excess_ms"], a["rank"], a["step"], a["where"]),
    )
    anomalies = frame_of([{"kind": "step", **a} for r in ranks_order for a in done[r]["step_anomalies"]]
                         + range_anomalies, ANOMALY_SCHEMA)
    instances = _frames([done[r]["range_instances"] for r in ranks_order])
    return Findings(
        ranks=ranks.with_columns(
            clock_offset_ns=pl.col("rank").replace_strict(alignment.offsets, default=0, return_dtype=pl.Int64)
        ),
        steps=steps,
        step_source=step_source,
        step_pattern=first[ranks_order[0]]["step_pattern"],
        cpu_gaps=_frames([done[r]["cpu_gaps"] for r in ranks_order]),
        sync_gaps=_frames([done[r]["sync_gaps"] for r in ranks_order]),
        cpu_gap_causes=_frames([done[r]["cpu_gap_causes"] for r in ranks_order]),
        ranges=_frames([done[r]["ranges"] for r in ranks_order]).sort(
            ["total_ms", "rank", "name"], descending=[True, False, False]),
        range_instances=instances,
        top_kernels=_frames([done[r]["top_kernels"] for r in ranks_order]),
        gpu=_frames([done[r]["gpu"] for r in ranks_order]),
        **_place_frames([done[r] for r in ranks_order]),
        launch_counts=_frames([done[r]["launch_counts"] for r in ranks_order]),
        anomalies=anomalies,
        waits=wait_table(collectives),
        alignment=alignment,
        collectives=collectives,
        stragglers=reasons_from_windows(collectives, _frames([done[r]["broken_windows"] for r in ranks_order])),
        imbalance=imbalance_from(_frames([done[r]["compute_times"] for r in ranks_order]), collectives, steps),
        warnings=warnings,
    )


def split_by_rank(model: TraceModel) -> dict[int, TraceModel]:
    """One single-rank model per rank (the model itself when it has one rank)."""
    if len(model.rank_ids) == 1:
        return {model.rank_ids[0]: model}
    out = {}
    for rank in model.rank_ids:
        out[rank] = TraceModel(
            intervals=model.intervals.filter(pl.col("rank") == rank),
            samples=model.samples.filter(pl.col("rank") == rank),
            ranks=model.ranks.filter(pl.col("rank") == rank),
            warnings=list(model.warnings) if rank == model.rank_ids[0] else [],
        )
    return out


#: What each per-rank phase does, for progress reports.
PHASE_NAMES = {"steps_and_collectives": "steps and collectives", "breakdown": "step breakdown",
               "finish": "ranges, CPU gaps, anomalies"}


def analyze_model(model: TraceModel, options: Options = Options(), *, on_phase=None, free_model: bool = False,
                  before_freeing: Callable[[TraceModel], None] | None = None):
    """The local engine: every rank's worker in this process.

    ``on_phase(description, done, total)`` (optional) is called before each rank's part of each
    phase, for a progress bar. With ``free_model`` the analysis empties ``model``
    (:meth:`~traceinsight.model.TraceModel.drop_events`) once it needs its events no more, so
    that their memory is given back before the analysis's peak (on an emit_nvtx flood the
    events are a third of it): for a caller that does not use the model afterwards.
    ``before_freeing(model)`` is then called once, with the whole model, just before it is
    emptied: for a caller that keeps a part of it in another form (the HTML report's
    timelines, :class:`~traceinsight.analysis.timeline.PackedTimelineRows`).
    """
    several = len(model.rank_ids) > 1
    if free_model and several and before_freeing is not None:
        before_freeing(model)  # before the split: its copies are not yet held beside the model
    parts = split_by_rank(model)
    if free_model and several:
        model.drop_events()  # each rank's part is a copy
    workers = {rank: RankWorker(part, options, free_model=free_model,
                                before_freeing=None if several else before_freeing)
               for rank, part in parts.items()}
    del parts
    total = 3 * len(workers)
    done = 0

    def call(method: str, per_rank_args: dict | None) -> dict:
        nonlocal done
        keep = {"keep_details": True} if method == "finish" else {}
        results = {}
        for rank, worker in workers.items():
            if on_phase is not None:
                on_phase(f"{PHASE_NAMES.get(method, method)} · rank {rank}", done, total)
            results[rank] = getattr(worker, method)(*(per_rank_args[rank] if per_rank_args else ()), **keep)
            done += 1
            release_freed_memory()  # the phase's temporaries, before the next one piles up
        return results

    return run_phases(call, options)
