"""The ``revcol`` command line imports heavy libraries only inside the command that needs them (DESIGN.md).

* ``--help`` of ``revcol`` and of every subcommand loads none of torch, Ray, DeepSpeed, MLflow or matplotlib;
* ``revcol run --dry-run`` loads no Ray, DeepSpeed or MLflow (torch, through the model registry, validates the
  recipe's model names);
* ``pipeline.plan`` and ``pipeline.compare`` build their parsers without torch; planning loads torch, not Ray;
* nothing in ``pipeline/`` imports the CLI module (the JSON output helper lives in ``pipeline/output.py``).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "ray", "deepspeed", "mlflow", "matplotlib"}


def _imported(*args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Runs ``python -X importtime -m pipeline ARGS``; returns the process and every module it imported."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "pipeline", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    modules = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "pipeline.cli" in modules, proc.stderr[-2000:]
    return proc, modules


@pytest.mark.parametrize("command", [[], ["demo"], ["shards", "write"], ["shards", "verify"], ["run"], ["plan"],
                                     ["compare"], ["eval"]], ids=lambda c: " ".join(c) or "revcol")
def test_help_imports_no_heavy_library(command: list[str]) -> None:
    proc, modules = _imported(*command, "--help")
    assert proc.returncode == 0 and "usage: revcol" in proc.stdout
    assert not modules & HEAVY, sorted(modules & HEAVY)


def test_dry_run_imports_no_ray_deepspeed_or_mlflow(tmp_path: Path) -> None:
    from pipeline.data.shards import write_shards

    shards = tmp_path / "shards"
    write_shards("digits", str(shards), shard_size=500, split="test", progress=False)
    proc, modules = _imported(
        "run", "jobs/demo_digits.yaml", "--dry-run", "--json", "--stages", "pretrain",
        "--set", f"stages.pretrain.data.train={shards}", "--set", f"storage_path={tmp_path / 'storage'}",
        "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = json.loads(proc.stdout.strip().splitlines()[-1])
    assert plan["valid"] and [s["stage"] for s in plan["stages"]] == ["pretrain"]
    assert not modules & {"ray", "deepspeed", "mlflow"}, sorted(modules & {"ray", "deepspeed", "mlflow"})


def test_plan_and_compare_build_their_parsers_without_torch() -> None:
    probe = (
        "import argparse, sys, pipeline.plan, pipeline.compare\n"
        "sub = argparse.ArgumentParser().add_subparsers()\n"
        "pipeline.plan.add_parser(sub); pipeline.compare.add_parser(sub)\n"
        f"print(sorted(m for m in {sorted(HEAVY)!r} if m in sys.modules))\n"
        "pipeline.plan.plan_recipe\n"
        f"print(sorted(m for m in {sorted(HEAVY)!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=True).stdout.splitlines()
    assert out == ["[]", "['torch']"]


def test_nothing_in_pipeline_imports_the_cli() -> None:
    importers = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        if path.name == "__main__.py" and path.parent.name == "pipeline":
            continue  # `python -m pipeline` is the CLI
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            if any(n == "pipeline.cli" or n.startswith("pipeline.cli.") for n in names):
                importers.append(str(path.relative_to(ROOT)))
    assert not importers, importers
