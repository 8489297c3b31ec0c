"""The cluster a recipe is planned for: :class:`ClusterShape`, per worker, from the recipe's ``scaling`` section,
a cluster declared in ``infra/clusters.yaml`` (``revcol plan --cluster NAME``) and the command line, in rising
precedence.

``infra/clusters.yaml`` declares the node types of every cluster definition under ``infra/`` (its format is
described in the file): :func:`load_node_shapes` reads and checks it, :func:`declared_cluster` turns one cluster into
what a plan needs (:class:`DeclaredCluster`): the training workers it holds (``gpus × max_nodes`` over the ``train``
node types), GPU memory per worker, host memory per worker (a training node's ``ram_gib / gpus``) and the CPUs of
its training and data nodes. Where training node types differ, the smallest per-worker figure is planned for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.config import Recipe

DEFAULT_CLUSTERS_FILE = Path(__file__).resolve().parents[2] / "infra" / "clusters.yaml"
"""``infra/clusters.yaml`` of the checkout this package runs from."""

NODE_ROLES = ("head", "train", "data")
"""Values of a node type's ``role`` (the ``revcol/role`` node label)."""

_SHAPE_FIELDS: dict[str, type | tuple[type, ...]] = {
    "role": str,
    "gpus": int,
    "gpu_mem_gib": (int, float),
    "cpus": int,
    "ram_gib": (int, float),
    "min_nodes": int,
    "max_nodes": int,
}


@dataclass(frozen=True)
class DeclaredCluster:
    """What a plan takes from a cluster declared in ``infra/clusters.yaml``.

    Attributes:
        name: the cluster's name in the file.
        workers: Ray Train workers it holds at most: ``gpus × max_nodes`` summed over its ``train`` node types.
        gpu_mem_gib: GPU memory per worker, GiB (the smallest of its training node types).
        host_mem_gib: host memory per worker, GiB: a training node's ``ram_gib / gpus`` (the smallest).
        cpus: CPUs Ray schedules work on, over its training and data nodes at ``max_nodes``: what the workers'
            trainer CPUs and the recipe's data CPUs share.
        gpus_per_node: GPUs of a training node (the most of its training node types).
        path: the file it was read from.
    """

    name: str
    workers: int
    gpu_mem_gib: float
    host_mem_gib: float
    cpus: int
    gpus_per_node: int
    path: str


def load_node_shapes(cluster: str | None = None, *, path: str | Path = DEFAULT_CLUSTERS_FILE) -> dict[str, Any]:
    """Reads ``infra/clusters.yaml`` and checks its format.

    Args:
        cluster: a cluster name (``aws``, ``local``, ``k8s``) to get its ``{node_type: shape}``; None for all
            clusters as ``{cluster: {"source": ..., "node_types": {...}}}``.
        path: the file to read.

    Returns:
        Shapes as plain dicts: ``role``, ``gpus``, ``gpu_type`` (with GPUs), ``gpu_mem_gib``, ``cpus``, ``ram_gib``,
        ``min_nodes``, ``max_nodes`` and optionally ``instance_type``.

    Raises:
        ValueError: naming the first bad entry, or an unknown ``cluster`` (with the known names).
        FileNotFoundError: no file at ``path``.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no clusters file at {path}")
    doc = yaml.safe_load(path.read_text())
    if not isinstance(doc, dict) or doc.get("schema") != 1 or not isinstance(doc.get("clusters"), dict):
        raise ValueError(f"{path}: expected 'schema: 1' and a 'clusters' mapping")
    for name, entry in doc["clusters"].items():
        if set(entry) != {"source", "node_types"} or not entry["node_types"]:
            raise ValueError(f"clusters.{name}: needs exactly 'source' and a non-empty 'node_types'")
        for node_type, shape in entry["node_types"].items():
            where = f"clusters.{name}.node_types.{node_type}"
            allowed = set(_SHAPE_FIELDS) | {"gpu_type", "instance_type"}
            if unknown := set(shape) - allowed:
                raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}")
            for key, kind in _SHAPE_FIELDS.items():
                if not isinstance(shape.get(key), kind) or isinstance(shape.get(key), bool):
                    raise ValueError(f"{where}.{key}: missing or not {kind}")
                if key != "role" and shape[key] < 0:
                    raise ValueError(f"{where}.{key}: negative")
            if shape["role"] not in NODE_ROLES:
                raise ValueError(f"{where}.role: {shape['role']!r} not in {NODE_ROLES}")
            if shape["min_nodes"] > shape["max_nodes"]:
                raise ValueError(f"{where}: min_nodes > max_nodes")
            if (shape["gpus"] > 0) != (shape["gpu_mem_gib"] > 0) or (shape["gpus"] > 0) != ("gpu_type" in shape):
                raise ValueError(f"{where}: gpus, gpu_mem_gib and gpu_type go together")
    if cluster is None:
        return doc["clusters"]
    if cluster not in doc["clusters"]:
        raise ValueError(f"unknown cluster {cluster!r} in {path}; known: {', '.join(sorted(doc['clusters']))}")
    return doc["clusters"][cluster]["node_types"]


def declared_cluster(name: str, *, path: str | Path = DEFAULT_CLUSTERS_FILE) -> DeclaredCluster:
    """The shape a plan takes from cluster ``name`` of ``infra/clusters.yaml`` (see :class:`DeclaredCluster`).

    Args:
        name: the cluster's name in the file.
        path: the file to read.

    Returns:
        The declared cluster.

    Raises:
        ValueError: an unknown name (the known ones listed), a bad file, or a cluster without training GPUs.
    """
    shapes = load_node_shapes(name, path=path)
    train = [s for s in shapes.values() if s["role"] == "train" and s["gpus"] > 0 and s["max_nodes"] > 0]
    if not train:
        raise ValueError(f"cluster {name!r} in {path} declares no training node with GPUs")
    return DeclaredCluster(
        name=name,
        workers=sum(s["gpus"] * s["max_nodes"] for s in train),
        gpu_mem_gib=float(min(s["gpu_mem_gib"] for s in train)),
        host_mem_gib=float(min(s["ram_gib"] / s["gpus"] for s in train)),
        cpus=sum(s["cpus"] * s["max_nodes"] for s in shapes.values() if s["role"] in ("train", "data")),
        gpus_per_node=max(s["gpus"] for s in train),
        path=str(path),
    )


@dataclass(frozen=True)
class ClusterShape:
    """The cluster a recipe is planned for, per worker (one worker = one GPU when ``use_gpu``).

    Attributes:
        workers: data-parallel workers (the ZeRO world size).
        use_gpu: workers train on GPUs; otherwise on CPU, and device memory is host memory.
        gpu_mem_gib: GPU memory per worker, GiB.
        host_mem_gib: host memory per worker, GiB; None: not checked.
        cpus_per_worker: CPU cores available per worker; None: not checked.
        gpus_per_node: GPUs per node (only for DeepSpeed's estimator, which splits by node).
        name: the declared cluster planned for (``infra/clusters.yaml``); None: none.
        sources: where each value came from (``recipe``, ``cluster NAME``, ``cli`` or ``default``).
    """

    workers: int
    use_gpu: bool = True
    gpu_mem_gib: float = 80.0
    host_mem_gib: float | None = None
    cpus_per_worker: float | None = None
    gpus_per_node: int = 8
    name: str | None = None
    sources: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.gpu_mem_gib <= 0:
            raise ValueError(f"gpu memory must be > 0 GiB, got {self.gpu_mem_gib}")
        if self.host_mem_gib is not None and self.host_mem_gib <= 0:
            raise ValueError(f"host memory must be > 0 GiB, got {self.host_mem_gib}")
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            raise ValueError(f"cpus per worker must be > 0, got {self.cpus_per_worker}")

    @classmethod
    def from_recipe(
        cls,
        recipe: Recipe,
        *,
        workers: int | None = None,
        gpu_mem_gib: float | None = None,
        host_mem_gib: float | None = None,
        cpus_per_worker: float | None = None,
        declared: DeclaredCluster | None = None,
    ) -> ClusterShape:
        """The recipe's ``scaling`` section, with its values replaced by a declared cluster's, and any value
        replaced by the given ones.

        Args:
            recipe: the validated recipe.
            workers: workers instead of ``scaling.num_workers`` (0 there means one in-process worker) or the
                declared cluster's; at most the declared cluster's.
            gpu_mem_gib: GPU memory per worker instead of ``scaling.gpu_memory_gb`` (80 when neither is set).
            host_mem_gib: host memory per worker instead of ``scaling.memory_per_worker_gb``.
            cpus_per_worker: cores per worker instead of ``scaling.cpus_per_worker``; from a declared cluster, its
                CPUs shared by the workers (so the check reads: workers × ``scaling.cpus_per_worker`` +
                ``scaling.data_cpus`` within the cluster's CPUs).
            declared: a cluster of ``infra/clusters.yaml`` (:func:`declared_cluster`): its workers, GPU and host
                memory per worker and CPUs replace the recipe's.

        Returns:
            The cluster shape, with ``sources`` saying where each value came from.

        Raises:
            ValueError: more ``workers`` than the declared cluster holds, or a value out of range.
        """
        sc = recipe.scaling
        sources = {}
        d = declared
        if d is not None and workers is not None and workers > d.workers:
            raise ValueError(f"--workers {workers}: cluster {d.name!r} holds at most {d.workers} training workers")

        def pick(name: str, given: Any, from_cluster: Any, from_recipe: Any, default: Any) -> Any:
            if given is not None:
                sources[name] = "cli"
                return given
            if from_cluster is not None:
                sources[name] = f"cluster {d.name}"
                return from_cluster
            if from_recipe is not None:
                sources[name] = "recipe"
                return from_recipe
            sources[name] = "default"
            return default

        # an elastic range is planned at its minimum: ZeRO's per-worker share is the largest there
        n = pick("workers", workers, d and d.workers, sc.min_workers, 1)
        return cls(
            workers=n,
            use_gpu=sc.use_gpu,
            gpu_mem_gib=pick("gpu_mem_gib", gpu_mem_gib, d and d.gpu_mem_gib, sc.gpu_memory_gb, 80.0),
            host_mem_gib=pick("host_mem_gib", host_mem_gib, d and d.host_mem_gib, sc.memory_per_worker_gb, None),
            cpus_per_worker=pick("cpus_per_worker", cpus_per_worker, d and d.cpus / n, None, None),
            gpus_per_node=d.gpus_per_node if d is not None else 8,
            name=d.name if d is not None else None,
            sources=sources,
        )
