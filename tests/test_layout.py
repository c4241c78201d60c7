"""The house rules of the source tree: data flows one way, no import circles, readers are
reached through ``traceinsight.ingest``, the registry lists what the engine runs, and every
analysis is a module of ``analysis/analyzers/`` with one public function that says what it
reads and returns."""

from __future__ import annotations

import ast
import importlib
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


def _analyzer_modules() -> list[str]:
    """The modules of ``analysis/analyzers/``, by file (the package itself left out)."""
    folder = PACKAGE / "analysis" / "analyzers"
    return sorted(f"traceinsight.analysis.analyzers.{path.stem}" for path in folder.glob("*.py")
                  if path.stem != "__init__")


def test_each_analyzer_module_defines_its_one_analysis_and_nothing_else_public():
    from traceinsight.analysis.descriptor import Analysis

    wrong = []
    for name in _analyzer_modules():
        module = importlib.import_module(name)
        defined = sorted(key for key, value in vars(module).items()
                         if not key.startswith("_") and (inspect.isfunction(value) or inspect.isclass(value))
                         and value.__module__ == name)
        descriptor = getattr(module, "ANALYSIS", None)
        if not isinstance(descriptor, Analysis):
            wrong.append(f"{name}: no ANALYSIS descriptor")
            continue
        function = descriptor.function
        if defined != [function.__name__] or getattr(module, function.__name__, None) is not function:
            wrong.append(f"{name}: defines {defined}, its ANALYSIS names {function.__module__}.{function.__name__}")
        if getattr(module, "__all__", None) != [function.__name__]:
            wrong.append(f"{name}: __all__ is {getattr(module, '__all__', None)}, not [{function.__name__!r}]")
    assert not wrong, wrong


def test_registry_lists_every_analyzer_module_once_and_nothing_else():
    from traceinsight.analysis.registry import ANALYSES, MODULES

    listed = [module.__name__ for module in MODULES]
    assert len(set(listed)) == len(listed), f"listed twice: {sorted({m for m in listed if listed.count(m) > 1})}"
    assert sorted(listed) == _analyzer_modules(), "the registry's MODULES and the files of analysis/analyzers/ differ"
    assert ANALYSES == tuple(module.ANALYSIS for module in MODULES)
    names = [analysis.name for analysis in ANALYSES]
    assert len(set(names)) == len(names), f"two analyses share a name: {names}"


def test_each_analysis_says_what_it_reads_and_returns():
    """A paragraph "Reads ...; returns ..." (or a "Reads ..." paragraph and a numpydoc
    Returns section)."""
    from traceinsight.analysis.registry import ANALYSES

    wrong = []
    for analysis in ANALYSES:
        doc = inspect.getdoc(analysis.function) or ""
        reads = [paragraph for paragraph in doc.split("\n\n") if paragraph.startswith("Reads ")]
        returns = any("returns" in paragraph for paragraph in reads) or "\nReturns\n-------\n" in f"\n{doc}"
        if not reads or not returns:
            wrong.append(f"{analysis.function.__name__}: {'no Reads paragraph' if not reads else 'returns not said'}")
    assert not wrong, wrong
