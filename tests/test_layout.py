"""The layout rules of DESIGN.md, checked on the source: no import circles, the worker never imports the driver,
one module builds S3 clients, files stay a size a newcomer can read. Imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "revcol")
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str) -> set[str]:
    """Project modules that ``name`` imports, anywhere in its source (``from a import b`` counts as ``a.b`` when
    that is a module, else ``a``)."""
    path = MODULES[name]
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {t for t in targets if t in MODULES and t != name}


GRAPH = {name: _imports(name) for name in MODULES}


def _reachable(start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for target in GRAPH[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_the_graph_sees_lazy_and_relative_imports() -> None:
    assert "pipeline.storage" in GRAPH["pipeline.data.stream.decode"]
    assert "pipeline.train.launch" in GRAPH["pipeline.stages"]  # imported inside a function


def test_no_import_circles() -> None:
    """A package's ``__init__`` re-exporting its own submodules is not a circle; anything else is."""
    circles = []
    for name in MODULES:
        for target in GRAPH[name]:
            if name in _reachable(target) and not (
                target.startswith(name + ".") or name.startswith(target + ".")
            ):
                circles.append(f"{name} -> {target}")
    assert not circles, circles


def test_the_worker_never_imports_the_driver() -> None:
    driver = {"pipeline.train.launch", "pipeline.stages", "pipeline.cli", "pipeline.demo", "pipeline.compare"}
    worker = _reachable("pipeline.train.loop") | {"pipeline.train.loop"}
    assert not {m for m in worker if any(m == d or m.startswith(d + ".") for d in driver)}


def test_revcol_imports_no_distributed_stack() -> None:
    for name, path in MODULES.items():
        if name.startswith("revcol"):
            tree = ast.parse(path.read_text())
            roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            roots |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
            assert not roots & {"ray", "deepspeed", "mlflow", "pipeline"}, name


def _builds_s3_clients(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] in ("boto3", "botocore") for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("boto3", "botocore"):
            return True
        if isinstance(node, (ast.Attribute, ast.Name)) and "S3FileSystem" in (getattr(node, "attr", None),
                                                                            getattr(node, "id", None)):
            return True
    return False


def test_one_module_builds_s3_clients() -> None:
    assert _builds_s3_clients(MODULES["pipeline.storage"])
    assert [name for name, path in MODULES.items() if _builds_s3_clients(path)] == ["pipeline.storage"]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_files_stay_readable(name: str) -> None:
    """At most ~600 lines, unless the module's docstring says why it is longer."""
    text = MODULES[name].read_text()
    lines = text.count("\n")
    if lines > MAX_LINES:
        doc = ast.get_docstring(ast.parse(text)) or ""
        assert "600 lines" in doc, f"{name}: {lines} lines and no reason in its docstring"


def test_help_imports_no_heavy_library() -> None:
    """``revcol --help`` and the modules a dry run needs load no torch, Ray, DeepSpeed or MLflow (4 s → 0.4 s)."""
    import subprocess
    import sys

    heavy = ("torch", "ray", "deepspeed", "mlflow")
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "pipeline", "--help"], capture_output=True,
                         text=True, check=True, cwd=ROOT)
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if "|" in line}
    assert "pipeline.cli" in imported and not imported & set(heavy)
    probe = ("import sys, pipeline.cli, pipeline.stages, pipeline.data.stream, pipeline.data.shards; "
             f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                          cwd=ROOT).stdout.strip() == "[]"
