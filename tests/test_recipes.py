"""Every recipe in ``jobs/`` parses; the paper recipes carry the official hyperparameters and fit their cluster.

The expected values are read from ``../shared/fixtures/official_recipes.md`` (the release's configs): learning rates
for a global batch of 1024, clip grad 10.0 where the table is blank (0.0 means none), EMA 0.9999 where MODEL_EMA is
True, batch 128 per GPU on 8 GPUs (64 at 384 px).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.config import Recipe, load_recipe

JOBS = Path(__file__).resolve().parents[1] / "jobs"
RECIPES = sorted(JOBS.glob("*.yaml"))
PAPER = [
    "revcol_t_1k",
    "revcol_s_1k",
    "revcol_b_1k",
    "revcol_b_22k_1k",
    "revcol_l_22k_1k",
    "revcol_xl_22k_1k",
    "revcol_h_224_640",
]

# Shared by the 22K pretrains (revcol_{base,large,xlarge}_22k_pretrain) and by the 1K finetunes.
_PRETRAIN_22K = {
    "data.image_size": 224,
    "model.num_classes": 21841,
    "model.intersup": True,
    "optim.epochs": 90,
    "optim.base_lr": 1.25e-4,
    "optim.warmup_epochs": 5,
    "optim.warmup_lr": 1e-5,
    "optim.min_lr": 1e-7,
    "optim.weight_decay": 0.1,
    "optim.layer_decay": None,
    "deepspeed.grad_clip": 10.0,
    "regularize.mixup": 0.8,
    "regularize.cutmix": 1.0,
    "regularize.ema_decay": None,
    "regularize.fcoe": 3.0,
    "regularize.ccoe": 0.7,
}
_FINETUNE_1K = {
    "model.num_classes": 1000,
    "model.intersup": False,
    "model.head_init_scale": 0.001,
    "optim.epochs": 30,
    "optim.warmup_epochs": 0,
    "optim.warmup_lr": 4e-6,
    "optim.min_lr": 2e-7,
    "optim.weight_decay": 1e-8,
    "deepspeed.grad_clip": 10.0,
    "regularize.mixup": 0.0,
    "regularize.cutmix": 0.0,
    "data.color_jitter": 0.0,
    "init_from": "pretrain_22k",
}
_ONE_K = {
    "data.image_size": 224,
    "data.batch_size": 128,
    "model.num_classes": 1000,
    "model.intersup": True,
    "optim.epochs": 300,
    "optim.base_lr": 1e-3,
    "optim.warmup_epochs": 20,
    "optim.warmup_lr": 1e-5,
    "optim.weight_decay": 0.05,
    "optim.layer_decay": None,
    "regularize.ema_decay": 0.9999,
    "regularize.mixup": 0.8,
    "regularize.cutmix": 1.0,
}

EXPECTED: dict[str, dict[str, dict[str, Any]]] = {
    "revcol_t_1k": {
        "pretrain": {**_ONE_K, "model.name": "revcol_tiny", "optim.min_lr": 1e-6, "deepspeed.grad_clip": 0.0,
                     "model.drop_path_rate": 0.1, "data.color_jitter": 0.4},
    },
    "revcol_s_1k": {
        "pretrain": {**_ONE_K, "model.name": "revcol_small", "optim.min_lr": 1e-6, "deepspeed.grad_clip": 0.0,
                     "model.drop_path_rate": 0.3, "data.color_jitter": 0.4},
    },
    "revcol_b_1k": {
        "pretrain": {**_ONE_K, "model.name": "revcol_base", "optim.min_lr": 1e-8, "deepspeed.grad_clip": 5.0,
                     "model.drop_path_rate": 0.4, "data.color_jitter": 0.0},
    },
    "revcol_b_22k_1k": {
        "pretrain_22k": {**_PRETRAIN_22K, "model.name": "revcol_base", "model.drop_path_rate": 0.3,
                         "data.color_jitter": 0.4},
        "finetune_224": {**_FINETUNE_1K, "data.image_size": 224, "data.batch_size": 128, "optim.base_lr": 1e-4,
                         "optim.layer_decay": 0.9, "model.drop_path_rate": 0.2, "regularize.ema_decay": None},
        "finetune_384": {**_FINETUNE_1K, "data.image_size": 384, "data.batch_size": 64, "optim.base_lr": 1e-4,
                         "optim.layer_decay": 0.9, "model.drop_path_rate": 0.2, "regularize.ema_decay": None},
    },
    "revcol_l_22k_1k": {
        "pretrain_22k": {**_PRETRAIN_22K, "model.name": "revcol_large", "model.drop_path_rate": 0.3,
                         "data.color_jitter": 0.4},
        "finetune_224": {**_FINETUNE_1K, "data.image_size": 224, "data.batch_size": 128, "optim.base_lr": 5e-5,
                         "optim.layer_decay": 0.8, "model.drop_path_rate": 0.3, "regularize.ema_decay": None},
        "finetune_384": {**_FINETUNE_1K, "data.image_size": 384, "data.batch_size": 64, "optim.base_lr": 5e-5,
                         "optim.layer_decay": 0.8, "model.drop_path_rate": 0.3, "regularize.ema_decay": None},
    },
    "revcol_xl_22k_1k": {
        "pretrain_22k": {**_PRETRAIN_22K, "model.name": "revcol_xlarge", "model.drop_path_rate": 0.4,
                         "data.color_jitter": 0.0},
        "finetune_384": {**_FINETUNE_1K, "data.image_size": 384, "data.batch_size": 64, "optim.base_lr": 2e-5,
                         "optim.layer_decay": 0.8, "model.drop_path_rate": 0.4, "regularize.ema_decay": 0.9999},
    },
    "revcol_h_224_640": {
        # The private 168M-image pretrain is replaced by the large models' public 22K recipe (XL's drop path).
        "pretrain_224": {**_PRETRAIN_22K, "model.name": "revcol_huge", "model.drop_path_rate": 0.4,
                         "data.color_jitter": 0.0, "deepspeed.zero_stage": 3, "deepspeed.precision": "bf16"},
        "finetune_640": {
            "model.name": "revcol_huge",
            "data.image_size": 640,
            "model.num_classes": 1000,
            "model.intersup": False,
            "model.head_init_scale": 0.001,
            "model.drop_path_rate": 0.4,
            "optim.epochs": 20,
            "optim.base_lr": 4e-5,
            "optim.warmup_epochs": 0,
            "optim.warmup_lr": 4e-8,
            "optim.min_lr": 2e-8,
            "optim.weight_decay": 1e-8,
            "optim.layer_decay": 0.8,
            "deepspeed.grad_clip": 100.0,
            "deepspeed.zero_stage": 3,
            "deepspeed.precision": "bf16",
            "regularize.ema_decay": 0.9999,
            "regularize.mixup": 0.0,
            "regularize.cutmix": 0.0,
            "init_from": "pretrain_224",
        },
    },
}

# Shared by every official recipe.
_EVERY_TRAINING_STAGE = {
    "regularize.label_smoothing": 0.1,
    "data.auto_augment": "rand-m9-mstd0.5-inc1",
    "data.random_erasing": 0.25,
    "optim.betas": (0.9, 0.999),
    "optim.eps": 1e-8,
    "optim.schedule": "cosine",
}


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


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
    for stage_name, expected in EXPECTED[name].items():
        stage = recipe.stage(stage_name)
        for key, value in {**_EVERY_TRAINING_STAGE, **expected}.items():
            got = _get(stage, key)
            if isinstance(value, float):
                assert got == pytest.approx(value, rel=1e-9), f"{name}.{stage_name}.{key}: {got!r} != {value!r}"
            else:
                assert got == value, f"{name}.{stage_name}.{key}: {got!r} != {value!r}"


@pytest.mark.parametrize("name", PAPER)
def test_paper_recipe_batches_and_stage_chain(name: str) -> None:
    recipe = load_recipe(JOBS / f"{name}.yaml")
    sc = recipe.scaling
    assert sc.use_gpu and sc.num_workers == 8 and sc.gpu_memory_gb == 80
    names = [s.name for s in recipe.stages]
    for stage in recipe.stages:
        if stage.kind == "eval":
            assert stage.init_from in names[: names.index(stage.name)]
            assert stage.model.name == recipe.stages[0].model.name
            continue
        global_batch = stage.data.batch_size * stage.deepspeed.grad_accum * sc.num_workers
        # 1024 everywhere, 512 for the 384-px finetunes (64 per GPU on 8 GPUs).
        assert global_batch == (512 if stage.data.image_size == 384 else 1024), f"{name}.{stage.name}: {global_batch}"
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
