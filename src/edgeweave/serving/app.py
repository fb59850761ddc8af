"""The HTTP API (FastAPI) over an :class:`~edgeweave.serving.server.InferenceServer`.

- ``POST /v1/infer``: the body is an image file (``Content-Type: image/...``) or the input tensor
  as raw little-endian float32 (``application/octet-stream``). Answers the top classes, the
  inference's latency and what the cluster did for this frame; ``?logits=true`` adds the outputs.
  A multi-exit model (``serving.ondemand``) also takes ``?budget_ms=`` and ``?min_accuracy=``
  and answers with the operating point that ran and the exit the sample left at.
- ``GET /v1/model``: what to send (channels, size, normalisation, classes) and how the model runs
  (the current plan, or the operating points).
- ``GET /v1/stats``: counters, latency percentiles over recent frames, devices, speed estimates.
- ``GET /metrics``: the same statistics in Prometheus' text format (``serving.metrics``).
- ``GET /healthz``: 200 while the server answers (the cluster's state is in ``/v1/stats``).

Errors are JSON ``{"detail": "..."}`` with 400 (bad input), 413 (body too large), 415 (content
type), 503 (busy or the cluster failed). The body is read in chunks and refused once it passes
the limit, so a client cannot make the leader (an edge board) buffer more than that.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from fastapi import FastAPI, HTTPException, Request, Response
from starlette.concurrency import run_in_threadpool

from edgeweave.errors import EdgeweaveError
from edgeweave.serving.metrics import CONTENT_TYPE as METRICS_TYPE
from edgeweave.serving.metrics import exposition
from edgeweave.serving.preprocess import RAW_TYPES, Norm, decode_image, decode_raw
from edgeweave.serving.server import Busy, ClusterFailed


def create_app(server: Any, norm: Norm, max_body_bytes: int = 16 << 20) -> FastAPI:
    """``server``: an :class:`InferenceServer` (the cluster) or an
    :class:`~edgeweave.serving.ondemand.OnDemandServer` (a multi-exit model on the leader)."""
    app = FastAPI(title="edgeweave", summary="Exact distributed inference on a cluster of edge devices.")
    spec = server.spec

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/model")
    def model() -> dict[str, Any]:
        return {
            "model": server.model_name, "input_shape": list(server.input_shape), "normalize": {"mean": list(norm[0]),
                                                                                              "std": list(norm[1])},
            "num_classes": spec.num_classes, "classes": spec.classes, **server.model_info(),
            "accepts": ["image/png", "image/jpeg", "image/bmp", "image/tiff", *RAW_TYPES],
            "max_body_bytes": max_body_bytes,
        }

    @app.get("/v1/stats")
    def stats() -> dict[str, Any]:
        return server.stats()

    scrape = exposition(server)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(scrape(), media_type=METRICS_TYPE)

    @app.post("/v1/infer")
    async def infer(request: Request, top: int = 5, logits: bool = False, budget_ms: Optional[float] = None,
                    min_accuracy: Optional[float] = None) -> dict[str, Any]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if not (ctype.startswith("image/") or ctype in RAW_TYPES):
            raise HTTPException(415, f"send an image (Content-Type: image/png, image/jpeg, ...) or a raw float32 "
                                     f"tensor ({RAW_TYPES[0]}); got {ctype or 'no content type'!r}")
        if top < 1:
            raise HTTPException(400, "top must be at least 1")
        slo = {k: v for k, v in (("budget_ms", budget_ms), ("min_accuracy", min_accuracy)) if v is not None}
        if slo and not server.on_demand:
            raise HTTPException(400, f"{' and '.join(slo)} apply to a multi-exit model with operating points "
                                     f"(edgeweave exits calibrate); this server runs {server.model_name} whole")
        body = await _read_bounded(request, max_body_bytes)
        try:
            if ctype in RAW_TYPES:
                x = decode_raw(body, server.input_shape)
            else:
                x = await run_in_threadpool(decode_image, body, server.input_shape[0], server.input_shape[1:], norm)
            y, info = await run_in_threadpool(server.infer, x, **slo)
        except (Busy, ClusterFailed) as e:
            raise HTTPException(503, str(e)) from None
        except EdgeweaveError as e:  # BadInput: the body cannot be the model's input
            raise HTTPException(400, str(e)) from None
        if server.on_demand:  # the exit's probabilities (or the vote's), not logits
            probs = y[0].flatten().double()
            extra = {"probabilities": y[0].tolist()} if logits else {}
        else:
            probs = torch.softmax(y[0].flatten().double(), dim=0)
            extra = {"logits": y[0].tolist()} if logits else {}
        return {**_classes(probs, top, spec.classes), **info, **extra}

    return app


async def _read_bounded(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"body of {declared} bytes; at most {limit} are accepted")
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise HTTPException(413, f"body over {limit} bytes")
    return bytes(buf)


def _classes(p: torch.Tensor, top: int, names: list[str] | None) -> dict[str, Any]:
    """The most probable classes of the distribution ``p`` (C,)."""
    vals, idx = p.topk(min(top, p.numel()))
    out = [{"class": int(i), "score": float(v), **({"label": names[int(i)]} if names and int(i) < len(names) else {})}
           for v, i in zip(vals, idx)]
    return {"prediction": out[0], "top": out}
