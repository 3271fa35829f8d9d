"""The library's modules import each other one way: no circle, even through type-only or in-function imports."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imports(path: Path) -> set[str]:
    """Every `pipeline.*` / `stages.*` module a file imports, wherever the import stands (top level, under
    TYPE_CHECKING, inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in ("pipeline", "stages")
                     and (ROOT / (n.replace(".", "/") + ".py")).exists())
    return found


def test_pipeline_modules_form_no_import_circle_and_never_import_the_stages():
    graph = {f"pipeline.{p.stem}": imports(p) for p in (ROOT / "pipeline").glob("*.py") if p.stem != "__init__"}
    assert not any(m.startswith("stages.") for deps in graph.values() for m in deps)
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        if state.get(module) == 1:
            raise AssertionError(f"import circle: {' -> '.join(path + [module])}")
        if state.get(module) == 2:
            return
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            visit(dep, path + [module])
        state[module] = 2

    for module in sorted(graph):
        visit(module, [])


def test_records_import_no_behaviour_module():
    assert imports(ROOT / "pipeline" / "records.py") == set()


def test_cache_info_imports_neither_torch_nor_timm():
    # `replaykd cache info` answers in about a second: importing torch and timm alone takes several
    code = "import sys, stages.cache_info; print(sorted({'torch', 'timm'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_command_imports_another_command_or_the_benchmarks():
    # stages/*.py are the commands (their options module and the CLI that derives them aside); the benchmarks,
    # which run commands to measure them, live in stages/bench/
    shared = {"__init__", "__main__", "cli", "options"}
    commands = sorted(p.stem for p in (ROOT / "stages").glob("*.py") if p.stem not in shared)
    assert commands and not any("bench" in c for c in commands)
    forbidden = {f"stages.{c}" for c in commands} | {"stages.bench"}
    for command in commands:
        found = set()
        for node in ast.walk(ast.parse((ROOT / "stages" / f"{command}.py").read_text())):
            if isinstance(node, ast.ImportFrom):
                module = ".".join(filter(None, ["stages" if node.level else None, node.module]))
                found.update([module] + [f"{module}.{a.name}" for a in node.names])
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        bad = sorted(n for n in found if any(n == f or n.startswith(f + ".") for f in forbidden))
        assert not bad, f"stages/{command}.py imports {', '.join(bad)}"
