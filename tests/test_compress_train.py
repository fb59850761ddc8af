"""Compact models train with the shared loop; pruning fine-tunes with it under a real floor."""

from __future__ import annotations

import torch

from edgeweave.compress.prune import finetune_with_loop, prune_with_floor, val_evaluator
from edgeweave.compress.stats import count_params
from edgeweave.data import load_dataset
from edgeweave.models import build_model
from edgeweave.training.loop import evaluate, fit, make_loader

torch.set_num_threads(1)


def test_compact_trains_then_prunes_above_floor() -> None:
    bundle = load_dataset("synthetic", seed=0, input_size=12, in_channels=1, num_classes=4, samples=512, noise=1.0)
    model = build_model("compact_small_cnn", num_classes=4, in_channels=1, width=8, ratio=2)
    res = fit(model, bundle, epochs=8, lr=0.05, batch_size=32, progress=False)
    assert res.best_accuracy > 0.8, res.history  # chance is 0.25
    val = val_evaluator(bundle)
    start = val(model)
    floor = start - 0.1
    full = count_params(model)
    pr = prune_with_floor(model, (1, 1, 12, 12), evaluate_val=val,
                          finetune=finetune_with_loop(bundle, epochs=1, lr=0.02, batch_size=32, progress=False),
                          step=0.25, max_ratio=0.75, min_accuracy=floor, latency=False)
    kept = pr.accepted
    assert kept.val_accuracy >= floor
    assert abs(evaluate(pr.model, make_loader(bundle.val, 256, False)) - kept.val_accuracy) < 1e-9
    assert count_params(pr.model) == kept.params <= full
    # every step either passed the floor or was the one undone at the end
    assert all(s.accepted for s in pr.steps[:-1])
