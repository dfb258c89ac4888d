"""The house rules (../shared/STYLE.md, issue "One house, three floors"), checked on the import graph
read from the source (nothing is imported):

* no import cycle between ssl_vit modules;
* nothing outside ``apps/`` imports ``ssl_vit.apps`` (``__main__`` is the program's entry, like the
  console script, and is imported by nothing);
* ``models/``, ``losses/`` and ``eval/`` import neither Lightning nor the data code;
* no ssl_vit import hidden in a function;
* files stay under about 400 lines.
"""
import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ssl_vit"
MAX_LINES = 420


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> Dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(name: str, known: Set[str]) -> str:
    """The ssl_vit module an imported name lives in (``from a.b import c``: ``a.b.c`` if a module)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name


def imports(path: Path, known: Set[str]) -> Tuple[Set[str], List[Tuple[int, str]], Set[str]]:
    """(ssl_vit modules imported at module level, function-level ssl_vit imports, all top names)."""
    tree = ast.parse(path.read_text())
    top: Set[str] = set()
    local: List[Tuple[int, str]] = []
    external: Set[str] = set()

    def names(node: ast.AST) -> List[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            return [f"{node.module}.{a.name}" for a in node.names]
        return []

    for node in ast.walk(tree):
        for full in names(node):
            external.add(full.split(".")[0])
            if full.split(".")[0] != "ssl_vit":
                continue
            target = resolve(full, known)
            if node.col_offset == 0:
                top.add(target)
            else:
                local.append((node.lineno, target))
    return top, local, external


@pytest.fixture(scope="module")
def graph():
    mods = modules()
    known = set(mods)
    return mods, {name: imports(path, known) for name, path in mods.items()}


def test_no_import_cycle(graph):
    mods, info = graph
    edges = {name: {t for t in top if t != name} for name, (top, _, _) in info.items()}
    # importing a.b.c runs a/__init__ and a/b/__init__ first (the importer's own packages are already
    # running, so they add no edge)
    for name in list(edges):
        for target in list(edges[name]):
            parts = target.split(".")
            parents = {".".join(parts[:i]) for i in range(2, len(parts))}
            edges[name] |= {p for p in parents if p != name and not name.startswith(p + ".")}
    state: Dict[str, int] = {}
    path: List[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt in edges and not state.get(nxt):
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if not state.get(node):
            visit(node)


def test_nothing_below_the_apps_imports_them(graph):
    _, info = graph
    bad = [f"{name} imports {t}" for name, (top, local, _) in info.items()
           if not name.startswith("ssl_vit.apps") and name != "ssl_vit.__main__"
           for t in top | {t for _, t in local} if t.startswith("ssl_vit.apps")]
    assert not bad, bad


@pytest.mark.parametrize("floor", ["ssl_vit.models", "ssl_vit.losses", "ssl_vit.eval"])
def test_the_maths_imports_no_lightning_and_no_data_code(graph, floor):
    _, info = graph
    bad = []
    for name, (top, local, external) in info.items():
        if name == floor or name.startswith(floor + "."):
            bad += [f"{name} imports {e}" for e in external & {"pytorch_lightning", "lightning", "torchmetrics"}]
            bad += [f"{name} imports {t}" for t in top | {t for _, t in local} if t.startswith("ssl_vit.data")]
    assert not bad, bad


def test_no_ssl_vit_import_hides_in_a_function(graph):
    mods, info = graph
    bad = [f"{mods[name].relative_to(PACKAGE.parent)}:{line} imports {target}"
           for name, (_, local, _) in info.items() for line, target in local]
    assert not bad, bad


def test_files_stay_small():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files past {MAX_LINES} lines (split them): {long}"
