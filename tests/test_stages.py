"""dvc.yaml against the code: every stage declares the params its code reads and depends on the
cbir modules it runs, so that `dvc repro` reruns a stage when either changes.

What a stage reads is found statically, over the modules its step imports (transitively): every
`settings.<section>.<key>`, every `<name>.<key>` where `<name> = settings.<section>`, a section
passed on whole (`settings.model`), and the Settings properties used (`settings.embed_resolution`
reads what the property's own body reads). It over-approximates (a module imported for one
function counts whole), never under-approximates what the stage's modules name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from cbir.config import Settings
from cbir.workspace import workspace_pipeline

REPO = Path(__file__).resolve().parent.parent
PIPELINE = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
SECTIONS = set(Settings.model_fields) - {"root", "params_path"}
#: Settings that are no pipeline params (orchestration: flows and the lock; data: paths, which
#: are the stages' deps and outs, not params; demo: only `cbir demo-data`).
NOT_PARAMS = {"orchestration", "data", "demo", "model.checkpoint"}
#: Modules that compute nothing a stage's outputs depend on (errors, progress, file helpers, the
#: layout of data/, the DuckDB views): no code dependency of any stage.
INFRASTRUCTURE = {"cbir", "cbir.config", "cbir.errors", "cbir.faults", "cbir.fsutil",
                  "cbir.progress", "cbir.safetext", "cbir.parallel", "cbir.paramsfile",
                  "cbir.store", "cbir.store.layout", "cbir.store.outputs", "cbir.store.tables",
                  "cbir.store.catalog", "cbir.environ", "cbir.lock"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in (REPO / "cbir").rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str) -> set[str]:
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    stack: list[ast.AST] = [ast.parse(path.read_text(encoding="utf-8"))]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) \
                and node.test.id == "TYPE_CHECKING":
            continue
        stack.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    out = set()
    for dep in found:
        while dep and dep not in MODULES:
            dep = dep.rpartition(".")[0]
        if dep and dep != name:
            out.add(dep)
    return out


def closure(name: str) -> set[str]:
    seen, todo = {name}, [name]
    while todo:
        for dep in _imports(todo.pop()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def _property_reads() -> dict[str, set[str]]:
    """What each Settings property reads (`self.<section>.<key>` in its body)."""
    tree = ast.parse(MODULES["cbir.config"].read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Settings")
    out: dict[str, set[str]] = {}
    uses: dict[str, set[str]] = {}  # property -> the properties its body uses
    for fn in cls.body:
        if isinstance(fn, ast.FunctionDef) and any(
                isinstance(d, ast.Name) and d.id == "property" for d in fn.decorator_list):
            out[fn.name] = {f"{n.value.attr}.{n.attr}" for n in ast.walk(fn)
                            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute)
                            and isinstance(n.value.value, ast.Name) and n.value.value.id == "self"
                            and n.value.attr in SECTIONS}
            uses[fn.name] = {n.attr for n in ast.walk(fn) if isinstance(n, ast.Attribute)
                             and isinstance(n.value, ast.Name) and n.value.id == "self"}
    for _ in out:  # through properties using properties
        for name in out:
            for other in uses[name] & set(out):
                out[name] |= out[other]
    return out


PROPERTIES = _property_reads()


def _settings_name(node: ast.AST) -> bool:
    return (isinstance(node, ast.Name) and node.id in {"settings", "s"}) or (
        isinstance(node, ast.Attribute) and node.attr == "settings")


def _field_or_section(section: str, key: str) -> str | None:
    """`section.key` for a field; the whole section for a method of it (`model_dump`)."""
    model = Settings.model_fields[section].annotation
    if key in model.model_fields:  # type: ignore[union-attr]
        return f"{section}.{key}"
    return section if key.startswith("model_") else None


def params_read(path: Path) -> set[str]:
    """`section.key` (or `section` when passed on whole) read through settings in one module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    reads: set[str] = set()
    parents: dict[ast.AST, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        alias: dict[str, str] = {}  # local name -> section
        for node in ast.walk(fn):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Attribute) \
                    and _settings_name(node.value.value) and node.value.attr in SECTIONS:
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        alias[target.id] = node.value.attr
        for node in ast.walk(fn):
            if not isinstance(node, ast.Attribute):
                continue
            found: str | None = None
            if _settings_name(node.value):
                if node.attr in PROPERTIES:
                    reads |= PROPERTIES[node.attr]
                elif node.attr in SECTIONS:
                    parent = parents.get(node)
                    if isinstance(parent, ast.Attribute) and parent.value is node:
                        found = _field_or_section(node.attr, parent.attr)
                    elif not (isinstance(parent, ast.Assign) and parent.value is node):
                        found = node.attr  # passed on whole
            elif isinstance(node.value, ast.Name) and node.value.id in alias:
                found = _field_or_section(alias[node.value.id], node.attr)
            if found:
                reads.add(found)
    return reads


def step_module(stage: str) -> str:
    name = f"cbir.steps.{stage}"
    assert name in MODULES, f"no module {name} for the stage {stage}"
    return name


def stage_reads(step: str) -> set[str]:
    reads: set[str] = set()
    for module in closure(step_module(step)):
        reads |= params_read(MODULES[module])
    return {r for r in reads if r not in NOT_PARAMS and r.split(".")[0] not in NOT_PARAMS}


def _covered(param: str, declared: list[str]) -> bool:
    """Declared as itself or within a declared section."""
    return any(param == d or param.startswith(d + ".") for d in declared)


#: Stages that record what people made (the reviewers' decisions): they read no param but the
#: path of what they record.
RECORDS = {"decisions"}


@pytest.mark.parametrize("stage", sorted(PIPELINE))
def test_each_stage_declares_every_param_its_code_reads(stage):
    declared = [p if isinstance(p, str) else next(iter(p)) for p in PIPELINE[stage]["params"]]
    reads = stage_reads(stage)
    assert reads or stage in RECORDS, f"{stage}: no params found (the analysis read nothing)"
    missing = sorted(p for p in reads if not _covered(p, declared))
    assert not missing, f"{stage} reads {missing} without declaring them in dvc.yaml"


@pytest.mark.parametrize("stage", sorted(PIPELINE))
def test_each_stage_depends_on_the_code_it_runs(stage):
    deps = [str(d) for d in PIPELINE[stage]["deps"]]
    missing = [d for d in deps if d.startswith("cbir/") and not (REPO / d).exists()]
    assert not missing, f"{stage} depends on {missing}, which do not exist"
    code = {m for m in closure(step_module(stage)) if m not in INFRASTRUCTURE}
    assert step_module(stage) in code
    for module in sorted(code):
        path = MODULES[module].relative_to(REPO).as_posix()
        assert any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps), \
            f"{stage} runs {path} but dvc.yaml does not list it among its deps"


def test_the_analysis_finds_what_a_stage_is_known_to_read():
    """The issue's example: training decodes the scans (ingest.max_pixels, ingest.workers) and
    fingerprints the retrieval preprocessing (embed.scales)."""
    reads = stage_reads("train")
    assert {"embed.scales", "ingest.max_pixels", "ingest.workers"} <= reads
    assert "index.rebuild_factor" in stage_reads("index")


def test_a_workspace_pipeline_has_no_code_deps():
    """A workspace made by `cbir init` has no cbir/ source folder: its copy of the pipeline
    drops the code deps and keeps everything else."""
    text = (REPO / "dvc.yaml").read_text(encoding="utf-8")
    ours = yaml.safe_load(workspace_pipeline(text))["stages"]
    assert sorted(ours) == sorted(PIPELINE)
    for name, stage in ours.items():
        deps = stage.get("deps") or []  # a stage whose deps are all code has none left
        assert not [d for d in deps if str(d).startswith("cbir/")], name
        assert stage["params"] == PIPELINE[name]["params"]
        code = [d for d in PIPELINE[name]["deps"] if str(d).startswith("cbir/")]
        assert code and len(deps) == len(PIPELINE[name]["deps"]) - len(code)
        assert "deps" in stage or name in RECORDS, name
