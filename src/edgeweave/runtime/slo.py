"""What ``edgeweave run --rate FPS --slo-ms L`` does: serve a stream of frames at a rate on the
groups the planner chose for a per-frame latency SLO, and report what the stream got.

With an SLO the planner (planning/throughput.py) picks the grouping with the highest predicted
frame rate whose every group keeps the SLO; without one the cluster stays one group (today's
lowest-latency plan) and frames queue behind each other. Frame i arrives at ``i / rate``; its
latency counts from its arrival. A follower that dies mid-stream is left out, the groups are
planned again over the survivors and its frame runs again (runtime/frames.py); a board that
comes back (a follower that registers again) is taken into the groups between two frames.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from edgeweave.errors import EdgeweaveError
from edgeweave.profiling.profile import Cluster
from edgeweave.runtime.frames import GroupServer, latency_stats


def group_planner(session: Any, gm: Any, cfg: Any, model_name: str, slots: int | None = None) -> Any:
    """``cluster -> GroupPlan`` with ``cfg``'s planning options and SLO; ``slots``: frames each
    group serves at once (None: the planner chooses)."""
    from edgeweave.planning.throughput import one_group, plan_groups

    slo_s = cfg.slo_ms / 1e3 if cfg.slo_ms else None
    opts = dict(partition=cfg.partition, fusion=cfg.fusion, mode=cfg.mode, split=cfg.split, backend=cfg.backend,
                model_name=model_name)

    def replan(cluster: Cluster) -> Any:
        if slo_s is None:
            return one_group(gm, cluster, model_hash=str(session.model_hash), **opts)
        return plan_groups(gm, cluster, slo_s=slo_s, model_hash=str(session.model_hash), slots=slots, **opts)

    return replan


def check_feasible(gplan: Any, cfg: Any, calibrated: bool = True) -> None:
    """A rate or SLO no grouping is predicted to meet is a one-line error naming what the
    cluster can offer, not a silent backlog. With uncalibrated (default) profiles the
    predictions are guesses: a warning instead."""
    try:
        _check_feasible(gplan, cfg)
    except EdgeweaveError as e:
        if calibrated:
            raise
        from edgeweave.console import console

        console.print(f"[yellow]warning (uncalibrated: default profiles): {e}[/yellow]")


def _check_feasible(gplan: Any, cfg: Any) -> None:
    best = f"{gplan.fps:.3g} frames/s at {1e3 * gplan.latency_s:.0f} ms per frame ({len(gplan.groups)} group(s))"
    if cfg.slo_ms is not None and not gplan.feasible:
        raise EdgeweaveError(f"no grouping of the cluster is predicted to answer within --slo-ms {cfg.slo_ms:g}: the "
                             f"fastest answers in {1e3 * gplan.latency_s:.0f} ms; raise the SLO or add devices")
    if cfg.rate is not None and cfg.rate > gplan.fps * 1.05:
        raise EdgeweaveError(f"--rate {cfg.rate:g} frames/s is beyond what the cluster is predicted to serve"
                             f"{' within the SLO' if cfg.slo_ms else ''}: at most {best}; lower the rate"
                             f"{' or raise the SLO' if cfg.slo_ms else ' or give --slo-ms to serve frames at once'}")


def stream_frames(n: int, shape: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def run_stream(session: Any, model_name: str, model: torch.nn.Module, spec: Any, x: torch.Tensor,
               cfg: Any, progress: Any = None) -> dict[str, Any]:
    """Serve ``cfg.repeat`` frames (``x`` and fresh random frames of its shape) at ``cfg.rate``
    frames per second on planner-chosen groups; the JSON keys of ``run`` in stream mode."""
    from edgeweave.planning.graph import capture

    cfg.validate()
    session.load_model(model, spec)
    gm = capture(model, tuple(x.shape))
    replan = group_planner(session, gm, cfg, model_name)
    t_plan = time.perf_counter()
    gplan = replan(session.cluster)
    plan_s = time.perf_counter() - t_plan
    check_feasible(gplan, cfg, calibrated=not session.cluster.is_default)
    server = GroupServer(session, gplan, replan=replan, admit=True)
    frames = [x] + stream_frames(cfg.repeat - 1, tuple(x.shape), cfg.seed + 1)
    try:
        server.serve(frames[: len(gplan.groups)])  # warm-up: every group once, not counted
        done = [0]

        def on_frame(_r: Any) -> None:
            done[0] += 1
            if progress is not None:
                progress(done[0], len(frames))

        results = server.serve(frames, rate=cfg.rate, on_frame=on_frame)
    finally:
        server.close()
    stats = latency_stats(results, parallel=len(server.gplan.groups) * int(getattr(server.gplan, "slots", 1)))
    slo_s = cfg.slo_ms / 1e3 if cfg.slo_ms else None
    out: dict[str, Any] = {
        "model": model_name, "input_size": int(x.shape[-1]), "batch": int(x.shape[0]),
        "workers": session.world - 1, "devices": session.names, "rate_fps": cfg.rate, "slo_s": slo_s,
        "groups": [list(g.devices) for g in server.gplan.groups],
        "groups_at_start": [list(g.devices) for g in gplan.groups],
        "predicted": {"fps": gplan.fps, "latency_s": gplan.latency_s, "feasible": gplan.feasible,
                      "group_latency_s": [g.latency_s for g in gplan.groups], "planning_s": plan_s},
        **stats,
        "slo_met": None if slo_s is None else stats["p95_s"] <= slo_s,
        "lost_frames": len(frames) - len(results),
        "retried_frames": sum(1 for r in results if r.retries),
        "events": [e.to_dict() for e in server.events],
        "frames": [r.to_dict() for r in results],
    }
    if cfg.check:
        errs = []
        with torch.no_grad():
            for r in results:
                ref = model(frames[r.index])
                errs.append(float((r.output - ref).abs().max() / ref.abs().max().clamp_min(1e-30)))
        out["rel_err"] = max(errs)
    return out


def stream_line(res: dict[str, Any]) -> str:
    """One line for people: what the stream got against what was asked."""
    slo = f", p95 {1e3 * res['p95_s']:.0f} ms vs SLO {1e3 * res['slo_s']:.0f} ms" if res["slo_s"] else \
        f", p95 {1e3 * res['p95_s']:.0f} ms"
    rate = f" offered {res['rate_fps']:g}/s" if res["rate_fps"] else " all at once"
    groups = " | ".join("+".join(g) for g in res["groups"])
    err = f", rel_err {res['rel_err']:.1e}" if "rel_err" in res else ""
    return (f"{res['count']} frames{rate}: {res['fps']:.2f} frames/s (predicted {res['predicted']['fps']:.2f}){slo}; "
            f"groups {groups}; lost {res['lost_frames']}{err}")
