"""The audit trail of a stage (``data.trace_dir``): which node each training worker and each decode task ran on.

Beside the per-worker sample files (``samples-rank{r}-pid{p}.txt``, written by the training loop), every training
worker and every decode task call appends one JSON line to ``nodes.jsonl``: its role, Ray node id and PID. On a
cluster, put the folder on a mount every node shares (``scaling.shared_paths``) to collect all of them in one place.
Both sides (workers and decode tasks) import this module: it needs only Ray.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["NODES_FILE", "record_node", "recorded_nodes"]

NODES_FILE = "nodes.jsonl"


def record_node(folder: str | Path, role: str, **fields: Any) -> None:
    """Appends ``{"role", "node", "pid", **fields}`` for the calling process to ``folder/nodes.jsonl``.

    Args:
        folder: The audit trail folder (``data.trace_dir``).
        role: What the caller is (``train_worker``, ``decode``).
        fields: More JSON-able facts (rank, split).
    """
    import ray

    line = json.dumps({"role": role, "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), **fields})
    Path(folder).mkdir(parents=True, exist_ok=True)
    # one short write in append mode: lines of concurrent writers do not interleave
    with open(Path(folder) / NODES_FILE, "a") as out:
        out.write(line + "\n")


def recorded_nodes(folder: str | Path) -> list[dict[str, Any]]:
    """The records of ``folder/nodes.jsonl`` (empty when nothing was recorded)."""
    path = Path(folder) / NODES_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
