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


def write_json(path: str | Path, obj: Any) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(dumps(obj) + "\n")
    return p
