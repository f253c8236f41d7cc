"""The layering of ARCHITECTURE.md, checked on the source: no import cycle, imports only go down
(kernels < data layer < steps < top), no Prefect in the library, and only the data layer knows
where outputs live under data/."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("cbir", "tasks", "flows")
#: The top of the library: they compose steps (find-duplicates, init) or parse arguments.
TOP = {"cbir.cli", "cbir.find", "cbir.workspace"}
#: Packages at the top too: the review server (it reads the catalogue, calibration and writes
#: decisions for `cbir review`).
TOP_PACKAGES = ("cbir.review",)
#: What loads and checks the settings of a workspace, and keeps its state: above the data layer
#: (loading params checks every output path; the lock and the caches live in the data folder).
SETTINGS = {"cbir.config", "cbir.paramsfile", "cbir.environ", "cbir.lock"}
#: Where one step consumes another's computation (the only imports between steps).
STEP_USES = {
    "cbir.steps.query": {"cbir.steps.calibrate", "cbir.steps.embed"},
    "cbir.steps.evaluate": {"cbir.steps.embed"},
    "cbir.steps.index": {"cbir.steps.index_dask"},
    "cbir.steps.calibrate": {"cbir.steps.embed", "cbir.steps.evaluate"},
    "cbir.steps.pairs": {"cbir.steps.calibrate", "cbir.steps.pairs_dask"},
    "cbir.steps.report": {"cbir.steps.calibrate", "cbir.steps.evaluate"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _not_run(node: ast.AST) -> bool:
    """`if __name__ == "__main__":` (a script's entry point) and `if TYPE_CHECKING:` (for the
    type checker): imports there are no dependency of the module."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
        and test.left.id == "__name__")


def _imports(name: str, path: Path) -> set[str]:
    """The project modules `name` imports, at the top or inside functions."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if _not_run(node):
            continue
        stack.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)
    out = set()
    for dep in found:
        while dep and dep not in MODULES:
            dep = dep.rpartition(".")[0]
        if dep and dep != name:
            out.add(dep)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _step(name: str) -> str:
    """The step a module belongs to (`cbir.steps.report.pages` -> `cbir.steps.report`)."""
    return ".".join(name.split(".")[:3])


def _kind(name: str) -> str:
    if name in TOP or name.startswith(TOP_PACKAGES):
        return "top"
    if name in SETTINGS:
        return "settings"
    if name.startswith("cbir.steps"):
        return "step"
    if name.startswith("cbir.store"):
        return "store"
    if name.startswith("cbir"):
        return "kernel"
    return name.split(".")[0]  # tasks, flows


def layers() -> dict[str, int]:
    """Each module's depth in the import graph (0: imports no project module)."""
    depth: dict[str, int] = {}

    def visit(name: str, path: tuple[str, ...]) -> int:
        if name in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(name):] + (name,)))
        if name not in depth:
            depth[name] = 1 + max((visit(d, path + (name,)) for d in GRAPH[name]), default=-1)
        return depth[name]

    for name in GRAPH:
        visit(name, ())
    return depth


def test_the_import_graph_has_no_cycle():
    assert max(layers().values()) >= 3  # the check walks a real graph


RANK = {"kernel": 0, "store": 1, "settings": 2, "step": 3, "top": 4, "tasks": 5, "flows": 6}


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_imports_only_go_down(name):
    for dep in GRAPH[name]:
        if name == "cbir.cli" and _kind(dep) == "flows":
            continue  # `cbir build`/`nightly`/`serve` start the flows
        if _kind(name) == _kind(dep) == "step":
            step, other = _step(name), _step(dep)  # a step may be a package of modules
            assert step == other or other in STEP_USES.get(step, set()), \
                f"{name} imports the step {dep}"
            continue
        if _kind(name) == _kind(dep) == "kernel" or _kind(name) == _kind(dep):
            continue
        assert RANK[_kind(dep)] < RANK[_kind(name)], f"{name} ({_kind(name)}) imports {dep}"


def test_the_library_does_not_import_prefect():
    for name, path in MODULES.items():
        if name.startswith("cbir"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    mods = [a.name for a in node.names] if isinstance(node, ast.Import) \
                        else [node.module or ""]
                    assert not any(m.split(".")[0] == "prefect" for m in mods), name


def test_only_the_data_layer_names_where_outputs_live():
    """`<settings>.data.<output>` is read only in cbir/store/ (scans, ground truth and the demo's
    folder are inputs, read where the user put them)."""
    outputs = {"manifest_dir", "embeddings_dir", "index_dir", "models_dir", "pairs_dir",
               "reports_dir", "cache_dir", "catalog"}
    for name, path in MODULES.items():
        if name.startswith("cbir.store") or name == "cbir.config":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Attribute) and node.attr in outputs
                    and isinstance(node.value, ast.Attribute) and node.value.attr == "data"):
                raise AssertionError(f"{name}:{node.lineno} reads data.{node.attr}")
