"""What every reporting command prints for scripts: one JSON object on its last line (``--json``)."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["print_json"]


def print_json(obj: Any) -> None:
    """Prints ``obj`` as one line of JSON (keys sorted; values JSON cannot hold as their ``str``)."""
    print(json.dumps(obj, sort_keys=True, default=str))
