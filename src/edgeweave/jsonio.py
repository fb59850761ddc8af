"""JSON that every consumer can parse: NaN/inf become null. Shared by the CLI's ``--json`` and
the benchmarks' result files, so library code never imports the CLI package."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps(obj: Any) -> str:
    return json.dumps(json_safe(obj), indent=2)


def write_json(path: str | Path, obj: Any, parents: bool = True) -> Path:
    """Write ``obj`` to ``path``; ``parents``: make missing folders (the benchmarks' result trees;
    the CLI's ``--json PATH`` does not, see ``cli.common.check_json_target``)."""
    p = Path(path)
    if parents:
        p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(dumps(obj) + "\n")
    return p
