"""The audit trail of a stage (``data.trace_dir``): which samples each training worker trained on, and which node
each training worker and each decode task ran on.

Every training worker process writes a sample file (``samples-rank{r}-pid{p}.txt``, one line per sample trained);
every training worker and every decode task call appends one JSON line to ``nodes.jsonl``: its role, Ray node id
and PID. On a cluster, put the folder on a mount every node shares (``scaling.shared_paths``) to collect all of them
in one place.
Both sides (workers and decode tasks) import this module: it needs only Ray.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["NODES_FILE", "open_sample_log", "record_node", "recorded_nodes", "recorded_samples"]

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


def open_sample_log(folder: str | Path, rank: int) -> Any:
    """Records the calling training worker in ``nodes.jsonl`` and opens its sample file for appending: one line
    ``epoch shard index`` per sample it trains on (the caller writes and flushes them)."""
    record_node(folder, "train_worker", rank=rank)  # creates the folder
    return open(Path(folder) / f"samples-rank{rank}-pid{os.getpid()}.txt", "a")  # noqa: SIM115 - lives for the run


def recorded_samples(folder: str | Path) -> dict[str, list[tuple[int, int, int]]]:
    """Per sample file (one per training worker process, by file name), its ``(epoch, shard, index)`` lines so far;
    a line still being written (a worker killed mid-line) is left out."""
    return {
        # the text after the last newline is a line not yet (or never) finished
        path.name: [tuple(map(int, line.split())) for line in path.read_text().split("\n")[:-1]]
        for path in sorted(Path(folder).glob("samples-*.txt"))
    }


def recorded_nodes(folder: str | Path) -> list[dict[str, Any]]:
    """The records of ``folder/nodes.jsonl`` (empty when nothing was recorded)."""
    path = Path(folder) / NODES_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
