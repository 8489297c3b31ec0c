"""Placement by role: the Ray Train workers on the training nodes, the Ray Data decode tasks on the data nodes.

Nodes say their role in a label (``revcol/role: head | train | data``, as ``infra/`` starts them; the key and the
values are the recipe's ``scaling.role_label``, ``scaling.train_role`` and ``scaling.data_role``).
:func:`resolve_placement` turns the recipe's ``scaling`` section and the cluster's alive nodes into a
:class:`Placement`: the label selector of the workers (``ray.train.ScalingConfig(label_selector=…)``), that of the
decode tasks (``map_batches(label_selector=…)``) and the decode CPU budget, ``scaling.data_cpus: all`` being every
CPU of the data nodes. Under ``scaling.placement: auto`` (the default) a role that no alive node carries falls back
to what a cluster without labels does: that work goes wherever Ray's scheduler puts it (one machine, an
unlabelled cluster). ``by_role`` refuses such a cluster instead, naming the label; ``anywhere`` ignores labels.

Only nodes that are up count: on an autoscaling cluster whose nodes of a role start from zero, ``auto`` places that
role's work anywhere and ``by_role`` refuses; keep at least one node of each role up (``min_workers: 1``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pipeline.config import ScalingConfig

__all__ = ["Placement", "resolve_placement"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    """Where a stage's work runs.

    Attributes:
        train_selector: Label selector of the Ray Train workers; None: wherever Ray places them.
        data_selector: Label selector of the decode tasks; None: wherever Ray places them.
        data_cpus: CPU budget of the decode tasks (``scaling.data_cpus`` with ``all`` resolved).
        train_nodes: Alive nodes that ``train_selector`` matches (0 without one).
        data_nodes: Alive nodes that ``data_selector`` matches (0 without one).
    """

    train_selector: dict[str, str] | None
    data_selector: dict[str, str] | None
    data_cpus: float
    train_nodes: int = 0
    data_nodes: int = 0

    def describe(self) -> str:
        """One line for the job log: where the workers and the decode tasks run."""

        def where(selector: dict[str, str] | None, nodes: int) -> str:
            if selector is None:
                return "wherever Ray places them (no node selected by label)"
            (key, value), = selector.items()
            return f"on the {nodes} node(s) labelled {key}={value}"

        return (f"Ray Train workers {where(self.train_selector, self.train_nodes)}; decode tasks "
                f"({self.data_cpus:g} CPUs) {where(self.data_selector, self.data_nodes)}")


def resolve_placement(scaling: ScalingConfig, *, nodes: list[dict[str, Any]] | None = None) -> Placement:
    """The placement of the recipe's ``scaling`` section on a cluster, logged.

    Args:
        scaling: The recipe's ``scaling`` section.
        nodes: The cluster's nodes as ``ray.nodes()`` lists them (``Alive``, ``Labels``, ``Resources``); default:
            those of the connected Ray cluster.

    Returns:
        The :class:`Placement`.

    Raises:
        ValueError: ``placement: by_role`` and no alive node carries a role's label (the message names it), or
            ``data_cpus: all`` and no CPU is left for decoding.
    """
    if nodes is None:
        import ray

        nodes = ray.nodes()
    alive = [node for node in nodes if node.get("Alive")]

    def select(role_field: str) -> tuple[dict[str, str] | None, list[dict[str, Any]]]:
        if scaling.placement == "anywhere":
            return None, []
        role = getattr(scaling, role_field)
        matching = [node for node in alive if _role_of(node, scaling.role_label) == role]
        if matching:
            return {scaling.role_label: role}, matching
        if scaling.placement == "by_role":
            roles = sorted({_role_of(node, scaling.role_label) or "(none)" for node in alive})
            raise ValueError(
                f"scaling.placement: 'by_role', but none of the cluster's {len(alive)} alive node(s) carries the "
                f"label {scaling.role_label}={role} (scaling.{role_field}); their {scaling.role_label} values: "
                f"{roles}. Start nodes with that label, or set scaling.placement=auto to place this work anywhere"
            )
        return None, []

    train_selector, train_nodes = select("train_role")
    data_selector, data_nodes = select("data_role")
    data_cpus = scaling.data_cpus
    if data_cpus == "all":
        data_cpus = _all_data_cpus(scaling, data_nodes if data_selector is not None else alive,
                                   on_data_nodes=data_selector is not None)
    placement = Placement(train_selector=train_selector, data_selector=data_selector, data_cpus=float(data_cpus),
                          train_nodes=len(train_nodes), data_nodes=len(data_nodes))
    logger.info("placement: %s", placement.describe())
    return placement


def _role_of(node: dict[str, Any], label: str) -> str | None:
    return (node.get("Labels") or {}).get(label)


def _all_data_cpus(scaling: ScalingConfig, nodes: list[dict[str, Any]], *, on_data_nodes: bool) -> float:
    """``data_cpus: all``: every CPU of the data nodes, or without them, the cluster's CPUs less the workers'."""
    cpus = sum(float(node.get("Resources", {}).get("CPU", 0.0)) for node in nodes)
    if on_data_nodes:
        if cpus <= 0:
            raise ValueError(f"scaling.data_cpus: 'all', but the {len(nodes)} data node(s) "
                             f"({scaling.role_label}={scaling.data_role}) have no CPUs")
        return cpus
    workers = scaling.max_workers * scaling.cpus_per_worker  # an elastic run grows up to its maximum
    if cpus - workers <= 0:
        raise ValueError(
            f"scaling.data_cpus: 'all', the cluster has no data nodes ({scaling.role_label}={scaling.data_role}), "
            f"and its {cpus:g} CPUs all go to the {scaling.max_workers} workers x scaling.cpus_per_worker="
            f"{scaling.cpus_per_worker:g}: set a number of CPUs, or add data nodes"
        )
    return cpus - workers
