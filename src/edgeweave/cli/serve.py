"""`edgeweave serve`: answer HTTP inference requests on the leader, the cluster behind it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgeweave.cli.common import (
    BackendOpt, ClusterOpt, FusionOpt, InputSizeOpt, JsonOpt, ListenOpt, ModeOpt, ModelOpt, PartitionOpt, WorkersOpt,
    console, emit_json, told_early,
)
from edgeweave.cli.keygen import KeyOpt, use_key


def serve(
    model: str = ModelOpt,
    input_size: Optional[int] = InputSizeOpt,
    workers: Optional[int] = WorkersOpt,
    cluster: Optional[str] = ClusterOpt,
    listen: str = ListenOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="Address the HTTP API listens on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", help="Port of the HTTP API."),
    partition: str = PartitionOpt,
    fusion: str = FusionOpt,
    mode: str = ModeOpt,
    backend: str = BackendOpt,
    normalize: str = typer.Option("none", "--normalize", help="How images sent to /v1/infer are normalised after "
                                  "scaling to [0, 1]: the training data's name (imagenet, cifar100, neucls, mnist5k) "
                                  "or MEAN/STD per channel, e.g. 0.5/0.25. Raw tensors are used as sent."),
    max_body_mb: float = typer.Option(16.0, "--max-body-mb", help="Largest request body accepted (413 above)."),
    max_waiting: int = typer.Option(8, "--max-waiting", help="Requests that may wait for the cluster (503 beyond)."),
    wait_timeout: float = typer.Option(30.0, "--wait-timeout",
                                       help="Seconds a request may wait for its turn (503 after)."),
    slo_ms: Optional[float] = typer.Option(None, "--slo-ms", help="Per-request latency bound: requests run at once "
                                           "on groups of devices chosen for the most requests per second that keep "
                                           "it, and a request predicted to miss it is refused at once (503, counted "
                                           "as refused_slo). Without it requests run one at a time on the whole "
                                           "cluster."),
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds any network wait inside the cluster may take."),
    key: Optional[Path] = KeyOpt,
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="Require `Authorization: Bearer <token>` "
                                              "(the file's first line) on every route but /healthz and /docs (401)."),
    ssl_certfile: Optional[str] = typer.Option(None, "--ssl-certfile", help="Serve HTTPS with this certificate "
                                               "(PEM; with --ssl-keyfile)."),
    ssl_keyfile: Optional[str] = typer.Option(None, "--ssl-keyfile", help="The certificate's private key (PEM)."),
    json_out: Optional[str] = JsonOpt,
) -> None:
    """Serve inference over HTTP until Ctrl-C: every request is one exact distributed inference.

    The cluster re-plans when a device turns out slower or faster than its profile, goes on
    without a device that dies (the request that failed runs again) and takes back one that
    registers again. A multi-exit checkpoint calibrated with `edgeweave exits calibrate` is served
    on this device alone instead (no --workers): each request may add ?budget_ms= or
    ?min_accuracy= and runs at the operating point that serves it best. At the end it prints (or
    writes, with --json) the final statistics."""
    use_key(key, listen if cluster and workers is None else None)  # the cluster's key; --listen checked against it
    told_early(timeout=timeout, input_size=input_size, cluster=cluster)
    from edgeweave.runtime.run import RunConfig
    from edgeweave.serving.serve import ServeConfig, load_token, serve as do_serve
    from edgeweave.serving.server import ServerLimits

    cfg = ServeConfig(host=host, port=port, run=RunConfig(partition=partition, fusion=fusion, mode=mode, backend=backend,
                                                           slo_ms=slo_ms),
                      normalize=normalize, max_body_bytes=int(max_body_mb * (1 << 20)),
                      limits=ServerLimits(max_waiting=max_waiting, wait_timeout_s=wait_timeout), listen=listen,
                      timeout_s=timeout, token=load_token(token_file) if token_file is not None else None,
                      ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)
    stats = do_serve(model, input_size, workers, cluster, cfg)
    lat = stats["latency_s"]
    more = (f"{stats['unsatisfied']} could not be met; by point {stats['by_point']}" if "by_point" in stats
            else f"{stats['refused_slo']} refused for the SLO, {stats['regroups']} regroups" if "refused_slo" in stats
            else f"{stats['replans']} re-plans, {stats['regroups']} regroups")
    console.print(f"stopped: {stats['served']} served, {stats['refused']} refused (busy), {stats['failed']} failed"
                  + (f", {stats['unauthorized']} unauthorized" if stats.get("unauthorized") else "") + "; "
                  f"{more}" + (f"; latency p50 {lat['p50']:.4f} s, p90 {lat['p90']:.4f} s over the last {stats['window']}"
                               if lat else ""))
    emit_json(stats, json_out)


def register(app: typer.Typer) -> None:
    app.command()(serve)
