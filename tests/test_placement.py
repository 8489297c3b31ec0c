"""Placement by role without a cluster: the recipe keys, and :func:`resolve_placement` on node lists shaped as
``ray.nodes()`` returns them (the placement on a real multi-node cluster is in ``test_multinode.py``)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from pipeline.config import RecipeError, ScalingConfig, parse_recipe
from pipeline.placement import resolve_placement

ROLE = "revcol/role"


def _node(cpus: float, role: str | None = None, *, alive: bool = True) -> dict[str, Any]:
    return {"Alive": alive, "Labels": {ROLE: role} if role else {}, "Resources": {"CPU": cpus, "memory": 2**30}}


LABELLED = [_node(0, "head"), _node(8, "train"), _node(8, "train"), _node(16, "data"), _node(4, "data"),
            _node(32, "data", alive=False)]


def _recipe(**scaling: Any) -> dict[str, Any]:
    return {"name": "p", "scaling": scaling, "stages": [{"kind": "eval", "data": {"val": "shards"}}]}


def test_labelled_cluster_places_workers_and_decode_by_role(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="pipeline.placement"):
        placement = resolve_placement(ScalingConfig(num_workers=4, data_cpus="all"), nodes=LABELLED)
    assert placement.train_selector == {ROLE: "train"} and placement.train_nodes == 2
    assert placement.data_selector == {ROLE: "data"} and placement.data_nodes == 2
    assert placement.data_cpus == 20  # the alive data nodes' CPUs; the dead one's 32 do not count
    assert ("placement: Ray Train workers on the 2 node(s) labelled revcol/role=train; decode tasks (20 CPUs) on "
            "the 2 node(s) labelled revcol/role=data") in caplog.text
    # a number stays what it is; only the nodes are selected
    assert resolve_placement(ScalingConfig(data_cpus=3), nodes=LABELLED).data_cpus == 3


def test_unlabelled_cluster_falls_back_to_anywhere(caplog: pytest.LogCaptureFixture) -> None:
    one_node = [_node(2)]
    with caplog.at_level(logging.INFO, logger="pipeline.placement"):
        placement = resolve_placement(ScalingConfig(num_workers=2, cpus_per_worker=0.5, data_cpus="all"),
                                      nodes=one_node)
    assert placement.train_selector is None and placement.data_selector is None
    assert placement.data_cpus == 1  # 2 CPUs less the workers' 2 x 0.5
    assert "Ray Train workers wherever Ray places them" in caplog.text
    assert "decode tasks (1 CPUs) wherever Ray places them" in caplog.text
    # a cluster with training nodes but no data nodes: workers by label, decode anywhere
    partial = resolve_placement(ScalingConfig(), nodes=[_node(0, "head"), _node(8, "train")])
    assert partial.train_selector == {ROLE: "train"} and partial.data_selector is None and partial.data_cpus == 1


def test_by_role_refuses_a_cluster_without_the_label() -> None:
    with pytest.raises(ValueError) as refused:
        resolve_placement(ScalingConfig(placement="by_role"), nodes=[_node(0, "head"), _node(8, "train")])
    message = str(refused.value)
    assert "revcol/role=data (scaling.data_role)" in message and "['head', 'train']" in message
    assert "scaling.placement=auto" in message
    # other label values are honoured
    custom = ScalingConfig(placement="by_role", role_label="pool", train_role="gpu", data_role="cpu")
    nodes = [{"Alive": True, "Labels": {"pool": pool}, "Resources": {"CPU": 4}} for pool in ("gpu", "cpu")]
    placement = resolve_placement(custom, nodes=nodes)
    assert placement.train_selector == {"pool": "gpu"} and placement.data_selector == {"pool": "cpu"}
    with pytest.raises(ValueError, match="pool=gpu"):
        resolve_placement(custom, nodes=[_node(4)])


def test_anywhere_ignores_labels() -> None:
    placement = resolve_placement(ScalingConfig(placement="anywhere", num_workers=2, data_cpus="all"), nodes=LABELLED)
    assert placement.train_selector is None and placement.data_selector is None
    assert placement.data_cpus == 36 - 2  # every alive CPU less the workers'


def test_all_data_cpus_with_nothing_left_is_an_error() -> None:
    with pytest.raises(ValueError) as refused:
        resolve_placement(ScalingConfig(num_workers=2, data_cpus="all"), nodes=[_node(2)])
    assert "scaling.data_cpus: 'all'" in str(refused.value) and "scaling.cpus_per_worker=1" in str(refused.value)
    with pytest.raises(ValueError, match="have no CPUs"):
        resolve_placement(ScalingConfig(data_cpus="all"), nodes=[_node(4, "train"), _node(0, "data")])


@pytest.mark.parametrize("value", ["many", 0, -2, None, True, "2"])
def test_bad_data_cpus_is_named(value: Any) -> None:
    with pytest.raises(RecipeError) as refused:
        parse_recipe(_recipe(data_cpus=value))
    assert f"scaling.data_cpus: Value error, must be a number of CPUs > 0 or 'all' (got {value!r})" in str(refused.value)


def test_placement_keys_parse_and_bad_ones_are_named() -> None:
    scaling = parse_recipe(_recipe(data_cpus="all", placement="by_role", train_role="gpu")).scaling
    assert (scaling.data_cpus, scaling.placement, scaling.train_role, scaling.role_label) == (
        "all", "by_role", "gpu", "revcol/role")
    with pytest.raises(RecipeError, match=r"scaling.placement: .*'auto', 'by_role' or 'anywhere'.*'labels'"):
        parse_recipe(_recipe(placement="labels"))
    with pytest.raises(RecipeError, match="scaling.role_label"):
        parse_recipe(_recipe(role_label=""))


def test_elastic_cpu_workers_beside_data_nodes_are_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    from pipeline.placement import Placement
    from pipeline.train.launch import scaling_config

    placed = Placement(train_selector={ROLE: "train"}, data_selector={ROLE: "data"}, data_cpus=2.0)
    for workers, warned in (("1..2", True), (2, False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pipeline.train.launch"):
            scaling_config(parse_recipe(_recipe(num_workers=workers)), placed)
        assert ("scaling.num_workers=1..2 (elastic) with workers that ask for CPUs only" in caplog.text) == warned
