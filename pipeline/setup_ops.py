"""Builds DeepSpeed's JIT-compiled ops once, at install time, so no test or run pays for the compile.

`python -m pipeline.setup_ops` (run by `make install` while pip installs the rest) builds, on 2 cores (the first
figure built alone, the second beside pip): the shared-memory communication op DeepSpeed's first CPU `initialize`
needs (28–48 s), CPU Adam for offloaded optimizer state (45–66 s) and async I/O for NVMe offload (183–223 s; needs
libaio, Debian's `libaio-dev`, which `make install` installs first). An interrupted build leaves a lock file in
the torch extensions cache that makes the next build wait forever; stale locks are removed first.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

logger = logging.getLogger(__name__)

STALE_LOCK_S = 15 * 60


def _extensions_dir() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(root) if root else Path.home() / ".cache" / "torch_extensions"


def remove_stale_locks(root: Path, *, older_than_s: float = STALE_LOCK_S) -> list[Path]:
    """Deletes build lock files older than ``older_than_s`` (left by an interrupted build); returns them."""
    removed = []
    now = time.time()
    for lock in root.glob("**/lock"):
        if now - lock.stat().st_mtime > older_than_s:
            lock.unlink(missing_ok=True)
            removed.append(lock)
    return removed


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = _extensions_dir()
    for lock in remove_stale_locks(root):
        logger.info("removed stale build lock %s", lock)
    from deepspeed.comm.torch import build_shm_op
    from deepspeed.ops.op_builder import AsyncIOBuilder, CPUAdamBuilder

    steps = [
        ("CPU communication", build_shm_op),
        ("CPU Adam (optimizer offload)", CPUAdamBuilder().load),
        ("async I/O (NVMe offload)", AsyncIOBuilder().load),
    ]
    if not AsyncIOBuilder().is_compatible(verbose=False):
        logger.error("cannot build DeepSpeed's async I/O op: libaio is missing (Debian: apt-get install libaio-dev)")
        return 1
    for name, build in steps:
        start = time.perf_counter()
        build()
        logger.info("DeepSpeed %s op ready (%.0f s)", name, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
