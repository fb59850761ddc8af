"""How sure an exit is about a sample: a score in [0, 1] from its softmax, compared with the
exit's threshold.

- ``max_softmax`` (EdgeKE, BranchyNet-style): the largest class probability.
- ``entropy``: 1 - H(p) / log(C), so 1 means one-hot and 0 means uniform (same direction as
  max-softmax, so the same ">= threshold leaves" rule and calibration apply).
"""

from __future__ import annotations

import math

import torch

from edgeweave.errors import EdgeweaveError

CONFIDENCES = ("max_softmax", "entropy")


def confidence(probs: torch.Tensor, kind: str = "max_softmax") -> torch.Tensor:
    """Per-row confidence of a (N, C) probability matrix."""
    if kind == "max_softmax":
        return probs.max(dim=-1).values
    if kind == "entropy":
        c = probs.shape[-1]
        h = -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1)
        return 1.0 - h / math.log(c) if c > 1 else torch.ones_like(h)
    raise EdgeweaveError(f"unknown confidence {kind!r}; expected one of {', '.join(CONFIDENCES)}")
