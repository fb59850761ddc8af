"""Where one distributed inference spent its time: a per-device timeline and a breakdown.

The timings of an inference (``Timings.to_dict()``) say, per stage and device, when the stage
began, when its compute began (its inputs in hand) and how long it computed. Laid side by side
they show what a latency is made of, which the total alone hides:

* ``compute_s``: the work itself, as if each stage's work were spread perfectly evenly over the
  devices that computed it (per stage the mean of their compute seconds, summed over stages: a
  stage the leader computes alone counts whole);
* ``imbalance_s``: per stage, how much longer the slowest device computed than the mean one,
  summed over stages (a plan's uneven split, and devices that run the same work at different
  speeds: on a CPU-quota testbed the phase of each device's quota period);
* ``other_s``: the rest of the total: transfers, waits at stage boundaries (a device cannot
  start before its neighbours' rows arrive), the leader's bookkeeping.

The three add up to the total. They are a decomposition of one measured frame, not a model;
stages overlap in time on different devices, so a stage's share is approximate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _stages(timings: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in timings["stages"] if s["index"] != "final"]


def breakdown(timings: dict[str, Any]) -> dict[str, Any]:
    """The total split into compute, imbalance and everything else (module docstring)."""
    stages = _stages(timings)
    k = max((len(s["devices"]) for s in stages), default=0)
    per_device = [0.0] * k
    compute = imbalance = 0.0
    for s in stages:
        working = [d for d in s["devices"] if d.get("ready_s") is not None]  # devices that computed
        for d in working:
            per_device[d["device"]] += d["compute_s"]
        if working:  # the stage's work spread over the devices that did it, not over all of them
            cs = [d["compute_s"] for d in working]
            compute += sum(cs) / len(cs)
            imbalance += max(cs) - sum(cs) / len(cs)
    total = float(timings["total_s"])
    return {"total_s": total, "compute_s": compute, "imbalance_s": imbalance,
            "other_s": total - compute - imbalance, "stages": len(stages), "compute_by_device_s": per_device}


def frame_summary(timings: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a benchmark keeps of one frame's timings: per stage the wall and slowest compute
    seconds, per device when the stage began, when its compute began and for how long (enough
    for :func:`plot_timeline`), and the :func:`breakdown`."""
    if not timings:
        return None
    keep = ("device", "name", "compute_s", "start_s", "ready_s")
    return {"total_s": timings["total_s"], "breakdown": breakdown(timings),
            "stages": [{"index": s["index"], "kind": s["kind"], "wall_s": s["wall_s"], "compute_s": s["compute_s"],
                        "devices": [{k: d.get(k) for k in keep} for d in s["devices"]]} for s in timings["stages"]]}


def plot_timeline(timings: dict[str, Any], path: str | Path, title: str = "") -> str:
    """A Gantt chart of the inference: per device, grey while a stage waits for its inputs,
    coloured while it computes (alternating colours mark the stages). Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = _stages(timings)
    names = [d["name"] for d in max(stages, key=lambda s: len(s["devices"]))["devices"]] if stages else []
    fig, ax = plt.subplots(figsize=(11, 1.0 + 0.45 * max(len(names), 1)))
    colours = plt.get_cmap("tab10").colors
    for i, s in enumerate(stages):
        for d in s["devices"]:
            y = d["device"]
            if d.get("start_s") is None or d.get("ready_s") is None:
                continue
            wait = max(0.0, d["ready_s"] - d["start_s"])
            ax.broken_barh([(1e3 * d["start_s"], 1e3 * wait)], (y - 0.3, 0.6), facecolors="0.85")
            ax.broken_barh([(1e3 * d["ready_s"], 1e3 * d["compute_s"])], (y - 0.3, 0.6),
                           facecolors=colours[i % len(colours)])
    b = breakdown(timings)
    ax.axvline(1e3 * b["total_s"], color="k", lw=0.8, ls=":")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("ms since the leader started the inference (grey: waiting for inputs; colour: computing, one per stage)")
    sub = (f"total {1e3 * b['total_s']:.0f} ms = compute {1e3 * b['compute_s']:.0f} + imbalance "
           f"{1e3 * b['imbalance_s']:.0f} + transfers/sync {1e3 * b['other_s']:.0f} ms, {b['stages']} stages")
    ax.set_title(f"{title}\n{sub}" if title else sub, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
