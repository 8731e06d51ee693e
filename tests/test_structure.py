"""The house rules that keep the layout legible: no import circles between the library's modules, and the library
never needs a benchmark or a research tool."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "pipeline"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the pipeline modules it imports (at any level: a function-local import counts too)."""
    mods = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = pkg.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                while t and t not in mods:
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t and t != mod and not mod.startswith(t + "."):  # a package's own __init__ is not a circle
                    graph[mod].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    out, state, stack = [], {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                out.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return out


def test_the_library_has_no_import_circles():
    found = cycles(import_graph())
    assert not found, "import circles: " + "; ".join(" -> ".join(c) for c in found)


def test_the_graph_sees_real_imports():
    g = import_graph()  # the check above is only worth something if edges are found
    assert "pipeline.archive" in g["pipeline.encode.job"] and "pipeline.encode.job" in g["pipeline.encode"] and "pipeline.storage" in g["pipeline.archive.shards"]


def _imported_names(path: Path) -> set[str]:
    """Absolute module names ``path`` imports, plus string literals passed to ``importlib.import_module``."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            out |= {a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)}
        elif isinstance(node, ast.Dict):  # e.g. JOB_COMMANDS: command -> module run by import_module
            out |= {v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str)
                    and v.value.startswith("jobs.")}
    return out


def test_the_library_never_imports_benchmarks_or_tools():
    """Benchmarks (jobs/bench) and tools (jobs/tools) are not installed: the library must not need them, except
    the one CLI command that runs the codec evaluation tool from a checkout (and says so when it is absent)."""
    allowed = {("pipeline/cli.py", "jobs.tools.codec_eval")}
    bad = []
    for p in sorted(PKG.rglob("*.py")):
        rel = str(p.relative_to(PKG.parent))
        for name in _imported_names(p):
            if name.startswith(("jobs.bench", "jobs.tools")) and (rel, name) not in allowed:
                bad.append(f"{rel} imports {name}")
    assert not bad, bad
    assert ("pipeline/cli.py", "jobs.tools.codec_eval") in {
        (str(p.relative_to(PKG.parent)), n) for p in [PKG / "cli.py"] for n in _imported_names(p)}  # the check sees it


def test_the_wheel_installs_the_library_alone():
    """No top-level ``jobs`` package in site-packages (a name that collides with anything): entrypoints,
    benchmarks and tools stay in the checkout; every package of the library is installed."""
    import tomllib
    cfg = tomllib.loads((PKG.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    from setuptools import find_packages
    found = find_packages(str(PKG.parent), include=cfg["include"], exclude=cfg.get("exclude", ()))
    assert not [f for f in found if f.split(".")[0] != "pipeline"], found
    library = {"pipeline", *("pipeline." + str(p.relative_to(PKG).parent).replace("/", ".")
                             for p in PKG.glob("*/**/__init__.py"))}
    assert library <= set(found), library - set(found)
