"""The cluster a recipe is planned for: :class:`ClusterShape`, per worker, from the recipe's ``scaling`` section
with any value replaced from the command line."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.config import Recipe


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
        sources: where each value came from (``recipe``, ``cli`` or ``default``).
    """

    workers: int
    use_gpu: bool = True
    gpu_mem_gib: float = 80.0
    host_mem_gib: float | None = None
    cpus_per_worker: float | None = None
    gpus_per_node: int = 8
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
    ) -> ClusterShape:
        """The recipe's ``scaling`` section, with any of its values replaced by the given ones.

        Args:
            recipe: the validated recipe.
            workers: workers instead of ``scaling.num_workers`` (0 there means one in-process worker).
            gpu_mem_gib: GPU memory per worker instead of ``scaling.gpu_memory_gb`` (80 when neither is set).
            host_mem_gib: host memory per worker instead of ``scaling.memory_per_worker_gb``.
            cpus_per_worker: cores per worker instead of ``scaling.cpus_per_worker``.

        Returns:
            The cluster shape, with ``sources`` saying where each value came from.
        """
        sc = recipe.scaling
        sources = {}

        def pick(name: str, given: Any, from_recipe: Any, default: Any) -> Any:
            if given is not None:
                sources[name] = "cli"
                return given
            if from_recipe is not None:
                sources[name] = "recipe"
                return from_recipe
            sources[name] = "default"
            return default

        return cls(
            workers=pick("workers", workers, max(sc.num_workers, 1), 1),
            use_gpu=sc.use_gpu,
            gpu_mem_gib=pick("gpu_mem_gib", gpu_mem_gib, sc.gpu_memory_gb, 80.0),
            host_mem_gib=pick("host_mem_gib", host_mem_gib, sc.memory_per_worker_gb, None),
            cpus_per_worker=pick("cpus_per_worker", cpus_per_worker, None, None),
            sources=sources,
        )
