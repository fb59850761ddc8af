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
- ``GET /docs``: a page listing the routes and a form to send an image; it loads nothing from
  elsewhere (plant networks are often offline). ``/openapi.json`` is the schema.

Errors are JSON ``{"detail": "..."}`` with 400 (bad input, a malformed query parameter too),
401 (no or a wrong bearer token, with ``token``), 413 (body too large), 415 (content type), 503
(busy or the cluster failed). The body is read in chunks and refused once it passes the limit,
so a client cannot make the leader (an edge board) buffer more than that. Requests in flight are
bounded here (``max_in_flight``), not by uvicorn, so that every refusal is JSON and counted.
"""

from __future__ import annotations

import hmac
import html
import json
import math
from typing import Any, Optional

import torch
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from edgeweave.errors import EdgeweaveError
from edgeweave.serving.metrics import CONTENT_TYPE as METRICS_TYPE
from edgeweave.serving.metrics import exposition
from edgeweave.serving.preprocess import RAW_TYPES, Norm, decode_image, decode_raw
from edgeweave.serving.server import Busy, ClusterFailed


OPEN_PATHS = ("/healthz", "/docs")  # answered without a token: neither says anything about the model


def _infer_body() -> dict[str, Any]:
    """``POST /v1/infer``'s body as OpenAPI states it (the endpoint reads the raw body itself)."""
    binary = {"schema": {"type": "string", "format": "binary"}}
    return {"requestBody": {"required": True, "description": "An image file, or the input tensor as little-endian "
                            "float32 in (C, H, W) order (GET /v1/model says C, H, W).",
                            "content": {t: binary for t in ("image/png", "image/jpeg", "image/bmp", "image/tiff",
                                                            *RAW_TYPES)}}}


def _unavailable(e: Exception) -> HTTPException:
    """A 503 with the refusal's reason, and when to try again where the server knows."""
    retry = getattr(e, "retry_after_s", None)  # whole seconds (RFC 9110), at least one
    return HTTPException(503, str(e), headers={"Retry-After": str(max(1, math.ceil(retry)))}
                         if retry is not None else None)


def create_app(server: Any, norm: Norm, max_body_bytes: int = 16 << 20, token: str | None = None,
               max_in_flight: int | None = None) -> FastAPI:
    """``server``: an :class:`InferenceServer` (the cluster) or an
    :class:`~edgeweave.serving.ondemand.OnDemandServer` (a multi-exit model on the leader).
    ``token``: every route but ``OPEN_PATHS`` requires ``Authorization: Bearer <token>``.
    ``max_in_flight``: requests handled at once (default ``2 * max_waiting + 16``); more are
    refused with 503, counted as ``refused``."""
    app = FastAPI(title="edgeweave", summary="Exact distributed inference on a cluster of edge devices.",
                  docs_url=None, redoc_url=None)  # FastAPI's pages load their scripts from a CDN
    spec = server.spec
    limit = max_in_flight if max_in_flight is not None else 2 * server.limits.max_waiting + 16
    app.add_middleware(_Gatekeeper, counters=server.counters, token=token, limit=limit)

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(_request: Request, exc: RequestValidationError) -> JSONResponse:
        """A malformed query parameter (``?top=abc``) is a 400 with a string detail, as documented."""
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ())[1:]) or "request"
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return JSONResponse({"detail": "; ".join(parts)}, status_code=400)

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return HTMLResponse(_docs_page(app.openapi(), token is not None))

    @app.get("/healthz", summary="200 while the server answers (no token needed)")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/model", summary="What to send (input shape, normalisation, classes) and how the model runs")
    def model() -> dict[str, Any]:
        return {
            "model": server.model_name, "input_shape": list(server.input_shape), "normalize": {"mean": list(norm[0]),
                                                                                              "std": list(norm[1])},
            "num_classes": spec.num_classes, "classes": spec.classes, **server.model_info(),
            "accepts": ["image/png", "image/jpeg", "image/bmp", "image/tiff", *RAW_TYPES],
            "max_body_bytes": max_body_bytes,
        }

    @app.get("/v1/stats", summary="Counters, latency percentiles, the devices serving now")
    def stats() -> dict[str, Any]:
        return server.stats()

    scrape = exposition(server)

    @app.get("/metrics", summary="The statistics in Prometheus' text format")
    def metrics() -> Response:
        return Response(scrape(), media_type=METRICS_TYPE)

    @app.post("/v1/infer", openapi_extra=_infer_body(), summary="One inference: send an image or a raw float32 "
              "tensor; the top classes come back")
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
        admit = getattr(server, "admit", None)  # serve --slo-ms: refused before the body is read
        try:
            if admit is not None:
                admit()
        except Busy as e:
            raise _unavailable(e) from None
        body = await _read_bounded(request, max_body_bytes)
        try:
            if ctype in RAW_TYPES:
                x = decode_raw(body, server.input_shape)
            else:
                x = await run_in_threadpool(decode_image, body, server.input_shape[0], server.input_shape[1:], norm)
            y, info = await run_in_threadpool(server.infer, x, **slo)
        except (Busy, ClusterFailed) as e:
            raise _unavailable(e) from None
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


class _Gatekeeper:
    """ASGI middleware in front of every route: the bearer token (401), then the number of
    requests in flight (503). Both refusals are JSON and counted once (``unauthorized``,
    ``refused``), before a byte of the body is read."""

    def __init__(self, app: Any, counters: Any, token: str | None, limit: int) -> None:
        self.app, self.counters, self.limit = app, counters, max(1, limit)
        self.expect = f"Bearer {token}".encode() if token is not None else None
        self.in_flight = 0  # one event loop: no lock needed

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] == "/healthz":
            await self.app(scope, receive, send)
            return
        if self.expect is not None and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expect):
                self.counters.add("unauthorized")
                await _json(send, 401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                            [(b"www-authenticate", b"Bearer")])
                return
        if self.in_flight >= self.limit:
            self.counters.add("refused")
            await _json(send, 503, f"{self.in_flight} requests are already being handled; try again later")
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


async def _json(send: Any, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


def _docs_page(schema: dict[str, Any], needs_token: bool) -> str:
    """The API's routes from its OpenAPI schema, and a form that sends an image to
    ``/v1/infer``: one self-contained page (no script or style from elsewhere)."""
    rows = []
    for path, ops in schema.get("paths", {}).items():
        for method, op in ops.items():
            params = ", ".join(f"{p['name']}" for p in op.get("parameters", []))
            body = ", ".join(op.get("requestBody", {}).get("content", {}))
            rows.append(f"<tr><td><code>{html.escape(method.upper())}</code></td><td><code>{html.escape(path)}</code>"
                        f"</td><td>{html.escape(op.get('summary', ''))}</td><td>{html.escape(params)}</td>"
                        f"<td>{html.escape(body)}</td></tr>")
    token_field = ('<label>token <input id="token" type="password" size="40"></label><br>' if needs_token else
                   '<input id="token" type="hidden" value="">')
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>edgeweave API</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:1em auto}}td,th{{padding:.2em .6em;text-align:left;
vertical-align:top}}pre{{background:#f4f4f4;padding:.5em;white-space:pre-wrap}}</style></head><body>
<h1>{html.escape(schema.get("info", {}).get("title", "API"))} API</h1>
<p>{html.escape(schema.get("info", {}).get("summary", ""))} The full schema is <a href="openapi.json">/openapi.json</a>
{"(it needs the token)" if needs_token else ""}.</p>
<table><tr><th>method</th><th>path</th><th>what</th><th>query</th><th>body</th></tr>
{"".join(rows)}
</table>
<h2>Try <code>POST /v1/infer</code></h2>
<form id="f">{token_field}<input id="file" type="file" accept="image/*"> top <input id="top" value="5" size="3">
<button>send</button></form>
<pre id="out"></pre>
<script>
document.getElementById("f").onsubmit = async (ev) => {{
  ev.preventDefault();
  const file = document.getElementById("file").files[0];
  if (!file) return;
  const headers = {{"Content-Type": file.type || "application/octet-stream"}};
  const token = document.getElementById("token").value;
  if (token) headers["Authorization"] = "Bearer " + token;
  const r = await fetch("v1/infer?top=" + encodeURIComponent(document.getElementById("top").value),
                        {{method: "POST", headers: headers, body: file}});
  document.getElementById("out").textContent = r.status + "\n" + JSON.stringify(await r.json(), null, 2);
}};
</script></body></html>
"""


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
