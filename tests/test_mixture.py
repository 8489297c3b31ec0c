"""Weighted multi-source mixtures without Ray: the sampler, the label maps, the recipe keys, resolving real shards."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import RecipeError, parse_recipe
from pipeline.data.stream.mixture import MixtureOrder, label_maps


def _sources(*shape: tuple[int, int]) -> list[np.ndarray]:
    """Per source ``(shards, samples per shard)``: its shard sizes."""
    return [np.full(shards, samples, dtype=np.int64) for shards, samples in shape]


def _plan(shard_samples: list[np.ndarray], weights: list[float], epoch_samples: int, *,
          replacement: bool = False) -> MixtureOrder:
    return MixtureOrder.plan(shard_samples=shard_samples, weights=weights, epoch_samples=epoch_samples,
                             replacement=replacement, names=[f"s{i}" for i in range(len(weights))])


def _read(mixture: MixtureOrder, seed: int, epoch: int) -> np.ndarray:
    return mixture.order_and_slots(seed, epoch)[0][: mixture.num_slots]


def _original(mixture: MixtureOrder, shards: np.ndarray) -> np.ndarray:
    """Each stream shard's place among its source's shards (which copy left out)."""
    source = mixture.source_of(shards)
    return (shards - mixture.starts()[source]) % np.asarray(mixture.sizes)[source]


def test_order_is_a_function_of_seed_and_epoch() -> None:
    shard_samples = _sources((40, 10), (30, 10))
    mixture = _plan(shard_samples, [0.6, 0.4], 400)
    again = _plan(shard_samples, [0.6, 0.4], 400)  # another object, as another process builds it
    order, slots = mixture.order_and_slots(3, 1)
    assert np.array_equal(order, again.order_and_slots(3, 1)[0])
    assert sorted(order.tolist()) == list(range(mixture.num_shards)) and np.array_equal(order[slots], np.arange(70))
    assert not np.array_equal(_read(mixture, 3, 1), _read(mixture, 3, 2))
    assert not np.array_equal(_read(mixture, 3, 1), _read(mixture, 4, 1))
    # the sources are interleaved over the epoch, not read one after the other
    firsts = mixture.source_of(_read(mixture, 3, 1))[: mixture.num_slots // 2]
    assert set(firsts.tolist()) == {0, 1}


@pytest.mark.parametrize("weights", [[0.7, 0.3], [1, 1, 2], [5, 1]])
def test_weights_are_respected_in_samples(weights: list[float]) -> None:
    # shards of other sizes per source: a share is of samples, not of shards
    shard_samples = _sources((400, 10), (300, 25), (300, 7))[: len(weights)]
    epoch_samples = 3000
    mixture = _plan(shard_samples, weights, epoch_samples)
    for epoch in range(3):
        read = _read(mixture, 0, epoch)
        samples = Counter()
        for source, shard in zip(mixture.source_of(read).tolist(), _original(mixture, read).tolist(), strict=True):
            samples[source] += int(shard_samples[source][shard])
        for source, weight in enumerate(weights):
            share = epoch_samples * weight / sum(weights)
            assert abs(samples[source] - share) <= shard_samples[source][0] / 2 + 1e-9, (epoch, source, samples)


def test_without_replacement_each_shard_at_most_once() -> None:
    shard_samples = _sources((10, 10), (8, 10))
    mixture = _plan(shard_samples, [1, 1], 120)
    assert mixture.copies == (1, 1) and mixture.draws == (6, 6)
    subsets = set()
    for epoch in range(5):
        read = _read(mixture, 1, epoch)
        assert len(set(read.tolist())) == read.size == 12
        subsets.add(tuple(sorted(read.tolist())))
    assert len(subsets) > 1  # another subset of the sources each epoch
    with pytest.raises(ValueError, match=r"source 's1'.*set data\.replacement: true"):
        _plan(shard_samples, [1, 3], 200)


def test_with_replacement_a_small_source_repeats_evenly() -> None:
    shard_samples = _sources((50, 10), (4, 10))
    mixture = _plan(shard_samples, [1, 1], 200, replacement=True)
    assert mixture.draws == (10, 10) and mixture.copies == (1, 3) and mixture.num_shards == 50 + 12
    for epoch in range(4):
        read = _read(mixture, 2, epoch)
        assert len(set(read.tolist())) == read.size  # copies are shards of their own: samples stay unique
        small = Counter(_original(mixture, read[mixture.source_of(read) == 1]).tolist())
        assert sum(small.values()) == 10 and set(small.values()) <= {2, 3}  # every shard twice before any thrice


def test_mixture_state_roundtrip_and_checks() -> None:
    mixture = MixtureOrder(sizes=(3, 2), draws=(2, 3), copies=(1, 2))
    assert MixtureOrder.from_state(mixture.state()) == mixture
    with pytest.raises(ValueError, match="bad mixture"):
        MixtureOrder.from_state({"sizes": [3]})
    with pytest.raises(ValueError, match="cannot be drawn"):
        MixtureOrder(sizes=(3,), draws=(4,), copies=(1,))


def test_label_maps_by_name_rename_and_label_set() -> None:
    stage, maps = label_maps([["cat", "dog"], ["dog", "bird", "kitten"]], [{}, {"kitten": "cat"}], ["a", "b"], None)
    assert stage == ("cat", "dog", "bird")
    assert maps[0].tolist() == [0, 1] and maps[1].tolist() == [1, 2, 0]
    stage, maps = label_maps([["0", "1"], ["r1", "r0"]], [{}, {"r0": "0", "r1": "1"}], ["a", "b"], ["1", "0"])
    assert stage == ("1", "0") and maps[0].tolist() == [1, 0] and maps[1].tolist() == [0, 1]
    with pytest.raises(ValueError, match=r"source 'b': classes renames \['wolf'\]"):
        label_maps([["cat"], ["dog"]], [{}, {"wolf": "dog"}], ["a", "b"], None)
    with pytest.raises(ValueError, match=r"source 'b': class\(es\) \['dog'\] are not in data.classes"):
        label_maps([["cat"], ["dog"]], [{}, {}], ["a", "b"], ["cat"])


def _data(**data) -> dict:
    return {"name": "mix", "stages": [{"kind": "pretrain", "data": data}]}


SOURCES = [{"name": "upright", "shards": "/d/up", "weight": 0.7},
           {"name": "rotated", "shards": ["/d/rot/shard-000000.tar"], "weight": 0.3, "classes": {"r0": "0"}}]


def test_recipe_mixture_parses_and_survives_the_worker_roundtrip() -> None:
    recipe = parse_recipe(_data(train=SOURCES, epoch_samples=1000, replacement=True))
    data = recipe.stages[0].data
    assert [s.name for s in data.sources] == ["upright", "rotated"] and data.sources[1].classes == {"r0": "0"}
    again = parse_recipe(recipe.model_dump(mode="json"))  # what train_func rebuilds from Ray's plain dict
    assert again.stages[0].data == data
    plain = parse_recipe(_data(train=["/d/a/shard-000000.tar", "/d/a/shard-000001.tar"])).stages[0].data
    assert plain.sources == [] and plain.train == ["/d/a/shard-000000.tar", "/d/a/shard-000001.tar"]
    assert data.spec_paths("train") == ["/d/up", "/d/rot/shard-000000.tar"] and data.spec_paths("val") == []
    assert plain.spec_paths("train") == plain.train


@pytest.mark.parametrize(("data", "message"), [
    ({"train": [{**SOURCES[0], "weight": 0}]}, r"stages\.0\.data\.train: .*source 0: weight: .*greater than 0"),
    ({"train": [SOURCES[0], {**SOURCES[1], "name": "upright"}]}, r"duplicate source name\(s\) \['upright'\]"),
    ({"train": [{**SOURCES[0], "shard": "/x"}]}, r"source 0: shard: unknown key"),
    ({"train": [SOURCES[0], {"weight": 1, "shards": "/x"}]}, r"source 1: name: Field required"),
    ({"train": [SOURCES[0], "/d/a"]}, r"sources \(mappings\) and shard paths mixed"),
    ({"train": [{**SOURCES[0], "name": "up right"}]}, r"source name 'up right' may only hold"),
    ({"train": "/d/a", "epoch_samples": 100}, r"epoch_samples: apply to a mixture only"),
    ({"train": "/d/a", "replacement": True, "classes": ["a"]}, r"replacement, classes: apply to a mixture only"),
    ({"train": SOURCES, "epoch_samples": 0}, r"epoch_samples: .*greater than or equal to 1"),
    ({"train": SOURCES, "classes": ["0", "0"]}, r"classes must be unique class names"),
])
def test_recipe_mixture_errors_name_the_bad_value(data: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        parse_recipe(_data(**data))


def _image_folder(root: Path, classes: list[str], per_class: int) -> Path:
    from PIL import Image

    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (30 * k, 10 * i, 0)).save(root / name / f"{i}.png")
    return root


def test_resolve_a_mixture_of_real_shards(tmp_path: Path) -> None:
    from pipeline.config import DataConfig
    from pipeline.data.shards import write_shards
    from pipeline.data.stream import check_inputs
    from pipeline.data.stream.shard_set import resolve_split
    from pipeline.lineage import _dataset

    for name, classes in (("a", ["cat", "dog"]), ("b", ["dog", "kitten"])):
        write_shards(str(_image_folder(tmp_path / f"{name}-images", classes, 6)), str(tmp_path / name),
                     shard_size=3, progress=False)
    sources = [{"name": "a", "shards": str(tmp_path / "a"), "weight": 1},
               {"name": "b", "shards": str(tmp_path / "b"), "weight": 3, "classes": {"kitten": "cat"}}]
    data = DataConfig(train=sources, epoch_samples=24, replacement=True, val=str(tmp_path / "a"))
    shards = resolve_split(data, "train")
    assert shards.classes == ("cat", "dog") and [m.tolist() for m in shards.label_maps] == [[0, 1], [1, 0]]
    assert shards.mixture.draws == (2, 6) and shards.mixture.copies == (1, 2)
    assert shards.num_shards == 4 + 2 * 4 and shards.num_slots == 8 and shards.num_samples == 24
    assert shards.sources == ("a", "b") and len(shards.folders) == 2
    assert shards.url(4) == shards.url(8)  # a copy of a shard reads the same file
    other = resolve_split(data.model_copy(update={"epoch_samples": 12}), "train")
    assert other.fingerprint != shards.fingerprint  # another mixture: a stored position does not apply
    assert set(check_inputs(data)) == {"train", "val"}
    logged = _dataset(shards)  # the stage's MLflow dataset
    assert logged.name == "a+b" and json.loads(logged.profile)["sources"] == {"a": 2, "b": 6}
    with pytest.raises(ValueError, match="differ from the mixture's label set"):
        check_inputs(data.model_copy(update={"classes": ["dog", "cat"]}))
