"""A benchmark's targets checked against its summary: ``{key: (op, threshold)}`` with op one of
``<``, ``<=``, ``>=``; a key the run did not measure is reported with ``met: None``."""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

_OPS = {"<": operator.lt, "<=": operator.le, ">=": operator.ge}


def targets_met(summary: Mapping[str, Any], targets: Mapping[str, tuple[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, (op, thr) in targets.items():
        v = summary.get(key)
        out[key] = {"value": v, "target": f"{op} {thr:g}", "met": None if v is None else bool(_OPS[op](v, thr))}
    return out
