"""The package layout holds: every import of every package module (top-level and function-local, read with `ast`,
nothing imported) points down this order, and no module imports itself back through others.

    fmrilm_core < corpus_builder < tokenizer_train < llm_train < evaluation < cluster < fmrilm

fmrilm_core is the shared base; the four stage libraries come in pipeline order (a later stage may read an earlier
one's outputs, never the other way); `cluster` holds the launchers (Ray Train, Ray Jobs, the SLURM and KubeRay
templates), which run the stage libraries and never the entry; `fmrilm` is the entry (CLI, pipeline, stage
registry, config, tracking, progress, ablations), on top of everything. A module may import its own package.

Typing-only imports (`if TYPE_CHECKING:`) never run, so they count for the direction and not for cycles. And no
module is over MAX_LINES lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
ORDER = ["fmrilm_core", "corpus_builder", "tokenizer_train", "llm_train", "evaluation", "cluster", "fmrilm"]
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    found = {}
    for package in ORDER:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _typing_only(tree: ast.Module) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:`."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            ids.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    return ids


def _known(name: str) -> str | None:
    """The package module `name` is, or lies in (an attribute of a module); None outside the packages."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str) -> dict[str, bool]:
    """The package modules `module` imports -> whether at run time (False: only under TYPE_CHECKING)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    typing_only = _typing_only(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: dict[str, bool] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            # `from pkg import sub` imports the submodule; `from mod import name` the module
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for name in names:
            target = _known(name)
            if target and target != module:
                found[target] = found.get(target, False) or id(node) not in typing_only
    return found


def _package(module: str) -> str:
    return module.split(".")[0]


def test_packages_import_only_downward():
    upward = [f"{module} -> {target}" for module in MODULES for target in imports(module)
              if ORDER.index(_package(target)) > ORDER.index(_package(module))]
    assert not upward, upward


def test_no_import_cycle_between_modules():
    graph = {module: [t for t, runtime in imports(module).items() if runtime] for module in MODULES}
    cycles, state = [], {}  # state: 1 on the current path, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in graph[module]:
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [module, target]))
            elif target not in state:
                visit(target, path + [module])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [])
    assert not cycles, cycles


def test_launchers_never_import_the_entry():
    reached = {t for module in MODULES if _package(module) == "cluster" for t in imports(module)}
    assert not [t for t in reached if _package(t) == "fmrilm"]


def test_no_module_over_the_line_limit():
    long = {str(path.relative_to(ROOT)): n for path in MODULES.values()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"
