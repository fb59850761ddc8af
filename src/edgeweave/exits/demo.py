"""The early-exit step of ``edgeweave demo`` (the demo calls ``exits_demo_step(out, teacher_path)``).

Deterministic (fixed epochs and seeds, no time budget): distil a multi-exit student from the
demo's trained teacher (synchronous strategy, KL, cached teacher logits), calibrate operating
points on the validation split at batch 1 / one thread, re-measure them on the test split
interleaved with the teacher, answer a few requests (a latency budget, an accuracy target, an
impossible budget), then serve budgeted requests one sample at a time and count how many
exceeded their budget. A minute or two on a 2-core CPU.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from edgeweave.console import console

STUDENT = "multi_exit_small"
STUDENT_EPOCHS = 6
CALIBRATION_SAMPLES = 300
BUDGETS, REQUESTS_PER_BUDGET = 12, 25


def front(points: list[Any]) -> list[Any]:
    """The points no other point beats on both accuracy and mean latency, fastest first."""
    out: list[Any] = []
    for p in sorted(points, key=lambda q: (q.mean_ms, -q.accuracy)):
        if not out or p.accuracy > out[-1].accuracy:
            out.append(p)
    return out


def front_table(points: list[Any]) -> Any:
    """The operating points on the accuracy/latency front, in 80 columns."""
    from rich import box
    from rich.table import Table

    shown = front(points)
    t = Table(title=f"operating points on the accuracy/latency front ({len(shown)} of {len(points)}; validation "
                    "split, batch 1, 1 thread)", box=box.SIMPLE_HEAD, title_justify="left")
    for c in ("point", "accuracy", "mean ms", "p95 ms", "leave at exit 0/1/2"):
        t.add_column(c, justify="left" if c == "point" else "right")
    for p in shown:
        t.add_row(p.name, f"{p.accuracy:.4f}", f"{p.mean_ms:.3f}", f"{p.p95_ms:.3f}",
                  " / ".join(f"{100 * v:.0f} %" for v in p.exit_proportions))
    return t


def exits_demo_step(out: Path, teacher_path: Path | None = None, epochs: int = STUDENT_EPOCHS,
                    calibration_samples: int | None = CALIBRATION_SAMPLES, test_samples: int | None = None,
                    budgets: int = BUDGETS, requests_per_budget: int = REQUESTS_PER_BUDGET,
                    teacher_epochs: int = 4) -> dict[str, Any]:
    """Distil, calibrate and serve (module docstring). ``teacher_path``: the demo's teacher
    checkpoint (default ``out/teacher/best.safetensors``); when there is none a small one is
    trained here for ``teacher_epochs``. ``test_samples``: None for the whole test split.
    Writes ``out/exits/student.safetensors`` (with its operating points) and ``out/exits.png``."""
    import torch

    from edgeweave.bench.exits import _plot
    from edgeweave.checkpoint import ModelSpec, load_checkpoint, save_checkpoint
    from edgeweave.compress.distill import CachedTeacher
    from edgeweave.data import load_dataset
    from edgeweave.exits.calibrate import calibrate, dataset_tensors
    from edgeweave.exits.evaluate import best_speedup, budget_grid, measure_plain_model, remeasure, serve_budgets
    from edgeweave.exits.ondemand import OnDemandModel, exits_extra
    from edgeweave.exits.train import train_multi_exit
    from edgeweave.training import fit

    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    # one thread throughout: training gives the same weights on every run, and every latency is
    # measured at batch 1 on one thread, as a device serves single requests
    torch.set_num_threads(1)
    try:
        bundle = load_dataset("mnist5k")
        out = Path(out)
        tpath = Path(teacher_path) if teacher_path else out / "teacher" / "best.safetensors"
        if tpath.is_file():
            teacher, tspec, _ = load_checkpoint(tpath)
            console.print(f"teacher: {tspec.name} {tspec.kwargs} from {tpath}")
        else:
            tspec = ModelSpec("small_resnet8", 10, 1, (28, 28), {"width": 16}, bundle.classes)
            console.print(f"teacher: training {tspec.name} (width 16) for {teacher_epochs} epochs")
            torch.manual_seed(0)
            teacher = tspec.build()
            fit(teacher, bundle, epochs=teacher_epochs, lr=0.05, batch_size=64, seed=0)
        teacher.eval()

        spec = ModelSpec(STUDENT, 10, 1, (28, 28), {}, bundle.classes)
        torch.manual_seed(0)
        student = spec.build()
        console.print(f"student: {STUDENT} (exits after layer1, layer2 and at the end), {epochs} epochs, "
                      "synchronous strategy, distilled (KL, T=4, beta=0.5)")
        r = train_multi_exit(student, bundle, strategy="sync", epochs=epochs, teacher=CachedTeacher(teacher), distance="kl",
                             temperature=4.0, beta=0.5, lr=0.05, batch_size=64, seed=0)
        console.print(f"student exit test accuracies: {' '.join(f'{a:.4f}' for a in r.exit_accuracies)}")

        points = calibrate(student, bundle.val, bundle.val, limit=calibration_samples, progress=True)
        console.print(front_table(points))
        ckpt = save_checkpoint(out / "exits" / "student.safetensors", student, spec,
                               {"exits": exits_extra(points, dataset="mnist5k", split="val",
                                                     samples=min(calibration_samples or len(bundle.val), len(bundle.val)))})
        xs, ys = dataset_tensors(bundle.test, test_samples)
        t_info = measure_plain_model(teacher, xs, ys)
        with console.status(f"re-measuring {len(points)} operating points on {len(ys)} test digits, interleaved with the teacher..."):
            test_points, refs = remeasure(student, points, xs, ys, references={"teacher": teacher})
        t_info.update(refs["teacher"])
        full = next(p for p in test_points if p.forced_exit == student.num_exits - 1)
        speedup, at = best_speedup(test_points, t_info["accuracy"], t_info["mean_ms"])
        od = OnDemandModel.load(ckpt)
        fastest = min(p.p95_ms for p in points)
        requests = [("latency budget", {"latency_budget_ms": round(fastest * 1.5, 3)}),
                    ("accuracy target", {"min_accuracy": round(max(p.accuracy for p in points) - 0.01, 4)}),
                    ("impossible budget", {"latency_budget_ms": round(fastest / 10, 4)})]
        answers = []
        for what, kw in requests:
            res = od.predict(xs[:20], **kw)
            acc = float((res.labels == ys[:20]).float().mean())
            tag = "ok" if res.choice.satisfied else "CANNOT"
            console.print(f"{what} {kw}: [{tag}] {res.choice.message}; 20 digits, accuracy {acc:.2f}, "
                          f"exits {torch.bincount(res.exits, minlength=student.num_exits).tolist()}")
            answers.append({"request": kw, "satisfied": res.choice.satisfied, "point": res.choice.point.name,
                            "message": res.choice.message, "accuracy": acc})
        od = OnDemandModel.load(ckpt)  # a fresh server: its load tracker has seen only the budgeted requests
        serving = serve_budgets(od, xs, ys, budget_grid(points, budgets), requests_per_budget)
        png = out / "exits.png"
        _plot(png, test_points, t_info, {"mean_ms": full.mean_ms, "accuracy": full.accuracy},
              "multi-exit student vs its teacher (mnist5k test)")
        console.print(f"teacher {t_info['mean_ms']:.3f} ms per digit at accuracy {t_info['accuracy']:.4f}; student at full "
                      f"depth {full.mean_ms:.3f} ms at {full.accuracy:.4f}; fastest point within 1 point of the teacher: "
                      f"{speedup:.2f}x faster ({at})")
        console.print(f"budgeted serving: {serving['served']} requests served under {budgets} budgets, "
                      f"{100 * (serving['budget_violations'] or 0):.1f} % over their budget; {serving['unsatisfied']} "
                      "answered 'cannot meet this budget now' (not counted as served)")
        return {"teacher_accuracy": t_info["accuracy"], "teacher_mean_ms": t_info["mean_ms"],
                "student_accuracy": full.accuracy, "student_full_mean_ms": full.mean_ms,
                "exit_accuracies": r.exit_accuracies, "epochs": epochs, "operating_points": len(points),
                "test_samples": len(ys), "speedup_at_1pct_loss": speedup, "speedup_point": at,
                "budget_violations": serving["budget_violations"], "budget_requests": serving["requests"],
                "budget_served": serving["served"], "budget_unsatisfied": serving["unsatisfied"],
                "requests": answers, "checkpoint": str(ckpt), "plot": str(png), "seconds": time.perf_counter() - t0}
    finally:
        torch.set_num_threads(threads)
