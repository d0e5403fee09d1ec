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
