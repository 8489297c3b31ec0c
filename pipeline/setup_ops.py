"""Builds DeepSpeed's JIT-compiled ops once, at install time, so no test or run pays for the compile.

`python -m pipeline.setup_ops` (run by `make install`). DeepSpeed's first `initialize` on the CPU compiles a
shared-memory communication op with g++/ninja (~3 minutes on 2 cores). An interrupted build leaves a lock file in
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
    start = time.perf_counter()
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()
    logger.info("DeepSpeed CPU communication op ready (%.0f s)", time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
