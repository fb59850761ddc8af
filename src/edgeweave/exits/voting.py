"""Weighted softmax voting for samples that pass no exit's threshold (EdgeKE): the answer is
argmax of sum_k w_k * softmax(logits_k) over every exit the sample went through."""

from __future__ import annotations

from typing import Sequence

import torch

from edgeweave.errors import EdgeweaveError


def default_voting_weights(num_exits: int) -> list[float]:
    """Deeper exits are more accurate, so they weigh more: w_k proportional to k + 1.

    (EdgeKE leaves the weights as a parameter; this is our default, stored with each operating
    point so results are reproducible.)"""
    total = num_exits * (num_exits + 1) / 2
    return [(k + 1) / total for k in range(num_exits)]


def check_weights(weights: Sequence[float] | None, num_exits: int) -> list[float]:
    if weights is None:
        return default_voting_weights(num_exits)
    w = [float(v) for v in weights]
    if len(w) != num_exits or any(v < 0 for v in w) or sum(w) <= 0:
        raise EdgeweaveError(f"voting weights must be {num_exits} non-negative numbers with a positive sum, got {w}")
    return w


def vote_probs(probs_per_exit: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """The vote as a distribution (N, C): the weighted mean of the per-exit probabilities, so a
    voted answer can report a score like an exit's."""
    if len(probs_per_exit) != len(weights):
        raise ValueError("one weight per exit")
    acc = sum(w * p for w, p in zip(weights, probs_per_exit))
    return acc / sum(weights)  # type: ignore[operator]


def vote(probs_per_exit: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Class index per row from the weighted sum of per-exit probability matrices (N, C)."""
    return vote_probs(probs_per_exit, weights).argmax(dim=-1)
