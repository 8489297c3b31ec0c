"""RevCol-H's path on a small machine, at reduced width: a model built partitioned under ``deepspeed.zero.Init``
with parameters and optimizer state offloaded to disk (ZeRO-Infinity, DeepSpeed's async I/O op), trained by a real
DeepSpeed engine built the pipeline's way.

* the partitioned build gets exactly the plain build's weights (the release's init, run per gathered module);
* the gradients of the first step equal plain PyTorch's (the reversible recomputation in backward fetches its
  parameters back from disk), so do the weights after DeepSpeed's CPU Adam step on the disk-resident optimizer
  state, and the second and third steps run with the loss falling on a fixed batch;
* a weights-only checkpoint (what the full-size recipe saves) is exported one parameter at a time and loads
  back into a freshly built offloaded engine, master weights included.

The full-size run is ``benchmarks/revcol_h_offload.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from pipeline.services import free_port

# revcol_huge's depth, columns and bottom→top branch at a width that runs in seconds; the top level's MLP
# weights (256 × 1024) reach DeepSpeed's smallest swapped tensor (1 MiB): smaller ones stay in host memory.
REDUCED_H = {"channels": (32, 64, 128, 256)}
STEPS = 3


def _run(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import functools

    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    import revcol
    from pipeline.config import DeepSpeedConfig, OptimConfig, RegularizeConfig
    from safetensors.torch import load_file

    from pipeline.train.checkpoint import TrainerState, load_checkpoint, save_checkpoint
    from pipeline.train.engine import Objective, build_engine, build_model, deepspeed_config, largest_param
    from pipeline.train.optim import build_optimizer, param_groups

    deepspeed.init_distributed(dist_backend="gloo")
    build = functools.partial(
        revcol.create_model, "revcol_huge", num_classes=10, intersup=True, head_init_scale=0.5, **REDUCED_H
    )
    mean_std = {"mean": (0.5,) * 3, "std": (0.5,) * 3}
    data = torch.Generator().manual_seed(1)
    images, labels = torch.randn(2, 3, 64, 64, generator=data), torch.randint(0, 10, (2,), generator=data)

    torch.manual_seed(0)
    plain = build()
    loss = Objective(plain, RegularizeConfig(), **mean_std)(images, labels)[0]
    loss.backward()
    result: dict = {
        "plain_weights": {n: p.detach().clone() for n, p in plain.named_parameters()},
        "plain_grads": {n: p.grad.clone() for n, p in plain.named_parameters()},
        "plain_loss": loss.item(),
    }
    optim = OptimConfig(base_lr=1e-3)
    build_optimizer(param_groups(plain, optim), optim, lr=1e-3).step()
    result["plain_stepped"] = {n: p.detach().clone() for n, p in plain.named_parameters()}
    del plain

    # Reading one parameter's fp32 master weight or gradient back (safe_get_full_*, 4 x 1175 reads here) swaps in
    # the optimizer state of its whole sub-group from disk. At DeepSpeed's default (1e9 elements: one group for
    # this model) each read moved all of it: 97 s for this run, 30 s with groups of 2^18 elements (the largest
    # parameter). Several groups also take turns in the swap buffers, as they do for the full-size model (2.1e9).
    ds = DeepSpeedConfig(zero_stage=3, offload_param="nvme", offload_optimizer="nvme", nvme_path=folder,
                         extra={"zero_optimization": {"stage3_param_persistence_threshold": 0,
                                                      "sub_group_size": 2**18}})
    config = deepspeed_config(ds, micro_batch=2, largest_param=largest_param(build))
    torch.manual_seed(0)
    model = build_model(build, config)
    large = [p for p in model.parameters() if p.ds_numel * 4 >= 2**20]
    result["large_on_disk"] = bool(large) and all(p.ds_tensor.final_location == "nvme" for p in large)
    result["zero_weights"] = {}
    for name, param in model.named_parameters():  # one at a time: a few swap buffers hold what is off disk
        with deepspeed.zero.GatheredParameters([param]):
            result["zero_weights"][name] = param.detach().clone()
    optimizer = build_optimizer(param_groups(model, optim), optim, lr=1e-3, cpu_offload=True)
    engine = build_engine(Objective(model, RegularizeConfig(), **mean_std), optimizer, config)
    losses = []
    for step in range(STEPS):
        loss, _ = engine(images, labels)
        engine.backward(loss)
        if step == 0:
            result["zero_grads"] = {n: safe_get_full_grad(p).clone() for n, p in engine.module.model.named_parameters()}
        engine.step()
        if step == 0:
            result["zero_stepped"] = {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.model.named_parameters()}
        losses.append(loss.item())
    result["zero_losses"] = losses
    result["offload_files"] = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
    result["trained"] = {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.model.named_parameters()}

    # a weights-only checkpoint (the RevCol-H recipe's), streamed out and loaded into a fresh offloaded engine
    checkpoint = Path(folder) / "checkpoint"
    save_checkpoint(engine, checkpoint, TrainerState(step=STEPS), ema=None, export=True, optimizer_state=False)
    engine.destroy()
    result["exported"] = load_file(checkpoint / "export" / "model.safetensors")
    fresh = ds.model_copy(update={"nvme_path": str(Path(folder) / "fresh")})
    config = deepspeed_config(fresh, micro_batch=2, largest_param=largest_param(build))
    model = build_model(build, config)
    optimizer = build_optimizer(param_groups(model, optim), optim, lr=1e-3, cpu_offload=True)
    engine = build_engine(Objective(model, RegularizeConfig(), **mean_std), optimizer, config)
    result["resumed_step"] = load_checkpoint(engine, checkpoint, ema=None).step
    result["resumed"] = {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.model.named_parameters()}
    torch.save(result, Path(folder) / "result.pt")
    engine.destroy()
    deepspeed.comm.destroy_process_group()


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("offload")
    mp.spawn(_run, args=(free_port(), str(folder)), nprocs=1, join=True)
    return torch.load(folder / "result.pt", weights_only=True)


def test_partitioned_build_gets_the_plain_build_weights(result):
    assert result["large_on_disk"]
    plain, zero = result["plain_weights"], result["zero_weights"]
    assert plain.keys() == zero.keys()
    for name, weight in plain.items():
        assert torch.equal(zero[name], weight), name
    convs = [w for n, w in plain.items() if n.endswith("weight") and w.ndim == 4 and w.shape[1] > 1]
    assert torch.cat([w.flatten() for w in convs]).std() == pytest.approx(0.02, rel=0.1)  # the release's init


def test_offloaded_gradients_equal_plain_pytorch(result):
    assert result["offload_files"] > 0
    assert result["zero_losses"][0] == pytest.approx(result["plain_loss"], rel=1e-6)
    worst = max(
        ((result["zero_grads"][n] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item()
        for n, g in result["plain_grads"].items()
    )
    assert worst < 1e-4, worst


def test_offloaded_adamw_step_equals_plain_pytorch(result):
    """DeepSpeed's CPU Adam on the disk-resident optimizer state vs torch AdamW: same weights after one step
    (with weight decay and the layer-wise groups)."""
    worst = max((result["zero_stepped"][n] - w).abs().max().item() for n, w in result["plain_stepped"].items())
    assert worst < 1e-6, worst
    moved = max((result["plain_stepped"][n] - w).abs().max().item() for n, w in result["plain_weights"].items())
    assert moved > 1e-4  # the step did something


def test_later_steps_run_and_the_loss_falls(result):
    losses = result["zero_losses"]
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_weights_only_checkpoint_streams_out_and_loads_into_an_offloaded_engine(result):
    assert result["resumed_step"] == STEPS
    for name, weight in result["trained"].items():
        assert torch.equal(result["exported"][name], weight), name
        assert torch.equal(result["resumed"][name], weight), name  # master weights follow the loaded ones
