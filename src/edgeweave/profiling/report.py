"""What `edgeweave profile` leaves beside the profile: every timed setting (CSV) and a plot of
the fits, so a user can see where the line ``a * FLOPs + b`` holds on their board and where it
does not (the profile itself keeps only the fitted lines, which the leader needs)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from edgeweave.profiling.compute import WEIGHTS_KIND

COLUMNS = ("kind", "fit_kind", "h", "w", "cin", "cout", "k", "stride", "flops", "weights", "seconds", "predicted_s",
           "rel_err")


def predict(sample: dict[str, Any], fits: dict[str, dict[str, Any]], weights_fit: dict[str, Any] | None) -> float | None:
    """A sample's predicted seconds as the planner would price it: its kind's line, and for the
    thin strips (fit kind ``weights``) the conv line plus the seconds per weight element read;
    None where no line was fitted."""
    if sample["fit_kind"] == WEIGHTS_KIND:
        conv = fits.get("conv")
        if conv is None or weights_fit is None:
            return None
        return conv["a"] * sample["flops"] + conv["b"] + weights_fit["a"] * sample["weights"]
    f = fits.get(sample["fit_kind"])
    return f["a"] * sample["flops"] + f["b"] if f else None


def with_predictions(samples: list[dict[str, Any]], fits: dict[str, dict[str, Any]],
                     weights_fit: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Each sample with its predicted seconds and relative error (all samples; the held-out
    errors are in the fits)."""
    out = []
    for s in samples:
        pred = predict(s, fits, weights_fit)
        out.append(s | {"predicted_s": pred, "rel_err": abs(pred - s["seconds"]) / s["seconds"] if pred is not None else None})
    return out


def write_samples_csv(samples: list[dict[str, Any]], fits: dict[str, dict[str, Any]], path: Path,
                      weights_fit: dict[str, Any] | None = None) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(COLUMNS)
        for s in with_predictions(samples, fits, weights_fit):
            w.writerow([s.get(c) for c in COLUMNS])


def plot_fits(samples: list[dict[str, Any]], fits: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Measured seconds against FLOPs (log-log), one panel per fitted kind, with the line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    kinds = [k for k in fits if any(s["fit_kind"] == k for s in samples)]
    cols = min(3, max(len(kinds), 1))
    rows = -(-len(kinds) // cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, kind in zip(axes.flat, kinds):
        pts = [s for s in samples if s["fit_kind"] == kind]
        x = np.array([s["flops"] for s in pts])
        y = np.array([s["seconds"] for s in pts])
        f = fits[kind]
        grid = np.geomspace(x.min(), x.max(), 50)
        ax.loglog(x, y * 1e3, "o", ms=3, alpha=0.7, label="measured")
        ax.loglog(grid, (f["a"] * grid + f["b"]) * 1e3, "-", label=f"fit ({100 * f['heldout_median_rel_err']:.0f}% held-out)")
        ax.set(title=f"{kind} ({len(pts)})", xlabel="FLOPs", ylabel="ms")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(kinds):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
