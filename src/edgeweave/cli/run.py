"""`edgeweave run` (one distributed inference) and `edgeweave worker` (a follower process)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from edgeweave.cli.common import (
    BackendOpt, ClusterOpt, FusionOpt, InputSizeOpt, JsonOpt, ListenOpt, ModeOpt, ModelOpt, PartitionOpt, SplitOpt,
    WorkersOpt, console, emit_json, told_early,
)
from edgeweave.cli.keygen import KeyOpt, use_key
from edgeweave.errors import EdgeweaveError


def run(
    model: str = ModelOpt,
    input_size: Optional[int] = InputSizeOpt,
    workers: Optional[int] = WorkersOpt,
    cluster: Optional[str] = ClusterOpt,
    listen: str = ListenOpt,
    partition: str = PartitionOpt,
    fusion: str = FusionOpt,
    mode: str = ModeOpt,
    backend: str = BackendOpt,
    split: str = SplitOpt,
    batch: int = typer.Option(1, "--batch"),
    repeat: int = typer.Option(3, "--repeat", help="Timed inferences (after one warm-up); latency is the median."),
    check: bool = typer.Option(False, "--check", help="Also run on one device and report the error."),
    adaptive: bool = typer.Option(False, "--adaptive", help="Serve the --repeat inferences as a stream: estimate every "
                                  "device's real speed from its step times and re-plan when a device turns out slower "
                                  "or faster than its profile. A follower that dies or hangs is left out and the frame runs "
                                  "again on the others (JSON: per-frame `frames`, `replans`, `lost`)."),
    rate: Optional[float] = typer.Option(None, "--rate", help="Serve the --repeat frames as a stream arriving at this "
                                         "many frames per second; latency counts from each frame's arrival (JSON: "
                                         "fps, p50_s, p95_s, per-frame `frames`, `lost_frames`)."),
    slo_ms: Optional[float] = typer.Option(None, "--slo-ms", help="Per-frame latency bound (p95) for a stream: the "
                                           "cluster is divided into groups that serve frames at once, the grouping "
                                           "with the most frames per second whose groups keep the bound. Without "
                                           "it a stream runs one frame at a time on the whole cluster."),
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds any network wait may take (> 0)."),
    timeline: Optional[Path] = typer.Option(None, "--timeline", help="Write a PNG timeline of the fastest inference: "
                                            "per device, when each stage waited for its inputs and when it computed."),
    json_out: Optional[str] = JsonOpt,
    key: Optional[Path] = KeyOpt,
) -> None:
    """One inference distributed over local worker processes or a cluster."""
    use_key(key, listen if cluster and workers is None else None)
    told_early(timeout=timeout, input_size=input_size, cluster=cluster)
    from edgeweave.runtime.run import RunConfig, run as do_run


    cfg = RunConfig(partition=partition, fusion=fusion, mode=mode, batch=batch, repeat=repeat, check=check,
                    adaptive=adaptive, backend=backend, split=split, rate=rate, slo_ms=slo_ms)
    if timeline is not None and not timeline.parent.is_dir():
        raise EdgeweaveError(f"--timeline: folder {timeline.parent} does not exist")
    res = do_run(model, input_size, workers, cfg, cluster_file=cluster, listen=listen, timeout_s=timeout)
    _print_result(res)
    if timeline is not None and "timings" in res:  # a stream has no single inference to draw
        from edgeweave.runtime.timeline import plot_timeline

        title = f"{res['model']} {res['input_size']}x{res['input_size']} on {', '.join(res['devices'])} ({res['mode']})"
        res["timeline_png"] = plot_timeline(res["timings"], timeline, title)
        console.print(f"timeline: {timeline}")
    emit_json(res, json_out)


def _print_result(res: dict) -> None:
    from edgeweave.runtime.run import frames_line, result_table, summary_line

    if "groups" in res:  # a stream on groups (--rate / --slo-ms)
        from edgeweave.runtime.slo import stream_line

        console.print(stream_line(res))
        return

    console.print(result_table(res))
    if "frames" in res:
        console.print(frames_line(res))
    console.print(summary_line(res))


def worker(
    leader: str = typer.Option(..., "--leader", help="HOST:PORT of the leader."),
    name: Optional[str] = typer.Option(None, "--name", help="Device name (default: host-pid)."),
    threads: int = typer.Option(1, "--threads", help="torch threads in this process."),
    model: Optional[str] = typer.Option(None, "--model", help="Load the model locally instead of receiving it."),
    profile: Optional[Path] = typer.Option(None, "--profile", help="This device's profile (DeviceProfile JSON)."),
    profile_json: Optional[str] = typer.Option(None, "--profile-json", hidden=True),
    connect_timeout: float = typer.Option(60.0, "--connect-timeout", help="Seconds to wait for the leader (> 0)."),
    backend: str = typer.Option("auto", "--backend", help="What this device computes with when the leader asks for "
                                "`auto`: torch | ort | openvino | openvino-bf16 | auto (the fastest its profile measured)."),
    key: Optional[Path] = KeyOpt,
) -> None:
    """Start a follower: join the leader, receive the model and plans, compute strips."""
    from edgeweave.limits import check_timeout, parse_address
    from edgeweave.profiling.profile import DeviceProfile

    # checked before torch is imported: a mistake is told at once
    check_timeout(connect_timeout, "--connect-timeout")
    parse_address(leader)  # an invalid port is told now, not as a failure to reach the leader
    prof = None
    try:
        if profile is not None:
            if not profile.is_file():
                raise EdgeweaveError(f"profile file not found: {profile}")
            prof = json.loads(profile.read_text())
        elif profile_json:
            prof = json.loads(profile_json)
    except ValueError as e:
        raise EdgeweaveError(f"profile is not valid JSON: {e}") from None
    if prof is not None:  # checked here, not by the leader once we joined
        DeviceProfile.from_dict({**prof, "name": name or "this device"} if isinstance(prof, dict) else prof,
                                where=f"profile {profile}" if profile is not None else "--profile-json")
    if backend != "auto":
        from edgeweave.engine.backends import check

        check(backend)  # unknown, or not installed on this device: said now
    from edgeweave.runtime.follower import serve

    raise typer.Exit(serve(leader, name, threads=threads, model_path=model, profile=prof,
                           connect_timeout_s=connect_timeout, key=use_key(key), backend=backend))


def register(app: typer.Typer) -> None:
    app.command()(run)
    app.command()(worker)
