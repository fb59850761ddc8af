"""What a plan asks of each device's memory: the weights it holds and the values it keeps at once.

Pure: a captured graph and a plan in, bytes per device out. Per device:

* ``weights``: bytes of the weights its stages read. A row strip reads all of its layers'
  weights (every filter for every row); a channel slice ``[c0, c1)`` of ``C`` output channels
  reads ``(c1 - c0) / C`` of them; a Linear split by output features reads its features' rows;
  a reduction's partial sum over rows reads its rows' columns. A backend other than torch (ONNX
  Runtime, OpenVINO) keeps its own copy of the weights of the stages it compiles, on top. The
  leader keeps the whole model (it re-plans, takes over a lost device's work and checks results).
  A follower's model is a mapping of the file it received (checkpoint.py): what its plans do not
  read stays on disk, except its 4-D weights, which it holds in the devices' memory layout
  (layout.py), a copy of its own, whatever its share.
* ``activations``: the largest sum, over its stages, of its input window, its output and the
  largest value computed in between, at its share of the rows or channels.
* ``runtime``: the process itself (Python, torch, edgeweave), ``RUNTIME_BYTES`` unless measured.

``over_budget(memory, budgets)`` says which devices a plan would overfill: ``DeviceProfile.
memory_bytes`` (a cgroup's limit or the board's RAM, found when the worker joins) is a hard
limit; the planner (``planner.make_plan``) keeps the fastest plan that fits, or says which device
is short and by how much.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.fx

from edgeweave.planning.cost import DTYPE_BYTES
from edgeweave.planning.plan import Plan, Stage

# A worker at rest, measured (/proc/self/status RssAnon after importing what it runs, torch
# 2.14.1's CUDA build on x86_64, ``edgeweave worker`` waiting for its leader): 375 MB of its own
# memory, plus the shared libraries' pages. A CPU-only torch build needs less; a profile says.
RUNTIME_BYTES = 400 << 20


@dataclass(frozen=True)
class DeviceMemory:
    weights: int
    activations: int
    runtime: int = RUNTIME_BYTES

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.runtime

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def node_weight_bytes(gm: torch.fx.GraphModule, node: torch.fx.Node) -> int:
    """Bytes of the parameters and buffers a node reads (a module's own, or a get_attr tensor)."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        ts = [*mod.parameters(), *mod.buffers()]
    elif node.op == "get_attr":
        owner, _, name = str(node.target).rpartition(".")
        t = getattr(gm.get_submodule(owner), name, None)
        ts = [t] if isinstance(t, torch.Tensor) else []
    else:
        return 0
    return sum(t.numel() * t.element_size() for t in ts)


def _numel(shape: object) -> int:
    n = 1
    for v in shape if isinstance(shape, (list, tuple)) else ():
        n *= int(v)
    return n


def _share(r: tuple[int, int], total: int) -> float:
    return max(0, r[1] - r[0]) / total if total > 0 else 0.0


def _stage_share(st: Stage, device: int, in_axis: int) -> tuple[float, float, float]:
    """(weights, input, output) shares of stage ``st`` on ``device``; ``in_axis``: the axis its
    input is split along (``Plan.in_axis``)."""
    if st.kind == "leader":
        return (1.0, 1.0, 1.0) if device == 0 else (0.0, 0.0, 0.0)
    a = st.assignment(device)
    if a is None:
        return 0.0, 0.0, 0.0
    out_total = int(st.output_shape[st.out_axis]) if st.output_shape else 0
    out = _share(a.out_rows, out_total)
    inp = _share(a.in_rows, int(st.input_shape[in_axis]) if len(st.input_shape) > in_axis else 0)
    if st.kind == "spatial":
        w = out if st.split == "channels" else (1.0 if out > 0 else 0.0)
    elif st.kind == "reduce":
        w = inp  # partial sums over its rows: its rows' columns of the layer
    else:  # linear: its output features' rows
        w = out
    return w, inp, out


def _backend(plan: Plan, device: int) -> str:
    return plan.backends[device] if device < len(plan.backends) else "torch"


def plan_memory(gm: torch.fx.GraphModule, plan: Plan, runtime: list[int] | None = None) -> list[DeviceMemory]:
    """Each device's memory under ``plan`` (module docstring), in device order; ``runtime``: each
    process's own bytes at rest, where measured (default ``RUNTIME_BYTES``)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    model_bytes = sum(t.numel() * t.element_size() for t in (*gm.parameters(), *gm.buffers()))
    # a follower's model is in the devices' memory layout (layout.py): its 4-D weights are copies
    layout_bytes = sum(t.numel() * t.element_size() for t in gm.parameters() if t.dim() == 4)
    k = len(plan.devices)
    held: list[dict[str, float]] = [{} for _ in range(k)]  # device -> weight owner -> bytes read
    peak = [0.0] * k
    for s, st in enumerate(plan.stages):
        in_axis = plan.in_axis(s)
        stage_nodes = [nodes[n] for n in st.nodes if n in nodes]
        biggest = max((_numel(n.meta.get("ew_shape")) for n in stage_nodes), default=0)
        for d in range(k):
            w, inp, out = _stage_share(st, d, in_axis)
            if w == inp == out == 0.0:
                continue
            compiled = st.kind in ("spatial", "leader") and _backend(plan, d) != "torch"
            for n in stage_nodes:
                b = node_weight_bytes(gm, n)
                if b:
                    key = str(n.target)
                    held[d][key] = max(held[d].get(key, 0.0), b * w)
                    if compiled:  # the backend's session keeps its own copy (reductions run on torch)
                        held[d]["compiled:" + key] = max(held[d].get("compiled:" + key, 0.0), b * w)
            act = (_numel(st.input_shape) * inp + (_numel(st.output_shape) + biggest) * out) * DTYPE_BYTES
            peak[d] = max(peak[d], act)
    ends = (_numel(plan.input_shape) + _numel(plan.stages[-1].output_shape if plan.stages else [])) * DTYPE_BYTES
    out = []
    for d in range(k):
        copies = sum(v for key, v in held[d].items() if key.startswith("compiled:"))
        own = model_bytes if d == 0 else sum(held[d].values()) - copies + layout_bytes
        weights = int(copies + own)
        base = runtime[d] if runtime is not None and d < len(runtime) else RUNTIME_BYTES
        out.append(DeviceMemory(weights, int(peak[d] + (ends if d == 0 else 0)), base))
    return out


def over_budget(memory: list[DeviceMemory], budgets: list[int]) -> list[tuple[int, int, int]]:
    """``(device, needs, has)`` for each device whose need exceeds its budget (0: unknown)."""
    return [(d, m.total, b) for d, (m, b) in enumerate(zip(memory, budgets)) if b > 0 and m.total > b]


def memory_report(plan: Plan, budgets: list[int]) -> dict[str, dict[str, int]]:
    """Per device name: its memory under ``plan`` (``plan.meta["memory"]``) and its limit (0: unknown)."""
    return {d: {**m, "limit": int(b)} for d, m, b in zip(plan.devices, plan.meta.get("memory", []), budgets)}


def memory_line(report: dict[str, dict[str, int]]) -> str:
    mb = 1 << 20
    return "memory (MB; weights + activations + runtime = total / limit): " + "; ".join(
        f"{d} {m['weights'] / mb:.0f} + {m['activations'] / mb:.0f} + {m['runtime'] / mb:.0f} = {m['total'] / mb:.0f}"
        + (f" / {m['limit'] / mb:.0f}" if m.get("limit") else "") for d, m in report.items())
