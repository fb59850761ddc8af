"""`edgeweave plan`: print the plan for a model on a cluster and its predicted time (no execution).

Planning is pure (DESIGN.md), so this command needs no followers: it reads the devices from a
cluster file, or assumes ``--workers K`` identical followers plus the leader (as ``edgeweave
run --workers K`` starts them).
"""

from __future__ import annotations

from typing import Any, Optional

import typer

from edgeweave.cli.common import BackendOpt, FusionOpt, JsonOpt, ModeOpt, ModelOpt, PartitionOpt, SplitOpt, console, emit_json
from edgeweave.errors import EdgeweaveError

_TORCHVISION_SHORT = ("vgg11", "vgg13", "vgg16", "vgg19", "resnet18", "resnet34", "resnet50")


def _is_imagenet(name: str) -> bool:
    return name.startswith("torchvision:") or name in _TORCHVISION_SHORT


def build_plan(
    model: str,
    *,
    cluster: Optional[str] = None,
    workers: Optional[int] = None,
    input_size: Optional[int] = None,
    batch: int = 1,
    in_channels: int = 3,
    num_classes: Optional[int] = None,
    partition: str = "optimal",
    fusion: str = "auto",
    mode: str = "exchange",
    backend: str = "auto",
    split: str = "auto",
) -> dict[str, Any]:
    """The library call behind the command: returns the JSON result (plan included)."""
    from edgeweave.limits import check_input_size
    from edgeweave.profiling.profile import Cluster

    # the values and the cluster file are checked before torch is imported: a mistake is told at once
    if (cluster is None) == (workers is None):
        raise EdgeweaveError("give exactly one of --cluster FILE or --workers K")
    if workers is not None and workers < 0:
        raise EdgeweaveError(f"--workers must be >= 0, got {workers}")
    if batch < 1:
        raise EdgeweaveError(f"--batch must be >= 1, got {batch}")
    check_input_size(input_size)
    cl = Cluster.load(cluster) if cluster is not None else Cluster.uniform(int(workers or 0) + 1)

    from edgeweave.checkpoint import load_model, model_hash
    from edgeweave.planning.graph import capture
    from edgeweave.planning.planner import make_plan
    from edgeweave.runtime.run import check_input_fits

    classes = num_classes if num_classes is not None else (1000 if _is_imagenet(model) else 10)
    size = input_size if input_size is not None else (224 if _is_imagenet(model) else 32)
    net, spec = load_model(model, num_classes=classes, in_channels=in_channels, input_size=size)
    net.eval()
    if input_size is None:
        size = int(spec.input_size[0])
        check_input_size(size)
    check_input_fits(net, int(spec.in_channels), size, model, int(spec.input_size[0]))
    shape = (batch, int(spec.in_channels), size, size)
    gm = capture(net, shape)
    plan = make_plan(gm, cl, partition=partition, fusion=fusion, mode=mode, model_name=model,
                     model_hash=model_hash(net), backend=backend, split=split)
    from edgeweave.planning.coverage import split_report
    from edgeweave.planning.memory import memory_report

    return {
        "model": model,
        "input_size": size,
        "batch": batch,
        "devices": plan.devices,
        "partition": partition,
        "fusion": fusion,
        "mode": mode,
        "backends": dict(zip(plan.devices, plan.backends)),
        "predicted_s": plan.predicted_s,
        "single_device_s": plan.meta.get("single_device_s"),
        "predicted_speedup": plan.meta.get("predicted_speedup"),
        "stages": len(plan.stages),
        "strip_order": [plan.devices[d] for d in plan.meta["strip_order"]],  # top to bottom
        "profiles": "default" if cl.is_default else "given",  # default: no device measured or described
        # per device: bytes of weights it holds, peak activations, the process itself, and its limit (0: unknown)
        "memory": memory_report(plan, [d.memory_bytes for d in cl.devices]),
        **split_report(gm, plan),  # split_flops_fraction, unsplit_nodes, transformer
        "plan": plan.to_dict(),
    }


def _print(res: dict[str, Any]) -> None:
    from edgeweave.runtime.run import plan_table

    console.print(plan_table(res))
    if res["strip_order"] != res["devices"]:
        console.print(f"strips top to bottom: {', '.join(res['strip_order'])} (devices on slow links at the ends)")
    used = sorted(set(res["backends"].values()))
    console.print(f"backend: {', '.join(f'{d} {b}' for d, b in res['backends'].items()) if len(used) > 1 else used[0]}")
    sp = res.get("predicted_speedup")
    console.print(f"predicted {1e3 * res['predicted_s']:.1f} ms; one device {1e3 * res['single_device_s']:.1f} ms"
                  + (f"; speedup {sp:.2f}x" if sp else "")
                  + (" (uncalibrated)" if res.get("profiles") == "default" else ""))


def plan(
    model: str = ModelOpt,
    cluster: Optional[str] = typer.Option(None, "--cluster", help="Cluster file (devices JSON/TOML; first = leader)."),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", help="K identical followers plus the leader."),
    input_size: Optional[int] = typer.Option(None, "--input-size", "-n", help="Input height and width (default: "
                                             "the checkpoint's, else 224 for ImageNet models and 32 for the others)."),
    batch: int = typer.Option(1, "--batch"),
    in_channels: int = typer.Option(3, "--in-channels"),
    partition: str = PartitionOpt,
    fusion: str = FusionOpt,
    mode: str = ModeOpt,
    backend: str = BackendOpt,
    split: str = SplitOpt,
    json_out: Optional[str] = JsonOpt,
) -> None:
    """Print the plan (who computes which rows of which block) and its predicted time."""
    res = build_plan(model, cluster=cluster, workers=workers, input_size=input_size, batch=batch,
                     in_channels=in_channels, partition=partition, fusion=fusion, mode=mode, backend=backend,
                     split=split)
    _print(res)
    emit_json(res, json_out)


def register(app: typer.Typer) -> None:
    app.command()(plan)
