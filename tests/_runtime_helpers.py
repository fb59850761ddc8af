"""Shared by the runtime test modules: run a planner-made plan on a session and check it."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

from edgeweave.checkpoint import load_model
from edgeweave.planning.graph import capture
from edgeweave.planning.planner import make_plan
from edgeweave.profiling.profile import Cluster
from edgeweave.runtime.run import compare, load_for_run

_graphs: dict = {}


def _model(cl, name: str, size: int):
    """Load (and ship, once per model name: weights do not depend on the input size) ``name``."""
    key = name
    if getattr(cl, "_test_model_key", None) != key:
        model, spec = load_for_run(name, size)
        cl.load_model(model, spec)
        cl._test_model_key = key
        cl._test_model = model
    return cl._test_model


def check(cl, name: str, size: int, workers: int, partition: str = "optimal", fusion: str = "auto",
          mode: str = "exchange", batch: int = 1, profiles: Cluster | None = None, order=None, split: str = "auto"):
    model = _model(cl, name, size)
    shape = (batch, 3, size, size)
    gkey = (id(model), size, batch)  # a graph holds its own model's weights
    if gkey not in _graphs:
        _graphs.clear()
        _graphs[gkey] = capture(model, shape)
    cluster = profiles or Cluster(cl.cluster.devices[: workers + 1])
    plan = make_plan(_graphs[gkey], cluster, partition=partition, fusion=fusion, mode=mode, model_name=name,
                     model_hash=cl.model_hash, order=order, split=split)
    torch.manual_seed(1)
    x = torch.randn(shape)
    y, timings = cl.infer(x, cl.load_plan(plan))
    with torch.no_grad():
        ref = model(x)
    err = compare(y, ref)
    assert float(ref.abs().max()) > 1e-3 and float(ref.std()) > 1e-4, f"degenerate reference: {name} proves nothing"
    assert err["rel_err"] <= 1e-4, (name, size, workers, partition, fusion, mode, batch, order, split, err)
    assert len(timings.per_device) == cl.world
    return plan


def strip_sizes(plan) -> list[int]:
    return [a.out_rows[1] - a.out_rows[0] for s in plan.stages if s.kind == "spatial" for a in s.assignments
            if a.out_rows[1] > a.out_rows[0]]


def small_model():
    torch.manual_seed(0)
    model, spec = load_model("small_cnn", in_channels=1, input_size=28)
    # non-trivial batch-norm statistics so that wrong halos or padding show up in the output
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval(), spec


def _alive(pid: int) -> bool:
    """Is ``pid`` a live (non-zombie) process? Reads /proc, no psutil."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def equal_stream(cl, model: torch.nn.Module, **kw):
    """An adaptive stream over ``small_model`` on ``cl`` with an equal split: every follower has
    rows, so one that dies takes work with it."""
    from edgeweave.runtime.stream import AdaptiveStream

    plan = make_plan(capture(model, (1, 1, 28, 28)), cl.cluster, partition="equal", fusion="pools",
                     mode="exchange", model_hash=cl.model_hash)
    return AdaptiveStream(cl, plan, cl.cluster, **kw)


@contextlib.contextmanager
def small_cluster(workers: int, timeout_s: float, grace_s: float = 0.0) -> Iterator[tuple]:
    """``small_model`` loaded on a LocalCluster of ``workers`` followers; yields (cluster, model,
    spec). After a clean exit every process the cluster started must be gone, within ``grace_s``
    (a follower that was stopped with SIGSTOP takes a moment to reap)."""
    from edgeweave.runtime.leader import LocalCluster

    model, spec = small_model()
    cl = LocalCluster(workers, timeout_s=timeout_s)
    pids = cl.pids
    try:
        cl.load_model(model, spec)
        yield cl, model, spec
    finally:
        cl.close()
    deadline = time.monotonic() + grace_s
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)


def edges(costs, total, capabilities=None):
    """An uneven partition: one unit (or row) to the first and the last device, nothing to the
    second, the rest to the third (channel-split tests: uneven slices, a device holding none)."""
    k = len(costs)
    counts = [0] * k
    counts[0] = min(1, total)
    counts[-1] = min(1, total - counts[0])
    counts[2 if k > 3 else -1] += total - counts[0] - counts[-1]
    return counts
