"""The typed recipe schema: YAML in, validated objects out, errors that name the key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import Recipe, RecipeError, apply_overrides, load_recipe, parse_recipe

BASE = {
    "name": "unit",
    "storage_path": "/tmp/runs",
    "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
    "stages": [
        {"kind": "pretrain", "data": {"train": "shards/pre"}, "model": {"name": "revcol_test", "intersup": True}},
        {
            "kind": "finetune",
            "data": {"train": "shards/ft", "val": "shards/val"},
            "init_from": "pretrain",
            "optim": {"base_lr": 1e-4, "layer_decay": 0.9},
        },
        {"kind": "eval", "data": {"val": "shards/val"}, "init_from": "finetune"},
    ],
}


def _error(raw, overrides=()):
    with pytest.raises(RecipeError) as err:
        parse_recipe(raw, overrides)
    return str(err.value)


def test_valid_recipe_gives_typed_objects_with_defaults():
    recipe = parse_recipe(BASE)
    assert isinstance(recipe, Recipe)
    assert [s.name for s in recipe.stages] == ["pretrain", "finetune", "eval"]
    ft = recipe.stage("finetune")
    assert ft.optim.base_lr == 1e-4 and ft.optim.layer_decay == 0.9
    assert ft.deepspeed.zero_stage == 0 and ft.regularize.label_smoothing == 0.1
    assert recipe.scaling.cpus_per_worker == 0.5 and recipe.tracking.uri == f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def test_load_from_yaml_file_with_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(BASE))
    recipe = load_recipe(
        path,
        ["scaling.num_workers=4", "stages.finetune.optim.base_lr=5e-5", "stages.0.deepspeed.zero_stage=3", "tracking.uri=http://127.0.0.1:5000"],
    )
    assert recipe.scaling.num_workers == 4
    assert recipe.stage("finetune").optim.base_lr == 5e-5
    assert recipe.stage("pretrain").deepspeed.zero_stage == 3
    assert recipe.tracking.uri == "http://127.0.0.1:5000"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("scaling.num_wrkers=3", "scaling.num_wrkers: unknown key"),
        ("stages.0.deepspeed.zero_stage=4", "stages.0.deepspeed.zero_stage: Input should be 0, 1, 2 or 3 (got 4)"),
        ("stages.1.deepspeed.precision=fp8", "'fp32', 'bf16' or 'fp16' (got 'fp8')"),
        ("stages.0.model.name=revcol_giant", "unknown model 'revcol_giant'; allowed: revcol_tiny"),
        ("stages.0.model.overrides={widths: [1]}", "unknown override(s) ['widths']"),
        ("stages.0.kind=distill", "stages.0.kind: Input should be 'pretrain', 'finetune' or 'eval'"),
        ("scaling.num_workers=0", "scaling.num_workers: Value error, must be a number of workers >= 1, or a range "
                                  "'min..max' (or [min, max]) with 1 <= min <= max (got 0)"),
        ("stages.0.optim.betas=[0.9, 1.5]", "betas must lie in [0, 1)"),
        ("stages.0.deepspeed.offload_param=cpu", "offload_param='cpu' needs zero_stage: 3"),
        ("stages.2.init_from=pretrian", "'pretrian' is neither an earlier stage"),
        ("stages.1.name=pretrain", "duplicate stage name 'pretrain'"),
        ("name=has space", "name 'has space' may only hold"),
    ],
)
def test_bad_values_are_named(override, expected):
    assert expected in _error(BASE, [override])


@pytest.mark.parametrize(("value", "parsed"), [("1..2", (1, 2)), ("[2, 8]", (2, 8)), ("3..3", 3), ("4", 4)])
def test_num_workers_is_a_count_or_an_elastic_range(value, parsed):
    from pipeline.placement import Placement
    from pipeline.train.launch import scaling_config

    scaling = parse_recipe(BASE, [f"scaling.num_workers={value}"]).scaling
    low, high = parsed if isinstance(parsed, tuple) else (parsed, parsed)
    assert (scaling.num_workers, scaling.min_workers, scaling.max_workers) == (parsed, low, high)
    assert scaling.elastic == isinstance(parsed, tuple)
    again = Recipe.model_validate(parse_recipe(BASE, [f"scaling.num_workers={value}"]).model_dump(mode="json"))
    assert again.scaling.num_workers == parsed  # as the workers rebuild it from JSON
    ray_scaling = scaling_config(parse_recipe(BASE, [f"scaling.num_workers={value}"]),
                                 Placement(train_selector=None, data_selector=None, data_cpus=1.0))
    assert ray_scaling.num_workers == parsed and ray_scaling.elasticity_enabled == scaling.elastic


@pytest.mark.parametrize("value", ["2..1", "0..2", "[1, 2, 3]", "1..", "many", "true", "[1.5, 2]"])
def test_bad_num_workers_ranges_are_named(value):
    assert ("scaling.num_workers: Value error, must be a number of workers >= 1, or a range 'min..max' (or "
            "[min, max]) with 1 <= min <= max") in _error(BASE, [f"scaling.num_workers={value}"])


def test_missing_required_and_empty_stages():
    assert "name: Field required" in _error({"stages": BASE["stages"]})
    assert "stages: List should have at least 1 item" in _error({"name": "x", "stages": []})
    assert "a pretrain stage needs data.train" in _error({"name": "x", "stages": [{"kind": "pretrain"}]})
    assert "recipe must be a mapping" in _error(["not", "a", "mapping"])


def test_all_errors_reported_at_once():
    msg = _error(BASE, ["scaling.bogus=1", "stages.0.optim.base_lr=-1"])
    assert "scaling.bogus: unknown key" in msg and "stages.0.optim.base_lr" in msg


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("noequals", "is not of the form key.sub=value"),
        ("stages.7.optim.base_lr=1", "index 7 out of range"),
        ("stages.distill.optim.base_lr=1", "no item named 'distill'"),
        ("name.sub=1", "name is a value, not a section"),
    ],
)
def test_bad_overrides_are_named(override, expected):
    with pytest.raises(RecipeError) as err:
        apply_overrides(BASE, [override])
    assert expected in str(err.value)


def test_overrides_do_not_mutate_input():
    apply_overrides(BASE, ["scaling.num_workers=9"])
    assert BASE["scaling"]["num_workers"] == 2


def test_cli_dry_run_validates_and_exits_2_on_bad_recipe(tmp_path):
    from pipeline.data.shards import write_shards

    shards = str(tmp_path / "shards")
    write_shards("digits", shards, shard_size=500, split="test", progress=False)
    real = apply_overrides(BASE, [f"stages.{i}.data.{split}={shards}" for i, split in
                                  ((0, "train"), (1, "train"), (1, "val"), (2, "val"))])
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(yaml.safe_dump(real))
    bad.write_text(yaml.safe_dump({**BASE, "scaling": {"num_workerz": 1}}))
    cmd = [sys.executable, "-m", "pipeline", "run", "--dry-run", "--json"]
    ok = subprocess.run([*cmd, str(good)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    plan = json.loads(ok.stdout.strip().splitlines()[-1])
    assert plan["valid"] and [s["train_samples"] for s in plan["stages"][:2]] == [359, 359]
    missing = tmp_path / "missing.yaml"
    missing.write_text(yaml.safe_dump(apply_overrides(real, [f"stages.0.data.train={tmp_path}/nowhere"])))
    nowhere = subprocess.run([*cmd, str(missing)], capture_output=True, text=True, timeout=120)
    assert nowhere.returncode == 2 and "nowhere" in nowhere.stderr
    fail = subprocess.run([*cmd, str(bad)], capture_output=True, text=True, timeout=120)
    assert fail.returncode == 2
    assert "scaling.num_workerz: unknown key" in fail.stderr
    missing = subprocess.run([*cmd, str(tmp_path / "nope.yaml")], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_recipe_reference_is_generated_from_the_schema():
    from pathlib import Path

    from pipeline.config import reference_markdown

    doc = Path(__file__).parent.parent / "docs" / "recipe-reference.md"
    assert doc.read_text() == reference_markdown(), "run: python -m pipeline.config > docs/recipe-reference.md"
    for section in ("`recipe`", "`stages[]`", "`stages[].optim`", "`stages[].deepspeed`", "`scaling`"):
        assert f"## {section}" in doc.read_text()
