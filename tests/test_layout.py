"""Package layout: user-facing tools in their own subpackage, no import cycles between pipeline stages."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "optimum_mc"


def _imports(path: Path) -> set[str]:
    """Absolute names of the optimum_mc modules that ``path`` imports (top-level or inside functions)."""
    rel = path.relative_to(PKG.parent).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("optimum_mc"):
                found.add(mod)
                found.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("optimum_mc"))
    return found


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_user_facing_tools_live_in_their_own_subpackage():
    for name in ("cli", "demo", "demo_run", "speed", "inspect_model", "evaluation"):
        assert (PKG / "tools" / f"{name}.py").is_file(), name
        assert not (PKG / f"{name}.py").exists(), f"{name}.py should live in optimum_mc/tools/"


def test_no_import_cycles_through_the_pipeline():
    """pipeline imports pruning (ODP calibration); nothing under pruning/calibration/nn/kernels imports it back."""
    for sub in ("pruning", "calibration", "nn", "kernels"):
        for path in (PKG / sub).rglob("*.py"):
            bad = {m for m in _imports(path) if m == "optimum_mc.pipeline" or m.startswith("optimum_mc.tools")}
            assert not bad, f"{_module_name(path)} imports {sorted(bad)}"
    # the core never depends on the user-facing tools
    for path in PKG.glob("*.py"):
        bad = {m for m in _imports(path) if m.startswith("optimum_mc.tools")}
        if path.name != "__main__.py":
            assert not bad, f"{_module_name(path)} imports {sorted(bad)}"


def test_docs_tests_and_scripts_name_no_absolute_path_of_one_machine():
    """Issue 20: paths to the reference models are relative to the repository (../shared), never absolute."""
    import re

    root = PKG.parent
    files = [root / "README.md", *(root / "docs").glob("*.md"), *(root / "tests").rglob("*.py"),
             *(root / "scripts").glob("*.py"), *(root / "scripts").glob("*.sh")]  # fmt: skip
    pattern = re.compile(r"(?<![\w.])/(?:work|root|home/\w+)/")
    bad = [f"{p.relative_to(root)}:{i}" for p in files for i, line in enumerate(p.read_text().splitlines(), 1)
           if pattern.search(line) and p.name != "test_layout.py"]  # fmt: skip
    assert not bad, bad


def _top_level_imports(path: Path, modules: set[str]) -> set[str]:
    """The optimum_mc modules ``path`` imports when it is itself imported (module level, not inside functions: a
    deferred import inside a function is how a lower layer reaches an upper one at call time)."""
    rel = path.relative_to(PKG.parent).with_suffix("")
    package = list(rel.parts[:-1])
    found = set()
    for node in ast.parse(path.read_text()).body:
        names = []
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
            names = [mod] + [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for n in names:
            while n and n not in modules:  # a name imported from a module: the module itself
                n = n.rpartition(".")[0]
            if n:
                found.add(n)
    return found


def test_no_import_cycles_anywhere_in_the_package():
    """Issue 25: the module-level import graph of optimum_mc is acyclic (a package's ``__init__`` importing its own
    submodules aside), so every module can be read after the ones it imports."""
    paths = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {m: _top_level_imports(p, set(paths)) - {m} for m, p in paths.items()}
    for m in graph:  # __init__ re-exporting its own submodules is not a cycle of layers
        graph[m] = {d for d in graph[m] if not d.startswith(m + ".") and not m.startswith(d + ".")}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d) :] + [d] if d in stack else [m, d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles[:5]
