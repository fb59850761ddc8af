"""`edgeweave bench exits`: EdgeKE's two knobs measured on one device.

What runs (mnist5k by default; everything single-threaded, latencies at batch 1):

1. a teacher (default ``small_resnet14`` at width 32: about 4x the student's compute at full
   depth) trained with the shared loop;
2. the multi-exit student (``multi_exit_small``) trained synchronously *alone* (no teacher) and
   *distilled* with each distance (kl, js, ws), for every seed (3 by default): ``kd_gain`` is
   distilled minus alone, final-exit test accuracy, paired by seed, mean with a 95 % t-interval;
3. the other strategies (async, async_back), each alone and distilled (the distance with the
   best validation gain), seed 0;
4. the deployed student: the seed-0 distilled sync model with the best validation accuracy.
   Thresholds and operating points are calibrated on the validation split (what the policy
   uses), then every point is re-measured on the test split (what the summary reports);
5. budgeted requests: budgets spread over the calibrated p95 range, each served through the
   policy one sample at a time; ``budget_violations`` is the fraction whose measured latency
   exceeded the budget their point was chosen for. The policy scales calibrated latencies by the
   slowdown it observes on recent requests (``policy.LoadTracker``); requests it answers with
   "cannot meet this budget now" are not counted as violations but reported as
   ``budget_unsatisfied`` (fraction of all budgeted requests).

Summary keys: ``teacher_accuracy``, ``full_accuracy`` (deployed student, last exit),
``speedup_at_1pct_loss`` (largest teacher_mean_ms / point_mean_ms among test-measured points
within 1 accuracy point of the teacher), ``speedup_vs_student`` (the same against the student's
forced last exit and its accuracy), ``kd_gain`` (per distance, with ``kd_gain_best``), and
``budget_violations``. On the test split the teacher and every operating point are timed
interleaved (for each sample, each of them once, in a fresh random order), so load drifting on a shared
machine affects both sides alike.
"""

from __future__ import annotations

import csv
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeweave.console import console
from edgeweave.errors import EdgeweaveError


@dataclass
class ExitsBenchConfig:
    dataset: str = "mnist5k"
    root: str | None = None
    dataset_options: dict[str, Any] = field(default_factory=dict)
    cache_teacher: bool = True  # teacher logits computed once per training sample (no augmentation)
    teacher: str = "small_resnet14"
    teacher_kwargs: dict[str, Any] = field(default_factory=lambda: {"width": 32})
    teacher_checkpoint: str | None = None  # reuse a trained teacher instead of training one
    student: str = "multi_exit_small"
    student_kwargs: dict[str, Any] = field(default_factory=dict)
    teacher_epochs: int = 12
    student_epochs: int = 12
    lr: float = 0.05
    batch_size: int = 64
    temperature: float = 4.0
    beta: float = 0.5
    distances: tuple[str, ...] = ("kl", "js", "ws")
    seeds: int = 3
    strategies: tuple[str, ...] = ("sync", "async", "async_back")
    budgets: int = 20
    requests_per_budget: int = 50
    calib_limit: int | None = None
    test_limit: int | None = None

    @classmethod
    def quick(cls, **kw: Any) -> "ExitsBenchConfig":
        base = dict(teacher_epochs=8, student_epochs=6, budgets=12, requests_per_budget=40)
        base.update(kw)
        return cls(**base)


RECIPES = ("edgeke-cifar100",)


def recipe_config(name: str, **overrides: Any) -> ExitsBenchConfig:
    """The paper's setting as one config. ``edgeke-cifar100``: CIFAR-100 from a local folder
    (``--root``, torchvision layout, with crop+flip augmentation), teacher ``cifar_resnet34``,
    student ``multi_exit_resnet18`` with EdgeKE's three exits, 400 epochs each, SGD lr 0.1,
    momentum 0.9, weight decay 5e-4, batch 128, step decay x0.1 at 50 % and 75 % of training
    (the shared loop's schedule), KD with T=1 and beta=0.1 (the values in EdgeKE's README
    examples), one seed unless ``seeds`` is given. Meant for a GPU-class machine: on a 2-core CPU
    it would take weeks."""
    if name != "edgeke-cifar100":
        raise EdgeweaveError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    base: dict[str, Any] = dict(dataset="cifar100", teacher="cifar_resnet34", teacher_kwargs={}, student="multi_exit_resnet18",
                                student_kwargs={}, teacher_epochs=400, student_epochs=400, lr=0.1, batch_size=128,
                                temperature=1.0, beta=0.1, seeds=1, cache_teacher=False, requests_per_budget=100, calib_limit=2000,
                                test_limit=2000)
    base.update(overrides)
    if not base.get("root"):
        raise EdgeweaveError("the edgeke-cifar100 recipe needs --root pointing at a local CIFAR-100 folder")
    return ExitsBenchConfig(**base)


def _t_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95 % Student-t interval."""
    a = np.asarray(values, dtype=float)
    m = float(a.mean())
    if a.size < 2:
        return m, float("nan"), float("nan")
    from scipy import stats

    h = float(stats.t.ppf(0.975, a.size - 1) * a.std(ddof=1) / math.sqrt(a.size))
    return m, m - h, m + h


def _plot(path: Path, test_points, teacher: dict, student_full: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    pts = sorted(test_points, key=lambda p: p.mean_ms)
    ax.scatter([p.mean_ms for p in pts], [100 * p.accuracy for p in pts], s=18, label="student operating points")
    front, best = [], -1.0
    for p in pts:
        if p.accuracy > best:
            best = p.accuracy
            front.append(p)
    ax.plot([p.mean_ms for p in front], [100 * p.accuracy for p in front], "-", lw=1)
    ax.scatter([teacher["mean_ms"]], [100 * teacher["accuracy"]], marker="*", s=120, c="C3", label="teacher")
    ax.scatter([student_full["mean_ms"]], [100 * student_full["accuracy"]], marker="s", s=40, c="C2",
               label="student, full depth")
    ax.axhline(100 * (teacher["accuracy"] - 0.01), ls=":", c="C3", lw=1, label="teacher - 1 point")
    ax.set_xlabel("mean latency per sample, batch 1, 1 thread (ms)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_exits_bench(cfg: ExitsBenchConfig | None = None, *, out_dir: str | Path = "results", progress: bool = True) -> dict[str, Any]:
    """Run the benchmark described in the module docstring; returns the JSON-able result and
    writes ``exits_<dataset>.png`` and ``exits_<dataset>_points.csv`` under ``out_dir``."""
    from edgeweave.checkpoint import ModelSpec, save_checkpoint
    from edgeweave.compress.distill import CachedTeacher
    from edgeweave.data import load_dataset
    from edgeweave.exits.calibrate import calibrate, dataset_tensors
    from edgeweave.exits.evaluate import best_speedup, budget_grid, measure_plain_model, remeasure, serve_budgets
    from edgeweave.exits.ondemand import OnDemandModel, exits_extra
    from edgeweave.exits.train import train_multi_exit
    from edgeweave.models import build_model
    from edgeweave.training.loop import fit

    cfg = cfg or ExitsBenchConfig()
    out = Path(out_dir)
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    bundle = load_dataset(cfg.dataset, cfg.root, **cfg.dataset_options)
    nc, ic = bundle.num_classes, bundle.in_channels
    fit_kw = dict(lr=cfg.lr, batch_size=cfg.batch_size, progress=progress)

    # 1. teacher
    if cfg.teacher_checkpoint:
        from edgeweave.checkpoint import load_checkpoint

        teacher, tspec, textra = load_checkpoint(cfg.teacher_checkpoint)
        console.rule(f"bench exits: teacher {tspec.name} {tspec.kwargs} from {cfg.teacher_checkpoint}")
        t_epochs, t_seconds = textra.get("epoch"), None
    else:
        console.rule(f"bench exits: teacher {cfg.teacher} {cfg.teacher_kwargs}")
        teacher = build_model(cfg.teacher, num_classes=nc, in_channels=ic, **cfg.teacher_kwargs)
        tr = fit(teacher, bundle, epochs=cfg.teacher_epochs, seed=0, **fit_kw)
        t_epochs, t_seconds = tr.epochs, tr.seconds
        console.print(f"teacher test accuracy {tr.accuracy:.4f} ({tr.seconds:.0f} s)")
    teacher.eval()
    teacher_ckpt = None
    if not cfg.teacher_checkpoint:  # keep it: `--teacher-checkpoint` reuses it in a later run
        teacher_ckpt = str(save_checkpoint(out / f"exits_{cfg.dataset}_teacher.safetensors", teacher,
                                           ModelSpec(cfg.teacher, nc, ic, bundle.input_size, dict(cfg.teacher_kwargs),
                                                     bundle.classes), {"dataset": cfg.dataset, "epoch": t_epochs}))
    kd_teacher = CachedTeacher(teacher) if cfg.cache_teacher else teacher

    # 2. student alone vs distilled, per seed
    def student():
        return build_model(cfg.student, num_classes=nc, in_channels=ic, **cfg.student_kwargs)

    runs: list[dict[str, Any]] = []
    seed0_models: dict[str, Any] = {}
    for seed in range(cfg.seeds):
        for distance in (None, *cfg.distances):
            label = "alone" if distance is None else f"kd_{distance}"
            console.rule(f"student sync {label}, seed {seed}")
            torch.manual_seed(seed)
            m = student()
            r = train_multi_exit(m, bundle, strategy="sync", epochs=cfg.student_epochs, seed=seed,
                                 teacher=kd_teacher if distance else None, distance=distance or "kl",
                                 temperature=cfg.temperature, beta=cfg.beta, **fit_kw)
            runs.append({"strategy": "sync", "kd": distance, "seed": seed, "exit_accuracies": r.exit_accuracies,
                         "val_exit_accuracies": r.val_exit_accuracies, "seconds": r.seconds})
            console.print(f"exit accuracies {[round(a, 4) for a in r.exit_accuracies]}")
            if seed == 0:
                seed0_models[label] = m

    def final(kd, seed, key="exit_accuracies", strategy="sync"):
        return next(r[key][-1] for r in runs if r["kd"] == kd and r["seed"] == seed and r["strategy"] == strategy)

    kd_gain: dict[str, dict[str, Any]] = {}
    for d in cfg.distances:
        gains = [final(d, s) - final(None, s) for s in range(cfg.seeds)]
        mean, lo, hi = _t_interval(gains)
        val_gain = float(np.mean([final(d, s, "val_exit_accuracies") - final(None, s, "val_exit_accuracies")
                                  for s in range(cfg.seeds)]))
        mean_exit_gains = [float(np.mean(next(r["exit_accuracies"] for r in runs if r["kd"] == d and r["seed"] == s
                                              and r["strategy"] == "sync"))
                                 - np.mean(next(r["exit_accuracies"] for r in runs if r["kd"] is None and r["seed"] == s
                                                and r["strategy"] == "sync"))) for s in range(cfg.seeds)]
        me, mlo, mhi = _t_interval(mean_exit_gains)
        kd_gain[d] = {"mean": mean, "ci95": [lo, hi], "per_seed": gains, "val_mean": val_gain,
                      "all_exits_mean": me, "all_exits_ci95": [mlo, mhi]}
    best_distance = max(cfg.distances, key=lambda d: kd_gain[d]["val_mean"])

    # 3. the other strategies, alone and distilled (seed 0)
    for strategy in cfg.strategies:
        if strategy == "sync":
            continue
        for distance in (None, best_distance):
            console.rule(f"student {strategy} {'alone' if distance is None else 'kd_' + distance}, seed 0")
            torch.manual_seed(0)
            m = student()
            r = train_multi_exit(m, bundle, strategy=strategy, epochs=cfg.student_epochs, seed=0,
                                 teacher=kd_teacher if distance else None, distance=distance or "kl",
                                 temperature=cfg.temperature, beta=cfg.beta, **fit_kw)
            runs.append({"strategy": strategy, "kd": distance, "seed": 0, "exit_accuracies": r.exit_accuracies,
                         "val_exit_accuracies": r.val_exit_accuracies, "seconds": r.seconds})
            console.print(f"exit accuracies {[round(a, 4) for a in r.exit_accuracies]}")

    # 4. deployed student: best validation accuracy among the seed-0 distilled sync models
    deployed_label = max((f"kd_{d}" for d in cfg.distances), key=lambda lb: final(lb[3:], 0, "val_exit_accuracies"))
    model = seed0_models[deployed_label].eval()
    console.rule(f"calibrating the deployed student ({deployed_label}) on the validation split")
    xs, ys = dataset_tensors(bundle.test, cfg.test_limit)
    teacher_alone = measure_plain_model(teacher, xs, ys)  # accuracy, memory, latency timed on its own
    val_points = calibrate(model, bundle.val, bundle.val, limit=cfg.calib_limit, progress=progress)
    console.print("re-measuring every operating point on the test split, interleaved with the teacher")
    test_points, refs = remeasure(model, val_points, xs, ys, references={"teacher": teacher})
    teacher_ms = refs["teacher"]["mean_ms"]
    teacher_info = {**teacher_alone, "mean_ms": teacher_ms, "p95_ms": refs["teacher"]["p95_ms"],
                    "mean_ms_timed_alone": teacher_alone["mean_ms"], "epochs": t_epochs, "train_seconds": t_seconds}
    full = next(p for p in test_points if p.forced_exit == model.num_exits - 1)
    speedup, speedup_point = best_speedup(test_points, teacher_info["accuracy"], teacher_ms)
    speedup_s, speedup_s_point = best_speedup(test_points, full.accuracy, full.mean_ms)

    ckpt = out / f"exits_{cfg.dataset}_student.safetensors"
    spec = ModelSpec(cfg.student, nc, ic, bundle.input_size, dict(cfg.student_kwargs), bundle.classes)
    save_checkpoint(ckpt, model, spec, {"exits": exits_extra(val_points, dataset=cfg.dataset, split="val",
                                                                 samples=len(bundle.val)),
                                        "distillation": {"distance": deployed_label[3:], "temperature": cfg.temperature,
                                                         "beta": cfg.beta, "teacher": cfg.teacher}})

    # 5. budgeted requests through the policy
    console.rule("serving budgeted requests")
    od = OnDemandModel(model, val_points)
    serving = serve_budgets(od, xs, ys, budget_grid(val_points, cfg.budgets), cfg.requests_per_budget)

    png = out / f"exits_{cfg.dataset}.png"
    _plot(png, test_points, teacher_info, {"mean_ms": full.mean_ms, "accuracy": full.accuracy},
          f"early exit + KD on {cfg.dataset} ({platform.machine()}, 1 thread)")
    csv_path = out / f"exits_{cfg.dataset}_points.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "split", "accuracy", "mean_ms", "p95_ms", "exit_proportions", "voted_fraction", "peak_memory_bytes", "thresholds"])
        for split, pts in (("val", val_points), ("test", test_points)):
            for p in pts:
                w.writerow([p.name, split, p.accuracy, p.mean_ms, p.p95_ms, " ".join(f"{v:.4f}" for v in p.exit_proportions),
                            p.voted_fraction, p.peak_memory_bytes, " ".join(f"{v:.6f}" for v in p.thresholds)])

    summary = {
        "teacher_accuracy": teacher_info["accuracy"],
        "teacher_mean_ms": teacher_ms,
        "full_accuracy": full.accuracy,
        "student_full_mean_ms": full.mean_ms,
        "speedup_at_1pct_loss": speedup,
        "speedup_at_1pct_loss_point": speedup_point,
        "speedup_vs_student": speedup_s,
        "speedup_vs_student_point": speedup_s_point,
        "kd_gain": {d: v["mean"] for d, v in kd_gain.items()},
        "kd_gain_ci95": {d: v["ci95"] for d, v in kd_gain.items()},
        "kd_gain_best": max(v["mean"] for v in kd_gain.values()),
        "kd_gain_all_exits": {d: v["all_exits_mean"] for d, v in kd_gain.items()},
        "budget_violations": serving["budget_violations"],
        "budget_unsatisfied": serving["unsatisfied"] / max(serving["requests"], 1),
        "deployed_student": deployed_label,
    }
    result = {
        "summary": summary,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                    "loadavg": list(os.getloadavg()), "torch": torch.__version__},
        "teacher": teacher_info,
        "runs": runs,
        "kd_gain": kd_gain,
        "operating_points_val": [p.to_dict() for p in val_points],
        "operating_points_test": [p.to_dict() for p in test_points],
        "serving": serving,
        "files": {"plot": str(png), "csv": str(csv_path), "checkpoint": str(ckpt),
                  "teacher_checkpoint": teacher_ckpt or cfg.teacher_checkpoint},
        "seconds": time.perf_counter() - t_start,
    }
    return result
