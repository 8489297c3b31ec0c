"""What the stream skips: the kinds of bad input it counts, the error when too much is skipped, the budget."""

from __future__ import annotations

import math

__all__ = ["DataSkipError", "Unavailable", "skip_budget"]

# Kinds of skipped input (keys of the skip counters).
SKIP_MISSING_SHARD = "missing shard"
SKIP_UNREADABLE_SHARD = "unreadable shard"
SKIP_TRUNCATED = "truncated tar"
SKIP_NO_IMAGE = "missing image"
SKIP_BAD_IMAGE = "undecodable image"
SKIP_NO_LABEL = "missing label"
SKIP_BAD_LABEL = "bad label"
SKIP_TRANSFORM = "transform failed"


class DataSkipError(RuntimeError):
    """More input was skipped than ``DataConfig.max_skipped_frac`` allows; the message names the shards."""


def skip_budget(total: int, frac: float) -> int:
    """Samples of ``total`` that may be skipped at ``data.max_skipped_frac=frac``."""
    return int(math.floor(total * frac + 1e-9))


class Unavailable(Exception):
    """A shard or sample that cannot be used, with its skip kind (one of the ``SKIP_*`` names)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail
