"""The house rules of the source tree: data flows one way, no import circles, readers are
reached through ``traceinsight.ingest``, and the registry lists what the engine runs."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import traceinsight

PACKAGE = Path(traceinsight.__file__).resolve().parent
#: Each layer may import the ones before it, never one after it.
LAYERS = ["model", "ingest", "analysis", "engines", "report", "cli"]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``path`` imports at run time (function-level imports included,
    ``if TYPE_CHECKING:`` blocks left out)."""

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(resolve(alias.name) for alias in node.names if alias.name.startswith("traceinsight"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("traceinsight"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in modules else resolve(node.module))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    found.discard(None)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_no_import_circle():
    graph = _graph()
    circles = []
    state: dict[str, int] = {}

    def walk(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                circles.append(trail[trail.index(target):] + [target] if target in trail else [module, target])
            elif target not in state:
                walk(target, trail + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    assert not circles, circles


def test_no_arrow_runs_back_up():
    wrong = []
    for module, targets in _graph().items():
        mine = _layer(module)
        for target in targets:
            theirs = _layer(target)
            if mine and theirs and LAYERS.index(theirs) > LAYERS.index(mine):
                wrong.append(f"{module} -> {target}")
    assert not wrong, wrong


def test_readers_are_reached_through_ingest_only():
    readers = ("traceinsight.ingest.nsys", "traceinsight.ingest.kineto")
    wrong = [f"{module} -> {target}" for module, targets in _graph().items() for target in targets
             if target.startswith(readers) and not module.startswith("traceinsight.ingest")]
    assert not wrong, wrong


def test_registry_lists_every_analysis_the_engine_runs():
    from traceinsight.analysis import engine
    from traceinsight.analysis.registry import ANALYSES

    listed = {analysis.function for analysis in ANALYSES}
    # What the engine calls that is not an analysis: option types, expressions, notes,
    # the step assignment every analysis shares, and the per-rank place index.
    plumbing = {"AnomalyOptions", "Alignment", "Findings", "Places", "TraceModel", "assign_to_steps",
                "range_group_expr", "collective_ops", "disjoint_ranks_note", "job_identity_note",
                "partial_job_note", "wait_intervals", "frame_of", "release_freed_memory"}
    source = ast.parse(inspect.getsource(engine))
    imported = {alias.asname or alias.name for node in ast.walk(source) if isinstance(node, ast.ImportFrom)
                and (node.module or "").startswith("traceinsight.analysis") for alias in node.names}
    missing = sorted(name for name in imported - plumbing
                     if callable(getattr(engine, name, None)) and name.islower() and getattr(engine, name) not in listed)
    assert not missing, f"analyses the engine runs but the registry does not list: {missing}"
    for analysis in ANALYSES:
        doc = inspect.getdoc(analysis.function) or ""
        assert "return" in doc.lower(), f"{analysis.function.__name__} does not say what it returns"
