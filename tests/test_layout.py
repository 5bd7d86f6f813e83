"""The package's shape: every module imports on its own, no import cycle among mixres
modules (imports inside functions count: they only move a cycle to call time), and
files stay small enough to read."""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOT = REPO / "mixres"
MAX_LINES = 460  # "about 450": small files named for what they do

# Cycles still to be taken apart, each with where it is. Nothing
# else may be added here: a new cycle is a failure.
KNOWN_CYCLES: dict[frozenset, str] = {}
# Files over MAX_LINES still to be split.
KNOWN_LONG: dict[str, str] = {}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, modules: dict[str, Path], package: str) -> set[str]:
    """mixres modules imported anywhere in the file (module level, functions, classes).

    `from pkg import name` is an import of the module pkg.name where there is one, else
    of pkg itself."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            subs = {f"{base}.{a.name}" for a in node.names} & set(modules)
            found |= subs if len(subs) == len(node.names) else subs | {base}
    return {m for m in found if m in modules}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = _imports(path, modules, package) - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(frozenset(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_sees_function_level_imports(tmp_path):
    graph = {"a": {"b"}, "b": set(), "c": {"d"}, "d": {"c"}}
    assert _cycles(graph) == [frozenset({"c", "d"})]
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from mixres.packing import pack_into_bins\n")
    assert _imports(f, _modules(), "mixres") == {"mixres.packing"}


def test_no_import_cycle_counting_function_level_imports():
    graph = _graph()
    found = _cycles(graph)
    new = []
    for comp in found:
        if comp not in KNOWN_CYCLES:
            edges = [f"{a} -> {b}" for a in sorted(comp) for b in sorted(graph[a] & comp)]
            new.append("; ".join(edges))
    assert not new, "import cycles: " + " | ".join(new)
    # a known cycle that is gone must leave the list, so it cannot come back unnoticed
    gone = [sorted(c) for c in KNOWN_CYCLES if c not in found]
    assert not gone, f"remove from KNOWN_CYCLES, the cycle is gone: {gone}"


def test_every_module_imports_in_a_fresh_interpreter():
    names = [n for n in _modules() if n != "mixres.__main__"]
    code = f"import importlib\nfor n in {names!r}:\n    importlib.import_module(n)\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_files_are_small():
    files = [p for d in ("mixres", "tests", "benchmarks", "examples") for p in (REPO / d).rglob("*.py")]
    long = {rel: n for p in files
            if (n := len(p.read_text().splitlines())) > MAX_LINES
            and (rel := str(p.relative_to(REPO))) not in KNOWN_LONG}
    assert not long, f"files over {MAX_LINES} lines: {long}"
    fixed = [f for f in KNOWN_LONG if len((REPO / f).read_text().splitlines()) <= MAX_LINES]
    assert not fixed, f"remove from KNOWN_LONG, the file is short now: {fixed}"
