"""NEU-CLS pipeline on generated images in the original layout: train -> compact -> train ->
prune (one step) -> reload -> distributed run on 2 local workers, through the real commands
(docs/neucls.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from edgeweave.checkpoint import load_checkpoint
from edgeweave.cli import compress as compress_cli
from edgeweave.cli import train as train_cli
from edgeweave.compress.stats import count_params
from edgeweave.data import load_dataset
from edgeweave.models.compact_blocks import ChannelAttention, CompactConv
from edgeweave.training.loop import evaluate, make_loader

torch.set_num_threads(1)
PREFIXES = ["Cr", "In", "Pa", "PS", "RS", "Sc"]


def make_neucls(root: Path, per_class: int = 6, side: int = 32) -> Path:
    """Flat original layout (ROOT/Cr_1.bmp ...), grayscale; each class a stripe frequency + noise."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    rows = np.arange(side)[:, None] * np.ones((1, side))
    for c, pre in enumerate(PREFIXES):
        for i in range(1, per_class + 1):
            img = 128 + 90 * np.sin(rows * (c + 1) * np.pi / side) + rng.normal(0, 20, (side, side))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="L").save(root / f"{pre}_{i}.bmp")
    return root


def _app() -> typer.Typer:
    # Only the commands this pipeline uses: other areas' in-progress commands stay out of the way.
    app = typer.Typer()
    train_cli.register(app)
    compress_cli.register(app)
    return app


def _invoke(app: typer.Typer, args: list[str], out: Path) -> dict:
    res = CliRunner().invoke(app, [*args, "--json", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return json.loads(out.read_text())


@pytest.mark.slow
def test_neucls_train_compact_prune_reload(tmp_path: Path) -> None:
    data = make_neucls(tmp_path / "NEU-CLS")
    app, common = _app(), ["--dataset", "neucls", "--root", str(data), "--input-size", "32"]
    tr = _invoke(app, ["train", "--model", "resnet18", *common, "--epochs", "1", "--batch-size", "8",
                       "--lr", "0.01", "--out", str(tmp_path / "base")], tmp_path / "train.json")
    base_ckpt = tmp_path / "base" / "best.safetensors"
    assert tr["checkpoint"] == str(base_ckpt) and base_ckpt.is_file()

    cp = _invoke(app, ["compress", "compact", "--model", str(base_ckpt), "--out", str(tmp_path / "compact.safetensors"),
                       "--repeats", "1"], tmp_path / "compact.json")
    assert cp["input_shape"] == [1, 1, 32, 32] and cp["replaced"] == 16  # resnet18: 16 3x3 convs in its blocks
    assert cp["after"]["flops"] < cp["before"]["flops"] and cp["after"]["latency_s"] > 0
    assert cp["spec"]["name"] == "compact" and cp["spec"]["kwargs"]["base"] == "resnet18"

    tc = _invoke(app, ["train", "--model", str(tmp_path / "compact.safetensors"), *common, "--epochs", "1",
                       "--batch-size", "8", "--lr", "0.01", "--out", str(tmp_path / "ctrain")], tmp_path / "ctrain.json")
    compact_ckpt = Path(tc["checkpoint"])

    pr = _invoke(app, ["compress", "prune", "--checkpoint", str(compact_ckpt), *common, "--step", "0.5", "--max-ratio", "0.5",
                       "--min-accuracy", "0", "--finetune-epochs", "1", "--batch-size", "8",
                       "--out", str(tmp_path / "pruned.safetensors")], tmp_path / "prune.json")
    assert [s["step"] for s in pr["steps"]] == [0, 1] and all(s["accepted"] for s in pr["steps"])
    assert pr["final"]["params"] < pr["steps"][0]["params"] and pr["flops_ratio"] < 1
    assert all(s["latency_s"] > 0 and 0 <= s["val_accuracy"] <= 1 for s in pr["steps"])

    model, spec, extra = load_checkpoint(tmp_path / "pruned.safetensors")
    assert spec.name == "compact" and spec.num_classes == 6 and spec.in_channels == 1
    assert count_params(model) == pr["final"]["params"]
    assert extra["pruning"]["kept_step"] == 1
    blocks = [m for m in model.modules() if isinstance(m, CompactConv)]
    assert len(blocks) == 16 and all(isinstance(b.attn, ChannelAttention) for b in blocks)
    unpruned = [m for m in load_checkpoint(compact_ckpt)[0].modules() if isinstance(m, CompactConv)]
    # the attention Linear is pruned with its block's 3x3 conv, both sides, in every block
    assert all(b.attn.fc.in_features == b.attn.fc.out_features == b.conv.out_channels < u.attn.fc.in_features
               for b, u in zip(blocks, unpruned))
    bundle = load_dataset("neucls", data, input_size=32)
    assert evaluate(model, make_loader(bundle.test, 64, False)) == pytest.approx(extra["test_accuracy"])

    # distribute: the runtime's command runs the pruned compact model on 2 local workers, exactly
    proc = subprocess.run([sys.executable, "-m", "edgeweave", "run", "--model", str(tmp_path / "pruned.safetensors"),
                           "--input-size", "32", "--workers", "2", "--check", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = json.loads(proc.stdout)
    assert run["rel_err"] < 1e-4 and run["latency_s"] > 0


def test_prune_rejects_mismatched_dataset(tmp_path: Path) -> None:
    from edgeweave.checkpoint import ModelSpec, save_checkpoint
    from edgeweave.models import build_model

    ckpt = save_checkpoint(tmp_path / "m.safetensors", build_model("compact_small_cnn", num_classes=3, in_channels=1, width=4),
                           ModelSpec("compact_small_cnn", 3, 1, (12, 12), {"width": 4}))
    data = make_neucls(tmp_path / "neu", per_class=3, side=12)
    proc = subprocess.run([sys.executable, "-m", "edgeweave", "compress", "prune", "--checkpoint", str(ckpt),
                           "--dataset", "neucls", "--root", str(data)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "is for 3 classes" in proc.stderr, proc.stderr
