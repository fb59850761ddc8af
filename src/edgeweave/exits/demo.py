"""The early-exit step of `edgeweave demo` (the lead calls ``exits_demo_step(out)``).

A few minutes on a 2-core CPU: reuse the demo's trained CNN as the teacher when the train step
left one (else train a small one), distil a multi-exit student into it (synchronous strategy,
KL), calibrate operating points on the validation split at batch 1 / one thread, print them,
then serve a few requests with latency budgets and accuracy targets, one of them impossible.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from edgeweave.console import console


def exits_demo_step(out: Path, budget_s: float = 150.0, teacher_path: Path | None = None) -> dict[str, Any]:
    import torch

    from edgeweave.checkpoint import ModelSpec, load_checkpoint, save_checkpoint
    from edgeweave.data import load_dataset
    from edgeweave.exits.calibrate import calibrate, dataset_tensors
    from edgeweave.exits.evaluate import best_speedup, budget_grid, measure_plain_model, points_table, remeasure, serve_budgets
    from edgeweave.exits.ondemand import OnDemandModel, exits_extra
    from edgeweave.exits.train import train_multi_exit
    from edgeweave.training import fit

    console.rule("early exit + distillation: a multi-exit student under a teacher, on-demand operating points")
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bundle = load_dataset("mnist5k")
        out = Path(out)
        tpath = Path(teacher_path) if teacher_path else out / "mnist_cnn" / "best.safetensors"
        if tpath.is_file():
            teacher, tspec, _ = load_checkpoint(tpath)
            console.print(f"teacher: {tspec.name} {tspec.kwargs} from {tpath}")
        else:
            tspec = ModelSpec("small_cnn", 10, 1, (28, 28), {"width": 32}, bundle.classes)
            teacher = tspec.build()
            console.print("teacher: training small_cnn (width 32)")
            fit(teacher, bundle, epochs=4, lr=0.05, batch_size=64, max_seconds=budget_s * 0.3)
        teacher.eval()

        spec = ModelSpec("multi_exit_small", 10, 1, (28, 28), {}, bundle.classes)
        student = spec.build()
        console.print("student: multi_exit_small (exits after layer1, layer2, end), sync strategy, KD (KL, T=4, beta=0.5)")
        r = train_multi_exit(student, bundle, strategy="sync", epochs=6, teacher=teacher, distance="kl", temperature=4.0,
                             beta=0.5, lr=0.05, batch_size=64, max_seconds=budget_s * 0.5)
        console.print(f"student exit test accuracies: {' '.join(f'{a:.4f}' for a in r.exit_accuracies)}")

        points = calibrate(student, bundle.val, bundle.val, limit=300, progress=True)
        console.print(points_table(points, "operating points (validation, batch 1, 1 thread)"))
        ckpt = save_checkpoint(out / "exits" / "student.safetensors", student, spec,
                               {"exits": exits_extra(points, dataset="mnist5k", split="val", samples=300)})
        xs, ys = dataset_tensors(bundle.test, 300)
        t_info = measure_plain_model(teacher, xs, ys)
        test_points, refs = remeasure(student, points, xs, ys, references={"teacher": teacher})  # interleaved timing
        t_info.update(refs["teacher"])
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
            console.print(f"{what} {kw}: [{tag}] {res.choice.message}; 20 samples, accuracy {acc:.2f}, "
                          f"exits {torch.bincount(res.exits, minlength=student.num_exits).tolist()}")
            answers.append({"request": kw, "satisfied": res.choice.satisfied, "point": res.choice.point.name,
                            "message": res.choice.message, "accuracy": acc})
        serving = serve_budgets(od, xs, ys, budget_grid(points, 5), 20)
        console.print(f"teacher {t_info['mean_ms']:.3f} ms/sample at accuracy {t_info['accuracy']:.4f}; "
                      f"best speedup within 1 point of it on test: {speedup:.2f}x ({at}); "
                      f"budget violations {serving['budget_violations'] or 0:.3f} over {serving['served']} served requests "
                      f"({serving['unsatisfied']} answered 'cannot meet this budget now')")
        return {"teacher_accuracy": t_info["accuracy"], "teacher_mean_ms": t_info["mean_ms"],
                "exit_accuracies": r.exit_accuracies, "operating_points": len(points),
                "speedup_at_1pct_loss": speedup, "speedup_point": at, "budget_violations": serving["budget_violations"],
                "requests": answers, "checkpoint": str(ckpt), "seconds": time.perf_counter() - t0}
    finally:
        torch.set_num_threads(threads)
