"""Every recipe in ``jobs/`` parses; the paper recipes carry the official hyperparameters and fit their cluster.

The expected values are read from ``tests/assets/official_recipes.md`` (the release's configs, copied from the
project's shared fixtures so that a clone alone runs the tests): its table gives each official config's
hyperparameters, its prose the shared ones and the blanks' meaning (clip grad 10.0 where blank, 0.0 means none; EMA decay where MODEL_EMA is True; NUM_CLASSES 1000 where
blank; AdamW eps/betas and the cosine schedule; batch 128 per GPU on 8 GPUs, 64 at 384 px). This file only says
which official config each recipe stage carries (``OFFICIAL``) and names the project's own choices beside them.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import Recipe, load_recipe

JOBS = Path(__file__).resolve().parents[1] / "jobs"
RECIPES = sorted(JOBS.glob("*.yaml"))
FIXTURE = Path(__file__).resolve().parent / "assets" / "official_recipes.md"

# recipe -> stage -> the official config (a row of the fixture's table) the stage carries
OFFICIAL = {
    "revcol_t_1k": {"pretrain": "revcol_tiny_1k"},
    "revcol_s_1k": {"pretrain": "revcol_small_1k"},
    "revcol_b_1k": {"pretrain": "revcol_base_1k"},
    "revcol_b_22k_1k": {"pretrain_22k": "revcol_base_22k_pretrain", "finetune_224": "revcol_base_1k_224_finetune",
                        "finetune_384": "revcol_base_1k_384_finetune"},
    "revcol_l_22k_1k": {"pretrain_22k": "revcol_large_22k_pretrain", "finetune_224": "revcol_large_1k_224_finetune",
                        "finetune_384": "revcol_large_1k_384_finetune"},
    "revcol_xl_22k_1k": {"pretrain_22k": "revcol_xlarge_22k_pretrain",
                         "finetune_384": "revcol_xlarge_1k_384_finetune"},
    # RevCol-H's private 168M-image pretrain is replaced by the largest public 22K recipe (the fixture's note).
    "revcol_h_224_640": {"pretrain_224": "revcol_xlarge_22k_pretrain", "finetune_640": "revcol_huge_1k_640_finetune"},
}
PAPER = list(OFFICIAL)
# The project's choices on top of the official values (not in the fixture): the stand-in pretrain builds RevCol-H,
# RevCol-H trains under ZeRO-3 in bf16 and reaches the official batch at 640 px by accumulation (32 x 4 per GPU);
# finetunes start from their recipe's pretrain.
PROJECT: dict[tuple[str, str], dict[str, Any]] = {
    ("revcol_h_224_640", "pretrain_224"): {"model.name": "revcol_huge", "deepspeed.zero_stage": 3,
                                           "deepspeed.precision": "bf16"},
    ("revcol_h_224_640", "finetune_640"): {"deepspeed.zero_stage": 3, "deepspeed.precision": "bf16",
                                           "init_from": "pretrain_224", "data.batch_size": 32,
                                           "deepspeed.grad_accum": 4},
    **{(name, stage): {"init_from": "pretrain_22k"}
       for name in ("revcol_b_22k_1k", "revcol_l_22k_1k", "revcol_xl_22k_1k")
       for stage in OFFICIAL[name] if stage.startswith("finetune")},
}


# ------------------------------------------------------------------------------------------- the fixture, parsed
def _prose(text: str, pattern: str) -> tuple[str, ...]:
    found = re.search(pattern, text)
    assert found, f"{FIXTURE}: no sentence matching {pattern!r}"
    return found.groups()


@functools.cache
def _fixture() -> dict[str, Any]:
    """``{"shared": {key: value}, "gpus": n, "per_gpu_batch": {image size or "default": batch}, "configs":
    {name: {key: value}}}`` from the fixture, keys in recipe terms (``optim.base_lr``)."""
    text = FIXTURE.read_text()
    eps, beta1, beta2, schedule = _prose(text, r"AdamW, eps ([\d.e+-]+), betas \(([\d.]+), ([\d.]+)\); (\w+) schedule")
    (clip,) = _prose(text, r"gradient clipping ([\d.]+) where the\s+table is blank")
    (classes,) = _prose(text, r"Empty NUM_CLASSES = (\d+)")
    (ema,) = _prose(text, r"EMA decay ([\d.]+) where MODEL_EMA is True")
    per_gpu, gpus, global_batch, per_gpu_384 = map(int, _prose(
        text, r"Batch (\d+) per GPU on (\d+) GPUs \(global (\d+); 384-px finetunes use (\d+) per GPU\)"))
    assert per_gpu * gpus == global_batch
    blank = {"model.num_classes": int(classes), "deepspeed.grad_clip": float(clip), "optim.layer_decay": None,
             "model.head_init_scale": None}
    rows = [line.strip().strip("|").split("|") for line in text.splitlines() if line.startswith("|")]
    header, body = [c.strip() for c in rows[0]], [[c.strip() for c in r] for r in rows[2:]]  # rows[1]: |---|
    assert header[0] == "config" and set(header[1:]) == set(_COLUMNS), header
    configs = {}
    for row in body:
        values = {}
        for column, cell in zip(header[1:], row[1:], strict=True):
            key, parse = _COLUMNS[column]
            values[key] = blank[key] if cell == "" else parse(cell)
        values["regularize.ema_decay"] = float(ema) if values.pop("MODEL_EMA") else None
        configs[row[0]] = values
    return {
        "shared": {"optim.eps": float(eps), "optim.betas": (float(beta1), float(beta2)), "optim.schedule": schedule},
        "gpus": gpus,
        "per_gpu_batch": {"default": per_gpu, 384: per_gpu_384},
        "configs": configs,
    }


def _bool(cell: str) -> bool:
    assert cell in ("True", "False"), cell
    return cell == "True"


_COLUMNS: dict[str, tuple[str, Any]] = {  # fixture column -> (recipe key, parser of a non-blank cell)
    "MODEL.TYPE": ("model.name", str),
    "DATA.IMG_SIZE": ("data.image_size", int),
    "MODEL.NUM_CLASSES": ("model.num_classes", int),
    "TRAIN.EPOCHS": ("optim.epochs", float),
    "TRAIN.BASE_LR": ("optim.base_lr", float),
    "TRAIN.WARMUP_EPOCHS": ("optim.warmup_epochs", float),
    "TRAIN.WARMUP_LR": ("optim.warmup_lr", float),
    "TRAIN.MIN_LR": ("optim.min_lr", float),
    "TRAIN.WEIGHT_DECAY": ("optim.weight_decay", float),
    "TRAIN.OPTIMIZER.LAYER_DECAY": ("optim.layer_decay", float),
    "TRAIN.CLIP_GRAD": ("deepspeed.grad_clip", float),
    "REVCOL.DROP_PATH": ("model.drop_path_rate", float),
    "REVCOL.INTER_SUPV": ("model.intersup", _bool),
    "REVCOL.FCOE": ("regularize.fcoe", float),
    "REVCOL.CCOE": ("regularize.ccoe", float),
    "REVCOL.HEAD_INIT_SCALE": ("model.head_init_scale", float),
    "MODEL.LABEL_SMOOTHING": ("regularize.label_smoothing", float),
    "MODEL_EMA": ("MODEL_EMA", _bool),  # -> regularize.ema_decay
    "AUG.COLOR_JITTER": ("data.color_jitter", float),
    "AUG.AUTO_AUGMENT": ("data.auto_augment", str),
    "AUG.REPROB": ("data.random_erasing", float),
    "AUG.MIXUP": ("regularize.mixup", float),
    "AUG.CUTMIX": ("regularize.cutmix", float),
}


def _per_gpu_batch(config_or_size: str | int) -> int:
    """The official batch per GPU of a config (by name) or an image size."""
    size = config_or_size
    if isinstance(size, str):
        size = _fixture()["configs"][size]["data.image_size"]
    batches = _fixture()["per_gpu_batch"]
    return batches.get(size, batches["default"])


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def test_fixture_parses_into_every_official_config() -> None:
    """The parser reads what the fixture holds (a few cells checked by eye against the release's YAML files)."""
    configs = _fixture()["configs"]
    assert {c for stages in OFFICIAL.values() for c in stages.values()} <= set(configs)
    assert len(configs) == 12
    assert configs["revcol_base_22k_pretrain"]["optim.base_lr"] == 1.25e-4
    assert configs["revcol_base_22k_pretrain"]["deepspeed.grad_clip"] == 10.0  # blank
    assert configs["revcol_tiny_1k"]["deepspeed.grad_clip"] == 0.0  # none
    assert configs["revcol_tiny_1k"]["model.num_classes"] == 1000  # blank
    assert configs["revcol_huge_1k_640_finetune"]["regularize.ema_decay"] == 0.9999
    assert configs["revcol_large_1k_384_finetune"]["optim.layer_decay"] == 0.8
    assert configs["revcol_small_1k"]["optim.layer_decay"] is None  # blank


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_parses(path: Path) -> None:
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert recipe.name == path.stem, "the recipe name (MLflow experiment, storage folder) is the file name"


def test_every_paper_recipe_exists() -> None:
    assert {p.stem for p in RECIPES} >= set(PAPER)


@pytest.mark.parametrize("name", PAPER)
def test_paper_recipe_carries_official_hyperparameters(name: str) -> None:
    recipe = load_recipe(JOBS / f"{name}.yaml")
    official = _fixture()
    for stage_name, config in OFFICIAL[name].items():
        stage = recipe.stage(stage_name)
        expected = {**official["shared"], **official["configs"][config], "data.batch_size": _per_gpu_batch(config),
                    "deepspeed.grad_accum": 1, **PROJECT.get((name, stage_name), {})}
        for key, value in expected.items():
            got = _get(stage, key)
            if isinstance(value, float):
                assert got == pytest.approx(value, rel=1e-9), f"{name}.{stage_name}.{key}: {got!r} != {value!r}"
            else:
                assert got == value, f"{name}.{stage_name}.{key}: {got!r} != {value!r}"


@pytest.mark.parametrize("name", PAPER)
def test_paper_recipe_batches_and_stage_chain(name: str) -> None:
    recipe = load_recipe(JOBS / f"{name}.yaml")
    official = _fixture()
    sc = recipe.scaling
    assert sc.use_gpu and sc.num_workers == official["gpus"] and sc.gpu_memory_gb == 80
    names = [s.name for s in recipe.stages]
    for stage in recipe.stages:
        if stage.kind == "eval":
            assert stage.init_from in names[: names.index(stage.name)]
            assert stage.model.name == recipe.stages[0].model.name
            continue
        global_batch = stage.data.batch_size * stage.deepspeed.grad_accum * sc.num_workers
        expected = _per_gpu_batch(stage.data.image_size) * official["gpus"]  # the official global batch
        assert global_batch == expected, f"{name}.{stage.name}: {global_batch} != {expected}"
        assert stage.data.train.startswith("s3://") and stage.data.train.endswith("/manifest.json")
    assert recipe.storage_path.startswith("s3://") and recipe.tracking.uri.startswith("http")
    assert recipe.stages[-1].kind == "eval"


@pytest.mark.parametrize("name", PAPER)
def test_paper_recipe_fits_its_cluster(name: str) -> None:
    from pipeline.plan import ClusterShape, plan_recipe

    recipe = load_recipe(JOBS / f"{name}.yaml")
    cluster = ClusterShape.from_recipe(recipe)
    assert (cluster.workers, cluster.gpu_mem_gib) == (8, 80)
    plan = plan_recipe(recipe, cluster, with_deepspeed_estimate=False)
    assert plan.fits, plan.refusal()
    for stage in plan.stages:
        assert stage.required_bytes("gpu") <= 80 * 2**30
