"""The package's shape: no import cycles, modules of readable size, design references that resolve."""
import ast
import os
import re
from pathlib import Path

from conftest import ROOT

PACKAGES = ("fedml_feddpd", "baselines", "benchmarks")
# baselines/ installs as fedml_feddpd.baselines (setup.py package_dir)
INSTALLED_AS = {"baselines": ("fedml_feddpd", "baselines")}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    parts = list(INSTALLED_AS.get(parts[0], parts[:1])) + parts[1:]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module of ours that `path` imports, at any depth (function-level imports count too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub` imports the submodule when one exists
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t.split(".")[0] in ("fedml_feddpd", "benchmarks")}
    return found


def graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in Path(ROOT, pkg).rglob("*.py")]
    modules = {module_name(p): p for p in files}
    edges = {}
    for mod, path in modules.items():
        # an edge to a package's __init__ only when it is imported as such; never to the module itself
        edges[mod] = {t for t in imports_of(path) if t in modules and t != mod and not mod.startswith(t + ".")}
    return edges


def find_cycle(edges: dict[str, set[str]]):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_graph_sees_relative_and_function_level_imports():
    edges = graph()
    assert "fedml_feddpd.errors" in edges["fedml_feddpd.config"]
    assert "fedml_feddpd.distributed.mpi" in edges["fedml_feddpd.distributed"]  # imported inside a function


def test_modules_stay_readable():
    too_long = {str(p.relative_to(ROOT)): n for pkg in PACKAGES for p in Path(ROOT, pkg).rglob("*.py")
                if (n := len(p.read_text().splitlines())) > 320}
    assert not too_long, f"modules over ~300 lines: {too_long}"


def test_benchmarks_are_a_package_without_path_edits():
    """benchmarks/ runs as `python -m benchmarks.<name>` from the repository root: no script edits sys.path."""
    edits = [str(p.relative_to(ROOT)) for p in Path(ROOT, "benchmarks").rglob("*.py") if "sys.path" in p.read_text()]
    assert not edits, f"sys.path edits: {edits}"
    assert Path(ROOT, "benchmarks", "__init__.py").is_file() and Path(ROOT, "benchmarks", "studies", "__init__.py").is_file()
    assert "benchmarks.studies.defaults" in graph()  # the cycle and size checks above cover benchmarks/ too


def test_design_references_point_into_the_repository():
    """Comments cite docs/DESIGN.md (in the repo), never a design file outside it."""
    bad = []
    for pkg in PACKAGES + ("tests",):
        for p in Path(ROOT, pkg).rglob("*.py"):
            for i, line in enumerate(p.read_text().splitlines(), 1):
                if re.search(r"(?<!docs/)DESIGN\.md|FIELD-NOTES", line) and p.name != "test_structure.py":
                    bad.append(f"{p.relative_to(ROOT)}:{i}")
    assert not bad, "references to design notes outside the repository: " + ", ".join(bad)
    assert os.path.isfile(os.path.join(ROOT, "docs", "DESIGN.md"))
