"""``edgeweave serve``: the leader answers HTTP requests with the cluster behind it.

Load the model, start (or wait for) the followers, plan, warm the strips up, then serve until
interrupted (Ctrl-C or SIGTERM: uvicorn finishes the requests in flight, then the followers are
told to leave). Every frame goes through the adaptive stream, so the cluster re-plans when a
device turns out slower or faster than its profile, and goes on without a device that dies.

A multi-exit checkpoint with calibrated operating points (``edgeweave exits calibrate``) is
served each request at the point its latency budget or accuracy target asks for: on this device
alone, or with ``--workers``/``--cluster`` its trunk segment by segment over the cluster
(``runtime.exits``), the points priced for the cluster.
"""

from __future__ import annotations

import socket
import stat
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgeweave.console import console
from edgeweave.errors import EdgeweaveError
from edgeweave.runtime.run import RunConfig, load_sized, open_session, plan_for, require_cluster
from edgeweave.serving.preprocess import check_norm, parse_normalize
from edgeweave.serving.server import InferenceServer, ServerLimits


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    run: RunConfig = field(default_factory=RunConfig)  # partition, fusion, mode
    normalize: str = "none"
    max_body_bytes: int = 16 << 20
    limits: ServerLimits = field(default_factory=ServerLimits)
    listen: str = "0.0.0.0:29400"  # where followers started by hand find the leader (with a cluster file)
    timeout_s: float = 60.0  # any network wait inside the cluster
    token: str | None = None  # every route but /healthz and /docs requires "Authorization: Bearer <token>"
    ssl_certfile: str | None = None  # HTTPS (both or neither), passed to uvicorn
    ssl_keyfile: str | None = None


def load_token(path: str | Path) -> str:
    """The bearer token in ``path`` (its first line, stripped)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as e:
        raise EdgeweaveError(f"cannot read the token file {path}: {getattr(e, 'strerror', None) or e}") from None
    token = text.strip().splitlines()[0].strip() if text.strip() else ""
    if len(token) < 16 or any(c.isspace() or not c.isprintable() for c in token):
        raise EdgeweaveError(f"{path} holds no usable token: one line of at least 16 printable characters, no spaces "
                             f"(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))' > {path})")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        console.print(f"[yellow]warning: the token file {path} is open to other users (chmod 600 {path})[/yellow]")
    return token


def check_tls(certfile: str | None, keyfile: str | None) -> None:
    if (certfile is None) != (keyfile is None):
        raise EdgeweaveError("give both --ssl-certfile and --ssl-keyfile (or neither)")
    for opt, f in (("--ssl-certfile", certfile), ("--ssl-keyfile", keyfile)):
        if f is not None and not Path(f).is_file():
            raise EdgeweaveError(f"{opt}: file not found: {f}")


def check_port(host: str, port: int) -> None:
    """Fail before the cluster starts (minutes on slow boards), not after."""
    if not 0 < port < 65536:
        raise EdgeweaveError(f"--port must be 1-65535, got {port}")
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise EdgeweaveError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def serve(model_name: str, input_size: int | None, workers: int | None, cluster_file: str | None,
          cfg: ServeConfig) -> dict[str, Any]:
    """Serve until interrupted; returns the final ``/v1/stats``."""
    from edgeweave.runtime.stream import AdaptiveStream
    from edgeweave.serving.app import create_app

    cfg.run.validate()
    if cfg.limits.max_waiting < 0 or cfg.limits.wait_timeout_s <= 0 or cfg.max_body_bytes < 1:
        raise EdgeweaveError("--max-waiting must be >= 0, --wait-timeout and --max-body-mb positive")
    on_demand = has_operating_points(model_name)
    on_cluster = workers is not None or bool(cluster_file)
    if on_demand and cfg.run.slo_ms is not None:
        raise EdgeweaveError(f"{model_name} has operating points: requests choose theirs with ?budget_ms= or "
                             "?min_accuracy=; --slo-ms (groups of devices) serves single-exit models")
    if not on_demand:
        require_cluster(workers, cluster_file)
    norm = parse_normalize(cfg.normalize)
    check_tls(cfg.ssl_certfile, cfg.ssl_keyfile)
    if workers is None and cluster_file:  # followers started by hand find us on cfg.listen
        from edgeweave.runtime import auth
        from edgeweave.limits import parse_address

        auth.require_key_or_loopback(parse_address(cfg.listen)[0], auth.key_from_env(), "leader")
    check_port(cfg.host, cfg.port)
    if on_demand and not on_cluster:
        if _is_variant_set(model_name):
            raise EdgeweaveError(f"{model_name} holds several variants: serve it with --workers N or --cluster")
        return _serve_on_demand(model_name, input_size, norm, cfg)
    torch.set_num_threads(1)
    model, spec, size = load_sized(model_name, input_size)
    check_norm(norm, spec.in_channels)
    with ExitStack() as stack:
        with console.status("starting the cluster, planning, warming up ..."):
            session = stack.enter_context(open_session(workers, cluster_file, cfg.listen, cfg.timeout_s))
            session.load_model(model, spec)
            if on_demand:
                server = _cluster_on_demand(session, model_name, model, spec, size, cfg)
            elif cfg.run.slo_ms is not None:
                server = _group_server(session, model, spec, size, model_name, cfg)
                stack.callback(server.close)
            else:
                plan = plan_for(session, model, (1, spec.in_channels, size, size), cfg.run, model_name)
                stream = AdaptiveStream(session, plan, session.cluster, plan_id=session.load_plan(plan))
                server = InferenceServer(stream, spec, model_name, cfg.limits)
            warm_s = server.warm_up()
        return _run(server, create_app(server, norm, cfg.max_body_bytes, cfg.token), cfg, warm_s)


def _group_server(session: Any, model: Any, spec: Any, size: int, model_name: str, cfg: ServeConfig) -> Any:
    """``--slo-ms``: requests served at once on groups of devices chosen for the SLO."""
    from edgeweave.planning.graph import capture
    from edgeweave.runtime.slo import group_planner
    from edgeweave.serving.groups import GroupInferenceServer

    gm = capture(model, (1, spec.in_channels, size, size))
    replan = group_planner(session, gm, cfg.run, model_name, slots=1)  # one request per group at a time
    gplan = replan(session.cluster)
    if not gplan.feasible:
        console.print(f"[yellow]warning: no grouping is predicted to keep {cfg.run.slo_ms:g} ms; serving on the "
                      f"fastest ({1e3 * gplan.latency_s:.0f} ms per request predicted): most requests will be "
                      "refused[/yellow]")
    assert cfg.run.slo_ms is not None
    return GroupInferenceServer(session, gplan, replan, spec, model_name, cfg.run.slo_ms / 1e3, cfg.limits)


def _cluster_on_demand(session: Any, model_name: str, model: Any, spec: Any, size: int, cfg: ServeConfig) -> Any:
    """A calibrated multi-exit model with its trunk over the cluster, each request at its point;
    or a variant set (``exits combine``), each request at its variant and point."""
    from edgeweave.checkpoint import read_metadata
    from edgeweave.exits.ondemand import points_from_extra
    from edgeweave.runtime.exits import ClusterExits, ClusterOnDemand
    from edgeweave.runtime.variants import VariantsOnDemand, points_from_variants_extra
    from edgeweave.serving.ondemand import OnDemandServer

    extra = read_metadata(model_name).get("extra", {})
    r = cfg.run
    plan_kwargs = dict(partition=r.partition, fusion=r.fusion, mode=r.mode, backend=r.backend, split=r.split)
    by_variant = points_from_variants_extra(extra)
    if by_variant:  # several variants: each request picks the variant and its point
        od = VariantsOnDemand(session, model, by_variant, (1, spec.in_channels, size, size), model_name=model_name,
                              **plan_kwargs)
        od.model_spec = spec
        return OnDemandServer(od, spec, model_name, cfg.limits)
    points = points_from_extra(extra)
    ce = ClusterExits(session, model, (1, spec.in_channels, size, size), model_name=model_name, **plan_kwargs)
    return OnDemandServer(ClusterOnDemand(ce, points, model_spec=spec), spec, model_name, cfg.limits)


def has_operating_points(model_name: str) -> bool:
    """Whether ``model_name`` is a checkpoint that ``exits calibrate`` gave operating points
    (read from its header: the weights are not loaded for this)."""
    from edgeweave.checkpoint import is_checkpoint_path, read_metadata
    from edgeweave.exits.ondemand import points_from_extra

    from edgeweave.runtime.variants import points_from_variants_extra

    if not is_checkpoint_path(model_name):
        return False
    extra = read_metadata(model_name).get("extra", {})
    return bool(points_from_extra(extra) or points_from_variants_extra(extra))


def _is_variant_set(model_name: str) -> bool:
    from edgeweave.checkpoint import read_metadata

    return read_metadata(model_name).get("spec", {}).get("name") == "variant_set"


def _serve_on_demand(model_name: str, input_size: int | None, norm: Any, cfg: ServeConfig) -> dict[str, Any]:
    from edgeweave.exits.ondemand import OnDemandModel
    from edgeweave.serving.app import create_app
    from edgeweave.serving.ondemand import OnDemandServer

    od = OnDemandModel.load(model_name)
    # the threads the operating points were measured with (exits calibrate --threads, default 1)
    torch.set_num_threads(int(od.measured_on.get("threads", 1)))
    spec = od.model_spec
    if input_size is not None and (input_size, input_size) != tuple(spec.input_size):
        raise EdgeweaveError(f"{model_name} was calibrated at {spec.input_size[0]}x{spec.input_size[1]}; "
                             f"drop --input-size or give {spec.input_size[0]}")
    check_norm(norm, spec.in_channels)
    server = OnDemandServer(od, spec, model_name, cfg.limits)
    return _run(server, create_app(server, norm, cfg.max_body_bytes, cfg.token), cfg, server.warm_up())


def _run(server: Any, app: Any, cfg: ServeConfig, warm_s: float) -> dict[str, Any]:
    import uvicorn

    scheme = "https" if cfg.ssl_certfile else "http"
    console.print(f"serving {server.model_name} {list(server.input_shape)} on {scheme}://{cfg.host}:{cfg.port} "
                  f"{server.describe()}; warm-up {warm_s:.3f} s\n"
                  f"  POST /v1/infer (image/* or application/octet-stream float32"
                  f"{'; ?budget_ms= or ?min_accuracy=' if server.on_demand else ''}), GET /v1/model, /v1/stats, "
                  f"/metrics, /healthz, /docs; "
                  f"{'a bearer token is required (but for /healthz, /docs); ' if cfg.token else ''}Ctrl-C stops")
    # no limit_concurrency: uvicorn's refusals are plain text and uncounted; the app bounds
    # the requests in flight itself (serving.app._Gatekeeper)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", timeout_keep_alive=5,
                ssl_certfile=cfg.ssl_certfile, ssl_keyfile=cfg.ssl_keyfile)
    return server.stats()
