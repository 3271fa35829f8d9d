"""The library's modules import each other one way: no circle, even through type-only or in-function imports."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def source(module: str) -> Path:
    """The file of a `replaykd` module: the library (`replaykd.x`) lies in pipeline/, the commands
    (`replaykd.stages.x`) in stages/."""
    parts = module.split(".")[1:]
    folder = ROOT / "stages" if parts[:1] == ["stages"] else ROOT / "pipeline"
    return folder.joinpath(*parts[1 if parts[:1] == ["stages"] else 0:]).with_suffix(".py")


def imports(path: Path) -> set[str]:
    """Every `replaykd` module a file imports, wherever the import stands (top level, under TYPE_CHECKING, inside a
    function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] == "replaykd" and source(n).exists())
    return found


def test_pipeline_modules_form_no_import_circle_and_never_import_the_stages():
    # __main__ is the command line's entry point, `python -m replaykd`
    graph = {f"replaykd.{p.stem}": imports(p) for p in (ROOT / "pipeline").glob("*.py")
             if p.stem not in ("__init__", "__main__")}
    assert graph and not any(m.startswith("replaykd.stages") for deps in graph.values() for m in deps)
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
    code = "import sys, replaykd.stages.cache_info; print(sorted({'torch', 'timm'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_command_imports_another_command_or_the_benchmarks():
    # stages/*.py are the commands (their options module and the CLI that derives them aside); the benchmarks,
    # which run commands to measure them, live in stages/bench/
    shared = {"__init__", "__main__", "cli", "options"}
    commands = sorted(p.stem for p in (ROOT / "stages").glob("*.py") if p.stem not in shared)
    assert commands and not any("bench" in c for c in commands)
    forbidden = {f"replaykd.stages.{c}" for c in commands} | {"replaykd.stages.bench"}
    for command in commands:
        found = set()
        for node in ast.walk(ast.parse((ROOT / "stages" / f"{command}.py").read_text())):
            if isinstance(node, ast.ImportFrom):
                module = ".".join(filter(None, ["replaykd.stages" if node.level else None, node.module]))
                found.update([module] + [f"{module}.{a.name}" for a in node.names])
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        bad = sorted(n for n in found if any(n == f or n.startswith(f + ".") for f in forbidden))
        assert not bad, f"stages/{command}.py imports {', '.join(bad)}"


def test_no_code_imports_the_folders_by_their_own_names():
    # installed, pipeline/ is `replaykd` and stages/ is `replaykd.stages`: a top-level `pipeline` or `stages` would be
    # some other package's (both names are taken on PyPI), or the repository's folder read a second time
    files = [p for folder in ("pipeline", "stages", "tests", "examples", "docs") for p in (ROOT / folder).rglob("*.py")]
    bad = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            bad += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in ("pipeline", "stages")]
    assert len(files) > 50 and not bad, bad
    # nor any command line, code snippet or page: `python -m replaykd`, `from replaykd...`
    texts = [*ROOT.glob("*.md"), ROOT / "Makefile", *(ROOT / "docs").rglob("*.md"),
             *(p for p in files if p != Path(__file__))]  # this file names what it looks for
    stale = re.compile(r"-m stages\b|(?<![\w.])(from|import) (pipeline|stages)\b")
    bad = [f"{p.relative_to(ROOT)}:{n}" for p in texts for n, line in enumerate(p.read_text().splitlines(), 1)
           if stale.search(line)]
    assert not bad, bad
