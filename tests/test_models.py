"""The RevCol model family: official sizes and layouts, timm registration, exact reversible gradients, memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import revcol
from revcol.measure import memory_kept_for_backward

LAYOUTS = json.loads((Path(__file__).parent / "assets" / "official_revcol_layouts.json").read_text())
RELEASED = ["revcol_tiny", "revcol_small", "revcol_base", "revcol_large", "revcol_xlarge", "revcol_huge"]
ALL_VARIANTS = timm.list_models("revcol*")
SMALL = ["revcol_test", "revcol_tiny"]  # built on the CPU; the others on the meta device


def _build(name: str, **kwargs) -> revcol.RevCol:
    if name in SMALL:
        return revcol.create_model(name, **kwargs)
    with torch.device("meta"):
        return revcol.create_model(name, **kwargs)


def _layout_key(name: str, intersup: bool, classes: int) -> str:
    return f"{name}{'_intersup' if intersup else ''}_{classes}"


def test_registry_lists_every_variant():
    assert set(RELEASED) | {"revcol_test"} == set(ALL_VARIANTS) == set(revcol.list_variants())


@pytest.mark.parametrize("name", RELEASED)
@pytest.mark.parametrize(("intersup", "classes"), [(False, 1000), (True, 1000), (True, 21841)])
def test_parameter_count_and_layout_equal_official(name, intersup, classes):
    with torch.device("meta"):
        model = revcol.create_model(name, num_classes=classes, intersup=intersup)
    official = LAYOUTS[_layout_key(name, intersup, classes)]
    assert sum(p.numel() for p in model.parameters()) == official["params"]
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == official["keys"]


def test_headline_parameter_counts():
    counts = {"revcol_tiny": 30_456_168, "revcol_small": 60_568_424, "revcol_base": 138_616_408,
              "revcol_large": 273_095_400, "revcol_xlarge": 833_807_400, "revcol_huge": 2_157_600_160}
    for name, count in counts.items():
        with torch.device("meta"):
            assert sum(p.numel() for p in revcol.create_model(name).parameters()) == count, name


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_timm_create_model_and_forward_shapes(name):
    size = 64
    if name in SMALL:
        model = timm.create_model(name, num_classes=7).eval()
        x = torch.randn(2, 3, size, size)
    else:
        with torch.device("meta"):
            model = timm.create_model(name, num_classes=7).eval()
        x = torch.randn(2, 3, size, size, device="meta")
    assert isinstance(model, revcol.RevCol)
    with torch.no_grad():
        assert model(x).shape == (2, 7)
        features = model.forward_features(x)
    assert [f.shape[1] for f in features] == list(model.channels)
    assert [size // f.shape[-1] for f in features] == [4, 8, 16, 32]
    assert [i["reduction"] for i in model.feature_info] == [4, 8, 16, 32]


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_intersup_outputs(name):
    model = _build(name, num_classes=5, intersup=True).eval()
    x = torch.randn(1, 3, 64, 64, device=next(model.parameters()).device)
    with torch.no_grad():
        out = model.forward_columns(x)
    assert len(out.logits) == 4 and all(t.shape == (1, 5) for t in out.logits)
    assert len(out.reconstructions) == 3 and all(r.shape == (1, 3, 64, 64) for r in out.reconstructions)


@pytest.mark.parametrize("name", RELEASED)
@pytest.mark.parametrize(("intersup", "classes"), [(False, 1000), (True, 21841)])
def test_official_layout_loads_strictly(name, intersup, classes):
    with torch.device("meta"):
        model = revcol.create_model(name, num_classes=classes, intersup=intersup)
        shapes = LAYOUTS[_layout_key(name, intersup, classes)]["keys"]
        checkpoint = {"model": {f"module.{k}": torch.empty(s) for k, s in shapes.items()}, "epoch": 3}
    revcol.load_official_state_dict(model, checkpoint)


def test_official_layout_mismatch_is_named():
    model = revcol.create_model("revcol_test", num_classes=10)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["cls.classifier.1.weight"] = torch.zeros(11, 32)
    sd["decoder_blocks.0.projback.0.weight"] = torch.zeros(1)
    del sd["subnet0.alpha0"]
    with pytest.raises(ValueError) as err:
        revcol.load_official_state_dict(model, sd)
    msg = str(err.value)
    assert "missing: subnet0.alpha0" in msg
    assert "unexpected: decoder_blocks.0.projback.0.weight" in msg
    assert "cls.classifier.1.weight: checkpoint (11, 32) vs model (10, 32)" in msg
    assert "intersup=True" in msg


# --- an independent functional reference of the released forward pass, on a raw official state_dict --------------
def _ln2d(x, sd, p):
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), sd[p + ".weight"], sd[p + ".bias"], 1e-6).permute(0, 3, 1, 2)


def _block(x, sd, p):
    y = F.conv2d(x, sd[p + ".dwconv.weight"], sd[p + ".dwconv.bias"], padding=1, groups=x.shape[1]).permute(0, 2, 3, 1)
    y = F.layer_norm(y, (y.shape[-1],), sd[p + ".norm.weight"], sd[p + ".norm.bias"], 1e-6)
    y = F.linear(F.gelu(F.linear(y, sd[p + ".pwconv1.weight"], sd[p + ".pwconv1.bias"])), sd[p + ".pwconv2.weight"], sd[p + ".pwconv2.bias"])
    return x + (sd[p + ".gamma"] * y).permute(0, 3, 1, 2)


def _up(x, sd, p, scale):
    y = F.linear(x.permute(0, 2, 3, 1), sd[p + ".channel_reschedule.0.weight"], sd[p + ".channel_reschedule.0.bias"])
    y = F.layer_norm(y, (y.shape[-1],), sd[p + ".channel_reschedule.1.weight"], sd[p + ".channel_reschedule.1.bias"], 1e-6)
    return F.interpolate(y.permute(0, 3, 1, 2), scale_factor=scale, mode="nearest")


def _reference_logits(sd, x, *, num_subnet, layers, huge):
    x = _ln2d(F.conv2d(x, sd["stem.0.weight"], sd["stem.0.bias"], stride=4), sd, "stem.1")
    c = [0, 0, 0, 0]
    for i in range(num_subnet):
        p = f"subnet{i}"
        for lvl in range(4):
            q = f"{p}.level{lvl}"
            if lvl == 0:
                f = x
            else:
                f = F.conv2d(c[lvl - 1], sd[q + ".fusion.down.0.weight"], sd[q + ".fusion.down.0.bias"], stride=2)
                f = _ln2d(f, sd, q + ".fusion.down.1")
            if i > 0 and lvl < 3:
                f = f + _up(c[lvl + 1], sd, q + ".fusion.up", 2)
            if i > 0 and lvl == 0 and huge:
                f = f + _up(c[3], sd, q + ".fusion.up2", 8)
            for b in range(layers[lvl]):
                f = _block(f, sd, f"{q}.blocks.{b}")
            alpha = sd[f"{p}.alpha{lvl}"]
            c[lvl] = alpha * c[lvl] + f
    pooled = c[3].mean((2, 3))
    pooled = F.layer_norm(pooled, (pooled.shape[-1],), sd["cls.classifier.0.weight"], sd["cls.classifier.0.bias"], 1e-6)
    return F.linear(pooled, sd["cls.classifier.1.weight"], sd["cls.classifier.1.bias"])


@pytest.mark.parametrize("huge", [False, True], ids=["plain", "huge-branch"])
def test_official_weights_give_the_released_forward(huge):
    name = "revcol_huge" if huge else "revcol_tiny"
    kwargs = dict(channels=(8, 16, 24, 32), num_classes=6)
    model = revcol.create_model(name, **kwargs).eval()
    g = torch.Generator().manual_seed(0)
    official = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in model.state_dict().items()}
    revcol.load_official_state_dict(model, {"model": official})
    x = torch.randn(2, 3, 64, 64, generator=g)
    expected = _reference_logits(official, x, num_subnet=model.num_subnet, layers=model.layers, huge=huge)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


# --- reversible backward ----------------------------------------------------------------------------------------
def _grads(model, x, *, reversible, seed=123):
    model.reversible = reversible
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # same drop-path masks in both modes
    out = model.forward_columns(x)
    loss = sum(t.square().sum() for t in out.logits) + sum(r.sigmoid().mean() for r in out.reconstructions)
    loss = loss + sum(f.square().mean() for f in out.features)  # every level's output feeds the loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _max_rel_diff(a, b):
    return max(((a[n] - b[n]).abs().max() / b[n].abs().max().clamp_min(1e-30)).item() for n in b)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("revcol_test", {}),
        ("revcol_test", {"intersup": True}),
        ("revcol_huge", {"channels": (8, 16, 24, 32), "layers": (1, 1, 2, 1)}),
        ("revcol_base", {"channels": (8, 16, 24, 32), "intersup": True}),
    ],
    ids=["test", "test-intersup", "huge-shaped", "base-16col-intersup"],
)
def test_reversible_gradients_equal_plain_fp64_with_drop_path(name, kwargs):
    torch.manual_seed(0)
    model = revcol.create_model(name, num_classes=10, drop_path_rate=0.3, **kwargs).double().train()
    with torch.no_grad():  # non-trivial alphas and layer scales, as after some training
        for n, p in model.named_parameters():
            if ".alpha" in n or n.endswith(".gamma"):
                p.uniform_(0.5, 1.2)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    loss_plain, plain = _grads(model, x, reversible=False)
    loss_rev, rev = _grads(model, x, reversible=True)
    assert torch.equal(loss_plain, loss_rev)
    assert set(plain) == set(rev) == {n for n, _ in model.named_parameters()}
    assert _max_rel_diff(rev, plain) <= 1e-10
    # and drop path really is random: another seed gives other gradients
    _, other = _grads(model, x, reversible=True, seed=7)
    assert _max_rel_diff(other, plain) > 1e-3


def test_reversible_input_gradient_and_frozen_stem():
    model = revcol.create_model("revcol_test", num_classes=3).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    for reversible in (False, True):
        model.reversible = reversible
        x.grad = None
        model(x).sum().backward()
        if not reversible:
            expected = x.grad.clone()
    torch.testing.assert_close(x.grad, expected, rtol=1e-10, atol=1e-12)
    # columns still get gradients when nothing upstream requires grad
    for p in model.stem.parameters():
        p.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    model(torch.randn(2, 3, 32, 32, dtype=torch.float64)).sum().backward()
    assert model.subnet0.level0.blocks[0].pwconv1.weight.grad is not None


@pytest.mark.parametrize("keep_last_column", [False, True])
def test_recomputation_calls_modules_so_hooks_fire(keep_last_column):
    model = revcol.create_model("revcol_test", num_classes=3, keep_last_column=keep_last_column)
    calls = {"level": 0, "column": 0}
    for module in model.modules():
        if type(module).__name__ in ("Level", "Column"):
            key = type(module).__name__.lower()
            module.register_forward_pre_hook(lambda *_, k=key: calls.__setitem__(k, calls[k] + 1))
    model(torch.randn(1, 3, 32, 32)).sum().backward()
    # forward once, then again in backward to reconstruct/recompute (all but a kept last column)
    recomputed = model.num_subnet - keep_last_column
    assert calls == {"level": 4 * (model.num_subnet + recomputed), "column": model.num_subnet + recomputed}


def test_autocast_bf16_reversible_close_to_plain():
    torch.manual_seed(0)
    model = revcol.create_model("revcol_test", num_classes=10, drop_path_rate=0.1).train()
    x = torch.randn(2, 3, 32, 32)
    results = {}
    for reversible in (False, True):
        model.reversible = reversible
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().logsumexp(1).mean()
        loss.backward()
        results[reversible] = (loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()]))
    (l0, g0), (l1, g1) = results[False], results[True]
    assert torch.isfinite(g1).all()
    assert torch.equal(l0, l1)  # same forward computation
    cos = F.cosine_similarity(g0.double(), g1.double(), dim=0)
    assert cos > 0.999, cos


@pytest.mark.slow
def test_torch_compile_gives_same_gradients():
    torch.manual_seed(0)
    model = revcol.create_model("revcol_test", num_classes=4)
    x = torch.randn(2, 3, 32, 32)
    model.reversible = True
    model(x).square().sum().backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model)
    compiled(x).square().sum().backward()
    # compiled stem/head kernels round differently in fp32; reconstruction carries that through the columns
    assert _max_rel_diff({n: p.grad for n, p in model.named_parameters()}, eager) < 1e-3


def test_memory_does_not_grow_with_columns():
    def loss_fn(m, x):
        return m(x).logsumexp(1).mean()

    x = torch.randn(4, 3, 96, 96)
    kept = {}
    for cols in (1, 8):
        model = revcol.create_model("revcol_test", num_subnet=cols, num_classes=10).train()
        for reversible in (False, True):
            model.reversible = reversible
            memory_kept_for_backward(model, x, loss_fn)  # warm-up
            kept[cols, reversible] = memory_kept_for_backward(model, x, loss_fn)
    assert kept[8, True] <= 1.2 * kept[1, True], kept
    assert kept[8, False] >= 4 * kept[1, False], kept  # the plain model does grow: the measurement can tell


# --- heads, finetuning hooks, errors ----------------------------------------------------------------------------
def test_compound_loss_matches_formula_and_trains():
    torch.manual_seed(0)
    model = revcol.create_model("revcol_test", num_classes=4, intersup=True)
    cfg = revcol.model_cfg("revcol_test")
    images, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 3])
    out = model.forward_columns(images)
    target = revcol.reconstruction_target(images, cfg["mean"], cfg["std"])
    assert target.min() >= 0.01 and target.max() <= 0.99
    loss = revcol.compound_loss(out.logits, out.reconstructions, target, y, F.cross_entropy, fcoe=3.0, ccoe=0.7)
    ce = [F.cross_entropy(t, y) for t in out.logits]
    bce = [F.binary_cross_entropy_with_logits(r, target) for r in out.reconstructions]
    expected = ce[3] + sum(bce[k] * (1 - k / 3) * 3.0 + ce[k] * ((k + 1) / 4) * 0.7 for k in range(3))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_reset_classifier_drop_intersup_and_head_init_scale():
    model = revcol.create_model("revcol_test", num_classes=10, intersup=True)
    model.drop_intersup()
    assert not model.intersup and not hasattr(model, "decoder_blocks")
    assert all(k.startswith(("stem", "subnet", "cls.")) for k in model.state_dict())
    model.reset_classifier(3, head_init_scale=0.001)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    assert model.get_classifier().weight.abs().max() < 0.001 * 0.1
    scaled = revcol.create_model("revcol_test", head_init_scale=0.001)
    assert scaled.cls.classifier[1].weight.abs().max() < 0.001 * 0.1


def test_no_weight_decay_names_alphas_and_layer_scales():
    names = revcol.create_model("revcol_test").no_weight_decay()
    assert "subnet0.alpha0" in names and "subnet3.level2.blocks.1.gamma" in names
    assert not any("pwconv" in n for n in names)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "revcol_gigantic"}, "unknown model 'revcol_gigantic'"),
        ({"name": "revcol_tiny", "widths": (1, 2)}, "unknown override(s) ['widths']"),
        ({"name": "revcol_tiny", "num_subnet": 6, "intersup": True}, "num_subnet divisible by 4"),
        ({"name": "revcol_tiny", "channels": (1, 2, 3)}, "channels must be 4"),
        ({"name": "revcol_tiny", "kernel_size": 4}, "kernel_size must be a positive odd"),
        ({"name": "revcol_tiny", "drop_path_rate": 1.5}, "drop_path_rate must lie in [0, 1)"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError) as err, torch.device("meta"):
        revcol.create_model(**kwargs)
    assert message in str(err.value)


def test_pretrained_download_refused_with_guidance():
    with pytest.raises(ValueError, match="load_official_state_dict"):
        timm.create_model("revcol_tiny", pretrained=True)


def test_model_cfg_has_preprocessing():
    cfg = revcol.model_cfg("revcol_tiny")
    assert cfg["input_size"] == (3, 224, 224) and cfg["mean"] == (0.485, 0.456, 0.406)
    assert cfg["interpolation"] == "bicubic" and cfg["classifier"] == "cls.classifier.1"
