"""``revcol plan``: numbers that could be wrong, checked against independent counts and real measurements.

* parameter bytes are 4 × the parameter count of the model built on ``meta`` (and the official count);
* ZeRO shards the 16 bytes/parameter of fp32 weights + AdamW by the number of workers (plus DeepSpeed's separate
  fp32 master partition under ZeRO-1/2; ZeRO-3 uses the fp32 weights as master), and DeepSpeed's own estimator
  differs only by its 16-bit-weights assumption;
* the traced activation memory matches real CPU runs of the same step (``memory_kept_for_backward`` and the heap
  peak through backward; nothing is calibrated, so any resolution will do), and doubles with the micro-batch;
* leaving out columns beyond the third (fourth with intermediate supervision) changes no traced byte;
* RevCol-H at 640 px: ZeRO-0 on 8× 80 GB is refused naming the fix; ZeRO-3 bf16 at a small micro-batch fits;
* RevCol-H on one 20 GiB CPU worker with NVMe offload fits (16 bytes/parameter on disk); with AdamW in memory
  it is refused (the measured figures are benchmarks/revcol_h_offload.py's);
* a plan for a cluster declared in ``infra/clusters.yaml`` (``--cluster NAME``) uses its training workers, GPU and
  host memory per worker and CPUs, command-line values winning; an unknown name lists the known ones;
* the CLI: ``--json`` last line, exit status 0 when it fits, 1 with the reason when it does not.
"""

from __future__ import annotations

import gc
import importlib
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import ray
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import revcol
from pipeline.config import RegularizeConfig, StageConfig, load_recipe
from pipeline.plan import ClusterShape, activation_trace, model_stats, plan_recipe, plan_stage
from pipeline.plan.clusters import declared_cluster
from pipeline.stages import run_pipeline
from pipeline.train.engine import Objective
from revcol.measure import heap_in_use, memory_kept_for_backward

ROOT = Path(__file__).resolve().parents[1]
H_RECIPE = ROOT / "jobs" / "revcol_h_224_640.yaml"
OFFLOAD_RECIPE = ROOT / "jobs" / "revcol_h_single_node_offload.yaml"
LAYOUTS = ROOT / "tests" / "assets" / "official_revcol_layouts.json"
GiB = 2**30


def _stage(name: str = "revcol_test", *, size: int = 64, batch: int = 4, intersup: bool = False, **ds) -> StageConfig:
    return StageConfig.model_validate(
        {
            "kind": "pretrain",
            "data": {"train": "shards/x", "image_size": size, "batch_size": batch},
            "model": {"name": name, "num_classes": 10 if name == "revcol_test" else 1000, "intersup": intersup},
            "deepspeed": ds,
            "regularize": {"mixup": 0.0, "cutmix": 0.0},
        }
    )


def _item(plan, prefix: str) -> int:
    return sum(i.bytes for i in plan.items if i.name.startswith(prefix) and "persistent" in i.phases)


def test_every_public_name_resolves_to_its_definition() -> None:
    """``pipeline.plan`` re-exports lazily; no submodule shadows a re-exported name once imported."""
    import pipeline.plan as plan

    for module in ("clusters", "stats", "trace", "ledger", "result", "verdict", "planner", "report", "command"):
        importlib.import_module(f"pipeline.plan.{module}")
    for name in plan.__all__:
        value = getattr(plan, name)
        assert not isinstance(value, types.ModuleType) and value.__module__.startswith("pipeline.plan."), name
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        plan.nothing  # noqa: B018


# --------------------------------------------------------------------------------------------- model states
# These share one activation trace (cached in-process): RevCol-H's 640-px finetune, at any ZeRO stage.
def _h_finetune(*overrides: str) -> StageConfig:
    return load_recipe(H_RECIPE, [f"stages.finetune_640.{o}" for o in overrides]).stage("finetune_640")


def _plan(stage: StageConfig, *, workers: int = 8, **kwargs):
    kwargs.setdefault("with_deepspeed_estimate", False)
    return plan_stage(stage, ClusterShape(workers=workers), suggest=False, **kwargs)


@pytest.mark.parametrize("zero", [0, 3])
def test_parameter_bytes_are_four_per_parameter_of_the_meta_model(zero: int) -> None:
    with torch.device("meta"):
        meta = revcol.create_model("revcol_huge", num_classes=1000)
    params = sum(p.numel() for p in meta.parameters())
    assert params == json.loads(LAYOUTS.read_text())["revcol_huge_1000"]["params"] == 2_157_600_160
    stage = _h_finetune(f"deepspeed.zero_stage={zero}")
    assert model_stats(stage).params == params
    own = -(-params // 8) if zero == 3 else params
    assert _item(_plan(stage), "parameters (fp32") == 4 * own


def test_zero_stages_shard_model_states_by_the_number_of_workers() -> None:
    plans = {z: _plan(_h_finetune(f"deepspeed.zero_stage={z}")) for z in range(4)}
    p = plans[0].stats.params
    sharded16 = {z: _item(plans[z], "parameters (fp32") + _item(plans[z], "gradients") + _item(plans[z], "AdamW state")
                 for z in range(4)}
    assert sharded16[0] == 16 * p  # fp32 weights + fp32 gradients + AdamW (exp_avg, exp_avg_sq)
    assert sharded16[3] == pytest.approx(sharded16[0] / 8, rel=0.02)
    # DeepSpeed keeps a separate fp32 master partition under ZeRO-1/2 (measured on real engines); ZeRO-3 none.
    for z in (1, 2):
        assert _item(plans[z], "master weights") == pytest.approx(4 * p / 8, rel=1e-6)
    assert _item(plans[3], "master weights") == 0
    assert plans[3].model_state_bytes == pytest.approx(plans[0].model_state_bytes / 8, rel=0.02)
    states = [plans[z].model_state_bytes for z in range(4)]
    assert states[0] > states[1] >= states[2] > states[3]
    # EMA (0.9999 in this recipe) is sharded like the weights only under ZeRO-3.
    assert _item(plans[0], "EMA weights") == 4 * p and _item(plans[3], "EMA weights") == 4 * -(-p // 8)


def test_deepspeed_estimate_differs_only_by_its_16_bit_weights() -> None:
    """DeepSpeed's ZeRO-3 estimate is 4·largest_layer + 18·P/W (2-byte weights and gradients, fp32 gradient copy,
    master, AdamW); ours is 16·P/W for fp32 weights (their own master). With the largest layer taken off, they are
    18:16."""
    plan = _plan(_h_finetune(), with_deepspeed_estimate=True)
    est = plan.deepspeed_estimate
    assert est["function"].endswith("estimate_zero3_model_states_mem_needs")
    ours = _item(plan, "parameters (fp32") + _item(plan, "gradients") + _item(plan, "master") + _item(plan, "AdamW")
    theirs = est["gpu_bytes"] - 4 * plan.stats.largest_layer_params
    assert theirs == pytest.approx(ours * 18 / 16, rel=0.01)


def test_optimizer_offload_moves_state_to_the_host() -> None:
    plan = _plan(_h_finetune("deepspeed.offload_optimizer=cpu"))
    tiers = {i.name.split(" (")[0]: i.tier for i in plan.items}
    assert tiers["AdamW state"] == tiers["master weights"] == "host"
    assert tiers["parameters"] == "gpu"
    adam = _item(plan, "AdamW state")
    assert adam == 8 * -(-plan.stats.params // 8)
    assert plan.persistent_bytes("host") >= adam
    assert plan.persistent_bytes("gpu") < _plan(_h_finetune()).persistent_bytes("gpu") - adam


def test_single_node_offload_recipe_fits_and_keeping_adamw_in_memory_is_refused() -> None:
    recipe = load_recipe(OFFLOAD_RECIPE)
    plan = plan_recipe(recipe, suggest=False, with_deepspeed_estimate=False).stages[0]
    assert plan.fits, plan.problems
    params = plan.stats.params
    assert plan.peak("nvme")[0] == pytest.approx(16 * params, rel=0.01)  # weights, master, both AdamW moments
    assert plan.required_bytes("host") <= 20 * GiB
    assert _item(plan, "gradients") == 4 * params  # ZeRO-3 keeps all fp32 gradients of its partition in memory
    assert not [i for i in plan.items if "whole before DeepSpeed" in i.name]  # built partitioned (zero.Init)
    in_ram = load_recipe(OFFLOAD_RECIPE, ["stages.pretrain.deepspeed.offload_optimizer=cpu"])
    refused = plan_recipe(in_ram, suggest=False, with_deepspeed_estimate=False).stages[0]
    assert not refused.fits
    assert "host memory per worker" in " ".join(refused.problems)
    assert refused.required_bytes("host") > plan.required_bytes("host") + 12 * params  # master + AdamW moved in
    with pytest.raises(ValueError, match="host memory per worker"):
        run_pipeline(in_ram)  # refused before any resource is taken
    assert not ray.is_initialized()


# ------------------------------------------------------------------------------------------------ activations
class _HeapPeak(TorchDispatchMode):
    """Samples the process heap after every aten op (real CPU tensors)."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, heap_in_use())
        return out


def _measure(stage: StageConfig) -> tuple[int, int]:
    """Memory kept for backward and heap peak through backward of one real CPU step of ``stage``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: intra-op threads only spin (and the machine is shared)
    try:
        return _measure_step(stage)
    finally:
        torch.set_num_threads(threads)


def _measure_step(stage: StageConfig) -> tuple[int, int]:
    torch.manual_seed(0)
    mc = stage.model
    model = revcol.create_model(mc.name, num_classes=mc.num_classes, intersup=mc.intersup)
    cfg = revcol.model_cfg(mc.name)
    objective = Objective(model, RegularizeConfig(), mean=cfg["mean"], std=cfg["std"])
    b, s = stage.data.batch_size, stage.data.image_size
    images, labels = torch.randn(b, 3, s, s), torch.randint(0, mc.num_classes, (b,))

    def loss_fn(m, x):
        return m(x, labels)[0]

    memory_kept_for_backward(objective, images, loss_fn)  # creates the gradient buffers
    kept = memory_kept_for_backward(objective, images, loss_fn)
    gc.collect()
    before, peak = heap_in_use(), _HeapPeak()
    with peak:
        loss, logits = objective(images, labels)
        loss.backward()
        del loss, logits
    return kept, peak.peak - before


@pytest.mark.parametrize(
    ("size", "batch", "intersup"), [(96, 8, True), (160, 16, False)]
)
def test_traced_activations_match_a_real_cpu_step(size: int, batch: int, intersup: bool) -> None:
    stage = _stage(size=size, batch=batch, intersup=intersup)
    trace = activation_trace(stage)
    kept, peak = _measure(stage)
    assert trace.kept_bytes == pytest.approx(kept, rel=0.25)
    assert trace.backward_peak_bytes == pytest.approx(peak, rel=0.25)
    assert trace.backward_peak_bytes > trace.kept_bytes  # the backward transient is there


def test_doubling_the_micro_batch_doubles_activations() -> None:
    one, two = activation_trace(_stage(batch=8)), activation_trace(_stage(batch=16))
    for field in ("kept_bytes", "forward_peak_bytes", "backward_peak_bytes", "forward_flops"):
        assert getattr(two, field) / getattr(one, field) == pytest.approx(2.0, rel=0.1), field


@pytest.mark.parametrize("intersup", [False, True])
def test_columns_beyond_the_third_change_no_traced_byte(intersup: bool) -> None:
    from pipeline.plan.trace import _trace_cached

    args = dict(name="revcol_test", num_classes=10, intersup=intersup, reversible=True, drop_path_rate=0.2,
                overrides=json.dumps({"num_subnet": 8}), image_size=64, micro_batch=2, train=True, soft_targets=False)
    assert _trace_cached(**args) == _trace_cached(**args, all_columns=True)


def test_step_flops_count_the_recomputed_columns() -> None:
    """Backward is 2× forward; the fast path recomputes 3 of revcol_test's 4 columns, the reference path all 4."""
    stage = _stage()
    fast = activation_trace(stage)
    reference_model = stage.model.model_copy(update={"fast_path": False})
    reference = activation_trace(stage.model_copy(update={"model": reference_model}))
    assert fast.step_flops / fast.forward_flops == pytest.approx(3.75)
    assert reference.step_flops / reference.forward_flops == pytest.approx(4.0)
    assert activation_trace(_stage(batch=8)).step_flops == pytest.approx(2 * fast.step_flops, rel=0.01)


# ------------------------------------------------------------------------------------------------- RevCol-H
def test_huge_640_zero0_is_refused_naming_the_fix() -> None:
    recipe = load_recipe(H_RECIPE, ["stages.finetune_640.deepspeed.zero_stage=0"])
    plan = plan_recipe(recipe, stage="finetune_640")
    (stage,) = plan.stages
    assert not plan.fits and stage.required_bytes("gpu") > 80 * GiB
    assert "per GPU" in stage.problems[0] and "has 80.0 GiB" in stage.problems[0]
    fixes = [s["set"] for s in stage.suggestions if s["fits"]]
    assert ["stages.finetune_640.deepspeed.zero_stage=3"] in fixes
    refusal = plan.refusal()
    assert "does not fit" in refusal and "--set stages.finetune_640.deepspeed.zero_stage=3" in refusal
    assert "--set stages.finetune_640.data.batch_size=" in refusal  # a smaller micro-batch, same global batch


def test_huge_640_zero3_bf16_at_a_small_micro_batch_fits() -> None:
    recipe = load_recipe(
        H_RECIPE, ["stages.finetune_640.data.batch_size=8", "stages.finetune_640.deepspeed.grad_accum=16"]
    )
    plan = plan_recipe(recipe, stage="finetune_640")
    (stage,) = plan.stages
    assert plan.fits and (stage.zero_stage, stage.precision, stage.micro_batch) == (3, "bf16", 8)
    assert stage.required_bytes("gpu") < 40 * GiB
    assert stage.stats.params == 2_157_600_160


def test_host_memory_and_cpus_are_checked() -> None:
    recipe = load_recipe(H_RECIPE)
    small = ClusterShape.from_recipe(recipe, host_mem_gib=8, cpus_per_worker=2)
    plan = plan_recipe(recipe, small, stage="finetune_640", suggest=False)
    problems = " ".join(plan.stages[0].problems)
    assert "host memory per worker" in problems and "has 8.0 GiB" in problems
    assert "needs 12 CPUs per worker" in problems and "lower scaling.data_cpus" in problems
    with pytest.raises(ValueError, match="gpu memory must be > 0 GiB, got -1"):
        ClusterShape(workers=8, gpu_mem_gib=-1)


# ------------------------------------------------------------------------------------------------------ CLI
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "plan", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_cli_json_for_the_huge_recipe() -> None:
    proc = _cli(str(H_RECIPE), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["verdict"] == "fits" and out["fits"] is True
    assert [s["stage"] for s in out["stages"]] == ["pretrain_224", "finetune_640", "eval_640"]
    for s in out["stages"]:
        assert 0 < s["per_worker_bytes"]["gpu"] <= 80 * GiB and s["per_worker_bytes"]["host"] > 0
        assert s["verdict"] == "fits"
    assert "fake tensors" in out["activation_method"]
    ft = out["stages"][1]
    assert ft["deepspeed_estimate"]["gpu_bytes"] > 0 and ft["flops"]["step_per_micro_batch"] > 0


def test_cli_refuses_a_non_fitting_override_with_the_reason() -> None:
    recipe = ROOT / "jobs" / "revcol_t_1k.yaml"
    proc = _cli(str(recipe), "--stage", "eval", "--set", "scaling.gpu_memory_gb=4", "--json")
    assert proc.returncode == 1
    assert "does not fit" in proc.stderr and "has 4.0 GiB" in proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["verdict"] == "does not fit" and out["stages"][0]["problems"]
    assert out["cluster"]["gpu_mem_gib"] == 4 and out["cluster"]["sources"]["gpu_mem_gib"] == "recipe"


def test_a_resolution_the_model_cannot_take_is_named() -> None:
    with pytest.raises(ValueError, match="image size 100 is not a multiple of 32"):
        activation_trace(_stage(size=100))


# ------------------------------------------------------------------------------------------ declared clusters
_CLUSTERS = """\
schema: 1
clusters:
  lab:
    source: infra/ray/local.yaml
    node_types:
      head: {role: head, gpus: 0, gpu_mem_gib: 0, cpus: 0, ram_gib: 16, min_nodes: 1, max_nodes: 1}
      a100x4: {role: train, gpus: 4, gpu_type: A100, gpu_mem_gib: 40, cpus: 32, ram_gib: 320, min_nodes: 3,
               max_nodes: 3}
      cpu: {role: data, gpus: 0, gpu_mem_gib: 0, cpus: 16, ram_gib: 64, min_nodes: 0, max_nodes: 2}
"""


def test_a_plan_for_a_declared_cluster_uses_its_node_shapes(tmp_path: Path) -> None:
    path = tmp_path / "clusters.yaml"
    path.write_text(_CLUSTERS)
    lab = declared_cluster("lab", path=path)
    # 3 nodes x 4 GPUs; 40 GiB each; 320 GiB / 4 GPUs of host memory; CPUs of training and data nodes
    assert (lab.workers, lab.gpu_mem_gib, lab.host_mem_gib, lab.cpus, lab.gpus_per_node) == (12, 40, 80, 128, 4)
    recipe = load_recipe(H_RECIPE)  # scaling: 8 workers, 80 GiB GPU, 96 GiB host, 4 + 64/8 CPUs per worker
    cluster = ClusterShape.from_recipe(recipe, declared=lab)
    assert set(cluster.sources.values()) == {"cluster lab"} and cluster.name == "lab"
    plan = plan_recipe(recipe, cluster, stage="finetune_640", suggest=False, with_deepspeed_estimate=False)
    (stage,) = plan.stages
    assert (stage.workers, stage.gpu_budget_bytes, stage.host_budget_bytes) == (12, 40 * GiB, 80 * GiB)
    assert stage.global_batch == stage.micro_batch * stage.grad_accum * 12
    assert _item(stage, "parameters (fp32, 1/12)") == 4 * -(-stage.stats.params // 12)  # ZeRO-3 over 12 workers
    # 12 workers x 4 trainer CPUs + 64 data CPUs = 112 of the cluster's 128: no CPU problem
    assert cluster.cpus_per_worker == 128 / 12 and not any("CPUs" in p for p in stage.problems)
    assert plan.to_dict()["cluster"]["name"] == "lab"
    # a command-line value wins over the cluster's; the cluster's CPUs are then shared by fewer workers
    fewer = ClusterShape.from_recipe(recipe, declared=lab, workers=8, gpu_mem_gib=24)
    assert (fewer.workers, fewer.gpu_mem_gib, fewer.host_mem_gib, fewer.cpus_per_worker) == (8, 24, 80, 16)
    assert fewer.sources == {"workers": "cli", "gpu_mem_gib": "cli", "host_mem_gib": "cluster lab",
                             "cpus_per_worker": "cluster lab"}
    with pytest.raises(ValueError, match="cluster 'lab' holds at most 12 training workers"):
        ClusterShape.from_recipe(recipe, declared=lab, workers=16)
    with pytest.raises(ValueError, match="unknown cluster 'aws' in .*; known: lab"):
        declared_cluster("aws", path=path)


def test_cli_plans_for_a_cluster_of_infra_clusters_yaml() -> None:
    recipe = ROOT / "jobs" / "revcol_t_1k.yaml"
    proc = _cli(str(recipe), "--stage", "eval", "--cluster", "aws", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    c = out["cluster"]  # infra/clusters.yaml, aws: up to 4 nodes x 8 H100 (80 GiB), 2048 GiB RAM per node
    assert (c["name"], c["workers"], c["gpu_mem_gib"], c["host_mem_gib"], c["gpus_per_node"]) == ("aws", 32, 80, 256, 8)
    assert c["sources"]["workers"] == "cluster aws" and out["stages"][0]["workers"] == 32
    assert out["stages"][0]["budget_bytes"] == {"gpu": 80 * GiB, "host": 256 * GiB}
    proc = _cli(str(recipe), "--cluster", "nope")
    assert proc.returncode == 2 and "unknown cluster 'nope'" in proc.stderr and "known: aws, k8s, local" in proc.stderr
