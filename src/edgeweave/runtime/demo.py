"""The distributed step of ``edgeweave demo``: a real photo through a 224x224 model on local workers.

Why a real photo: the demo should show the engine on data a user recognises, and sklearn ships
two photos (no download). The model is randomly initialised (no pretrained weights can be
fetched), which does not matter for what is shown: that the distributed result equals the
single-device one, which device computed which rows of which block, and the measured times.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from edgeweave.runtime.leader import LocalCluster
from edgeweave.runtime.run import RunConfig, load_for_run, result_table, run_on_session, summary_line

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def sample_photo(size: int = 224, index: int = 0) -> torch.Tensor:
    """One of sklearn's sample photos (china.jpg, flower.jpg), centre-cropped, resized and
    normalised like ImageNet inputs: a (1, 3, size, size) float tensor."""
    from sklearn.datasets import load_sample_images

    img = torch.from_numpy(load_sample_images().images[index].copy()).permute(2, 0, 1).float() / 255.0
    _, h, w = img.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    img = img[:, top:top + side, left:left + side].unsqueeze(0)
    img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (img - mean) / std


def distributed_demo_step(workers: int = 2, model_name: str = "torchvision:resnet18", size: int = 224,
                          repeat: int = 3, partition: str = "optimal", fusion: str = "auto",
                          mode: str = "exchange", console: Any = None, timeout_s: float = 120.0) -> dict[str, Any]:
    """Run ``model_name`` on a real photo over ``workers`` local followers plus the leader,
    check it against one device, print the plan and times on stderr, and return the summary
    (``rel_err``, ``latency_s``, ``single_device_s``, ``speedup``, ``plan``, ...)."""
    if console is None:
        from edgeweave.console import console
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread per process, like the followers: a fair comparison
    t0 = time.perf_counter()
    try:
        model, spec = load_for_run(model_name, size)
        x = sample_photo(size)
        cfg = RunConfig(partition=partition, fusion=fusion, mode=mode, repeat=repeat, check=True)
        cfg.validate()
        console.print(f"[bold]distributed inference[/bold]: {model_name} on a {size}x{size} photo, "
                      f"{workers} local workers + the leader (gloo over loopback, 1 thread each)")
        with LocalCluster(workers, timeout_s=timeout_s) as cl:
            res = run_on_session(cl, model_name, model, spec, x, cfg)
        with torch.no_grad():
            res["top1_class"] = int(model(x).argmax(1)[0])  # random weights: a label, not a claim
        console.print(result_table(res))
        console.print(summary_line(res) + f"; speedup {res['speedup']:.2f}x")
        res["seconds"] = time.perf_counter() - t0
        return res
    finally:
        torch.set_num_threads(threads)
