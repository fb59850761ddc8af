"""Early-exit inference: the trunk runs once, segment by segment, and each sample leaves at
the first exit whose confidence reaches that exit's threshold.

Batched: after each exit the samples that left are dropped from the running batch, so the
remaining segments only compute what is still needed; every sample gets exactly the answer it
would get alone (BN is in eval mode, so samples never interact). Thresholds: one per exit;
``NEVER`` (2.0, above any confidence) skips an exit, ``ALWAYS`` (0.0) takes it. A sample still
unsure at the last exit gets the weighted softmax vote of all exits (``voting.vote``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from edgeweave.errors import EdgeweaveError
from edgeweave.exits.confidence import confidence as confidence_of
from edgeweave.exits.voting import check_weights, vote_probs
from edgeweave.models.multi_exit import MultiExitNet

NEVER = 2.0
ALWAYS = 0.0


@dataclass
class ExitResult:
    pred: torch.Tensor  # (N,) class index
    exit_index: torch.Tensor  # (N,) exit the sample left at (the last exit for voted samples)
    voted: torch.Tensor  # (N,) bool: no exit was confident, the answer is the weighted vote
    confidence: torch.Tensor  # (N,) confidence at the exit it left from
    probs: torch.Tensor  # (N, C) what the answer was taken from: the exit's softmax, or the vote's


def forced_exit_thresholds(num_exits: int, k: int) -> list[float]:
    """Every sample leaves at exit ``k`` (segments after it never run)."""
    if not 0 <= k < num_exits:
        raise EdgeweaveError(f"exit {k} out of range 0..{num_exits - 1}")
    return [NEVER] * k + [ALWAYS] + [ALWAYS] * (num_exits - k - 1)


def check_thresholds(thresholds: Sequence[float], num_exits: int) -> list[float]:
    t = [float(v) for v in thresholds]
    if len(t) != num_exits:
        raise EdgeweaveError(f"need {num_exits} thresholds (one per exit), got {len(t)}")
    return t


@torch.no_grad()
def early_exit(model: MultiExitNet, x: torch.Tensor, thresholds: Sequence[float], *,
               voting_weights: Sequence[float] | None = None, confidence: str = "max_softmax") -> ExitResult:
    """Classify a batch with early exits; see the module docstring."""
    k_exits = model.num_exits
    thr = check_thresholds(thresholds, k_exits)
    weights = check_weights(voting_weights, k_exits)
    n = x.shape[0]
    pred = torch.full((n,), -1, dtype=torch.long)
    exit_index = torch.full((n,), -1, dtype=torch.long)
    voted = torch.zeros(n, dtype=torch.bool)
    conf_out = torch.zeros(n)
    probs_out: torch.Tensor | None = None
    alive = torch.arange(n)
    history: list[torch.Tensor] = []  # per-exit probabilities of the samples still running
    h = x
    for k in range(k_exits):
        h = model.run_segment(k, h)
        probs = F.softmax(model.run_head(k, h), dim=-1)
        if probs_out is None:
            probs_out = probs.new_zeros(n, probs.shape[-1])
        history.append(probs)
        conf = confidence_of(probs, confidence)
        leave = conf >= thr[k]
        last = k == k_exits - 1
        if last:
            stay_voted = ~leave
            if stay_voted.any():
                probs = torch.where(stay_voted.unsqueeze(-1), vote_probs(history, weights), probs)
            pred[alive], exit_index[alive], voted[alive], conf_out[alive] = probs.argmax(-1), k, stay_voted, conf
            probs_out[alive] = probs
            break
        if leave.any():
            idx = alive[leave]
            pred[idx], exit_index[idx], conf_out[idx] = probs[leave].argmax(-1), k, conf[leave]
            probs_out[idx] = probs[leave]
        keep = ~leave
        if not keep.any():
            break
        if not keep.all():
            alive, h = alive[keep], h[keep]
            history = [p[keep] for p in history]
    assert probs_out is not None  # check_thresholds: at least one exit
    return ExitResult(pred, exit_index, voted, conf_out, probs_out)


@torch.no_grad()
def all_exit_probs(model: MultiExitNet, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax of every exit for every sample of ``loader``: ((N, K, C) probabilities, (N,) labels).
    Calibration works on this (the trunk runs once per sample for all exits)."""
    model.eval()
    probs, labels = [], []
    for x, y in loader:
        outs = model.forward_all(x)
        probs.append(torch.stack([F.softmax(o, -1) for o in outs], 1))
        labels.append(y)
    return torch.cat(probs), torch.cat(labels)


def simulate(probs: torch.Tensor, thresholds: Sequence[float], *, voting_weights: Sequence[float] | None = None,
             confidence: str = "max_softmax") -> ExitResult:
    """What ``early_exit`` would answer, from precomputed per-exit probabilities (N, K, C).

    Pure and cheap: used to calibrate and to check proportions/accuracy without timing."""
    n, k_exits, _ = probs.shape
    thr = check_thresholds(thresholds, k_exits)
    weights = check_weights(voting_weights, k_exits)
    conf = torch.stack([confidence_of(probs[:, k], confidence) for k in range(k_exits)], 1)
    passed = conf >= torch.tensor(thr).unsqueeze(0)
    any_pass = passed.any(1)
    first = torch.where(any_pass, passed.float().argmax(1), torch.full((n,), k_exits - 1))
    rows = torch.arange(n)
    pred = probs[rows, first].argmax(-1)
    voted = ~any_pass
    chosen = probs[rows, first]
    if voted.any():
        chosen = torch.where(voted.unsqueeze(-1), vote_probs([probs[:, k] for k in range(k_exits)], weights), chosen)
        pred = torch.where(voted, chosen.argmax(-1), pred)
    return ExitResult(pred, first, voted, conf[rows, first], chosen)
