"""The layering of the repository's packages: which package may import which, and no import cycle between them.

Every ``.py`` file under ``data_loader/``, ``model/``, ``photos/``, ``trainer/`` and ``utils/`` is parsed with
``ast``; each import of another top-level name of the repository (a package, ``benchmarks``, ``tests`` or a top-level
script such as ``train.py``) is an edge ``importer -> imported``. Imports inside functions count, and so do
``importlib.import_module`` and ``__import__`` calls with a literal name; relative imports stay inside their package.
The intended layers: ``utils`` at the bottom imports no other package; ``data_loader`` and ``model`` build on
``utils``; ``trainer`` on all three; ``photos`` (raw photos to identities) on all four. A failure names each offending
import by file, line and module.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("data_loader", "model", "photos", "trainer", "utils")
ALLOWED_EDGES = frozenset(
    {
        ("data_loader", "utils"),
        ("model", "utils"),
        ("photos", "data_loader"),
        ("photos", "model"),
        ("photos", "trainer"),
        ("photos", "utils"),
        ("trainer", "data_loader"),
        ("trainer", "model"),
        ("trainer", "utils"),
    }
)
_IMPORT_FUNCTIONS = ("import_module", "__import__")


@dataclass(frozen=True)
class Import:
    """One import of another top-level name of the repository."""

    file: str  # relative to the repository root
    line: int
    module: str
    importer: str
    imported: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line} imports {self.module} ({self.importer} -> {self.imported})"


def repository_names(root: Path) -> set[str]:
    """Top-level names of the repository's own code: folders holding .py files and the top-level modules."""
    folders = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and any(p.glob("*.py"))}
    return folders | {p.stem for p in root.glob("*.py")}


def _imported_modules(node: ast.AST) -> list[str]:
    """Absolute module names an AST node imports (relative imports and dynamic names give none)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        return [node.module] if node.level == 0 and node.module else []
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name in _IMPORT_FUNCTIONS and isinstance(node.args[0].value, str):
            return [node.args[0].value]
    return []


def package_imports(root: Path, packages: Sequence[str]) -> list[Import]:
    """Every import, in the files of `packages` under `root`, of another top-level name of the repository.

    Args:
        root: repository root.
        packages: the package folders to scan.

    Returns:
        The imports, in file and line order.
    """
    names = repository_names(root)
    found = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                for module in _imported_modules(node):
                    top = module.split(".")[0]
                    if top in names and top != package:
                        found.append(Import(path.relative_to(root).as_posix(), node.lineno, module, package, top))
    return sorted(found, key=lambda imp: (imp.file, imp.line, imp.module))


def find_cycle(edges: Iterable[tuple[str, str]]) -> list[str] | None:
    """A cycle of the directed graph `edges` as its nodes, first node repeated at the end, or None if acyclic."""
    graph: dict[str, list[str]] = {}
    for source, target in sorted(set(edges)):
        graph.setdefault(source, []).append(target)
    state: dict[str, str] = {}  # "open" while on the DFS stack, "done" after

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in graph.get(node, []):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def layering_violations(imports: Sequence[Import], allowed: frozenset[tuple[str, str]]) -> list[str]:
    """Messages for the imports whose package edge is not in `allowed`, then one for a cycle of the import graph."""
    messages = [str(imp) for imp in imports if (imp.importer, imp.imported) not in allowed]
    cycle = find_cycle((imp.importer, imp.imported) for imp in imports)
    if cycle:
        witnesses = [
            next(str(imp) for imp in imports if (imp.importer, imp.imported) == edge) for edge in zip(cycle, cycle[1:])
        ]
        messages.append("import cycle " + " -> ".join(cycle) + ":\n    " + "\n    ".join(witnesses))
    return messages


def test_utils_imports_no_other_package_of_the_repository():
    offenders = [str(imp) for imp in package_imports(REPO_ROOT, ["utils"])]
    assert offenders == [], "utils must import only utils:\n" + "\n".join(offenders)


def test_packages_import_only_along_the_allowed_edges_and_without_cycles():
    assert find_cycle(ALLOWED_EDGES) is None
    imports = package_imports(REPO_ROOT, PACKAGES)
    assert {(imp.importer, imp.imported) for imp in imports} >= {("trainer", "model"), ("data_loader", "utils")}
    violations = layering_violations(imports, ALLOWED_EDGES)
    assert violations == [], "imports outside the layering (tests/test_layering.py):\n" + "\n".join(violations)


def test_a_wrong_edge_and_a_cycle_are_reported_with_file_and_module(tmp_path):
    for package, body in {
        "low": "import json\nfrom high.api import run\n",
        "high": "def f():\n    import low.core\n",
        "mid": "import importlib\nimportlib.import_module('script')\nfrom . import sibling\n",
    }.items():
        (tmp_path / package).mkdir()
        (tmp_path / package / "core.py").write_text(body)
    (tmp_path / "script.py").write_text("")
    imports = package_imports(tmp_path, ["low", "high", "mid"])
    assert [str(imp) for imp in imports] == [
        "high/core.py:2 imports low.core (high -> low)",
        "low/core.py:2 imports high.api (low -> high)",
        "mid/core.py:2 imports script (mid -> script)",
    ]
    violations = layering_violations(imports, frozenset({("high", "low")}))
    assert violations[:2] == [
        "low/core.py:2 imports high.api (low -> high)",
        "mid/core.py:2 imports script (mid -> script)",
    ]
    assert violations[2].startswith("import cycle high -> low -> high:")
    assert "high/core.py:2 imports low.core" in violations[2] and "low/core.py:2 imports high.api" in violations[2]
