"""A device's compiled share of a plan: made when the plan is prepared, run every frame.

``prepare(gm, plan, device, backend)`` compiles, for every stage the device takes part in,
what it computes there (``StageProgram``); ``DeviceProgram.run(s, x, reduce_fn)`` runs stage
``s`` on a frame. Kinds of stage programs:

* ``whole``: the device computes the stage alone (the leader's stages, or a spatial stage whose
  strip is the whole map): the stage's own nodes as one graph (``stage.stage_module``);
* ``strip``: its strip of a spatial stage, lowered to static graphs (engine/lower.py);
* ``channels``: its slice of a stage split by output channels (engine/channels.py);
* ``reduce`` / ``linear``: partial sums and Linear slices, on torch (engine/reduce.py).

Graphs go through the backend (engine/backends.py): torch runs them as generated code; ONNX
Runtime or OpenVINO compile them to their kernels. Compiled programs are kept per graph, keyed
by what they compute (stage nodes, rows, owned rows of reductions, backend, threads), so a plan
whose shapes were seen before is prepared without compiling anything.

A backend that cannot compile a graph raises ``BackendError`` naming the backend and the
stage's nodes, unless the caller allows a fallback (``backend auto``): then that graph runs on
torch and ``DeviceProgram.fallbacks`` says so.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx

from edgeweave.engine import backends
from edgeweave.engine.channels import lower_channels
from edgeweave.engine.lower import Lowered, ReduceStep, Segment, lower_strip
from edgeweave.engine.reduce import (
    Program,
    ReduceFn,
    drive,
    finish_reduce,
    linear_program,
    partial_sum,
    prepare_reductions,
    reduce_program,
    small_value,
)
from edgeweave.engine.stage import by_name, stage_io, stage_module, whole_on, writes_input
from edgeweave.errors import EdgeweaveError
from edgeweave.layout import dense
from edgeweave.planning.halo import is_empty
from edgeweave.planning.plan import Plan, Stage

_KEPT = 256  # compiled stage programs kept per graph at most
_KEPT_WEIGHTS = 2.0
"""Weight bytes the kept programs may hold of their own, in multiples of the model's: an ONNX
Runtime or OpenVINO session (and a channel slice) keeps its own copy of its layers' weights,
so a stream that re-plans often kept every plan's copies (VGG16's followers grew past 2 GB each
and a test host ran out of memory); about two plans' worth stay, the most recent first."""


class BackendError(EdgeweaveError):
    """A backend could not compile (or is not installed for) a device's share of a stage."""


@dataclass
class StageProgram:
    """One device's compiled share of one stage."""

    kind: str  # whole | strip | channels | reduce | linear
    stage: Stage
    device: int
    backend: str  # what runs its graphs (torch where it fell back)
    run_graph: Callable[..., Any] | None = None  # whole: the stage graph
    steps: list[Any] = field(default_factory=list)  # strip: compiled segments and reduction steps
    lowered: Lowered | None = None
    copy_input: bool = False  # the graph may write into its input (torch only): copy it first
    in_axis: int = 2  # the axis the stage input is split along (a reduce stage's held rows or channels)

    def program(self, gm: torch.fx.GraphModule, x: torch.Tensor | None) -> Program:
        if x is not None and self.copy_input:
            x = x.clone()
        if self.kind == "whole":
            assert self.run_graph is not None
            return _whole(self.run_graph, x)
        if self.kind == "channels":
            assert self.run_graph is not None and x is not None
            run = self.run_graph
            return _whole(lambda v: run(v)[0], x)  # computed when stepped (timed there), not here
        if self.kind == "reduce":
            return reduce_program(gm, self.stage, self.device, x, self.in_axis)
        if self.kind == "linear":
            a = self.stage.assignment(self.device)
            assert a is not None and x is not None
            stage, rows = self.stage, a.out_rows
            return _whole(lambda v: linear_program(gm, stage, rows, v), x)
        assert x is not None and self.lowered is not None
        return _strip(gm, self, x)


def _whole(fn: Callable[..., Any], x: torch.Tensor | None) -> Program:
    return fn(x)
    yield  # a generator that never yields: the device owns every reduction's rows


def _strip(gm: torch.fx.GraphModule, prog: StageProgram, x: torch.Tensor) -> Program:
    lowered = prog.lowered
    assert lowered is not None
    a = prog.stage.assignment(prog.device)
    assert a is not None
    if x.shape[2] != a.in_rows[1] - a.in_rows[0]:
        raise ValueError(f"stage {prog.stage.index}: got {x.shape[2]} input rows, the assignment says {a.in_rows}")
    by = by_name(gm)
    values: dict[str, Any] = {lowered.input: x}
    for step, run in prog.steps:
        if isinstance(step, Segment):
            outs = run(*[values[k] for k in step.inputs])
            for k in step.inputs:
                if k not in step.outputs:
                    values.pop(k, None)  # released (small values stay: later segments may read them)
            values.update(zip(step.outputs, outs))
        elif isinstance(step, ReduceStep):
            node = by[step.node]
            src = values.pop(step.source) if step.source is not None else None
            part = None if src is None else partial_sum(gm, node, src, step.own)
            total = yield (step.index, part)
            if total is None:
                raise ValueError(f"stage {prog.stage.index}: no total for reduction {step.node}")
            values[step.node] = finish_reduce(gm, node, total)
        else:
            values[step.node] = small_value(gm, by[step.node], values)
    return values[lowered.output]


def _compile(seg: Segment, backend: str, threads: int, allow_fallback: bool, where: str,
             fallbacks: list[str]) -> tuple[Callable[..., Any], str]:
    if backend == "torch" or not seg.computes:
        return seg.module, "torch"
    try:
        return backends.get(backend).compile(seg, threads), backend
    except Exception as e:  # noqa: BLE001 - exporters and runtimes raise many types
        msg = f"backend {backend} cannot compile {where}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        if not allow_fallback:
            raise BackendError(msg) from None
        fallbacks.append(msg + "; it runs on torch")
        return seg.module, "torch"


def _nodes_label(stage: Stage) -> str:
    return f"stage {stage.index} (nodes {stage.nodes[0]}..{stage.nodes[-1]})" if stage.nodes else f"stage {stage.index}"


def compile_stage(gm: torch.fx.GraphModule, stage: Stage, device: int, backend: str = "torch",
                  threads: int | None = None, allow_fallback: bool = False,
                  fallbacks: list[str] | None = None, in_axis: int = 2) -> StageProgram | None:
    """``device``'s share of ``stage`` compiled for ``backend`` (None: it computes nothing);
    ``in_axis``: the axis the stage input is split along (``Plan.in_axis``)."""
    threads = threads or torch.get_num_threads()
    a = stage.assignment(device)
    owned = tuple((r.node, r.owned(device)) for r in stage.reductions)
    key = (backend, threads, tuple(stage.nodes), stage.kind, stage.split, in_axis,
           None if a is None else (a.in_rows, a.out_rows), owned, device == 0)
    cache: OrderedDict = gm.meta.setdefault("ew_engine_programs", OrderedDict())
    hit = cache.get(key)
    if hit is not None:
        cache.move_to_end(key)
        prog, notes = hit
        if fallbacks is not None:
            fallbacks.extend(notes)
        return prog if prog is None else _rebind(prog, stage, device)
    notes: list[str] = []
    prog = _make(gm, stage, device, backend, threads, allow_fallback, notes, in_axis)
    cache[key] = (prog, notes)
    held = gm.meta.setdefault("ew_engine_held", {})
    held[key] = _own_weight_bytes(gm, stage, prog)
    budget = _KEPT_WEIGHTS * sum(p.numel() * p.element_size() for p in gm.parameters())
    while len(cache) > 1 and (len(cache) > _KEPT or sum(held.get(k, 0) for k in cache) > budget):
        old_key, _ = cache.popitem(last=False)
        held.pop(old_key, None)
    if fallbacks is not None:
        fallbacks.extend(notes)
    return prog


def _own_weight_bytes(gm: torch.fx.GraphModule, stage: Stage, prog: StageProgram | None) -> int:
    """Bytes of weights ``prog`` holds apart from the model's own (module docstring of
    ``_KEPT_WEIGHTS``): the stage's layers' weights for another backend or a channel slice (an
    upper bound), none for torch graphs that call the model's modules."""
    if prog is None or (prog.backend == "torch" and prog.kind != "channels"):
        return 0
    total = 0
    for name in stage.nodes:
        node = next((n for n in gm.graph.nodes if n.name == name), None)
        if node is not None and node.op == "call_module":
            total += sum(p.numel() * p.element_size() for p in gm.get_submodule(str(node.target)).parameters())
    return total


def _rebind(prog: StageProgram, stage: Stage, device: int) -> StageProgram:
    """A cached program for an equal stage of another plan: the same graphs, this plan's stage."""
    if prog.stage is stage:
        return prog
    return StageProgram(prog.kind, stage, device, prog.backend, prog.run_graph, prog.steps, prog.lowered,
                        prog.copy_input, prog.in_axis)


def _make(gm: torch.fx.GraphModule, stage: Stage, device: int, backend: str, threads: int, allow_fallback: bool,
          notes: list[str], in_axis: int) -> StageProgram | None:
    a = stage.assignment(device)
    where = _nodes_label(stage)
    if whole_on(stage, device):
        in_node, _ = stage_io(gm, stage)
        mod = stage_module(gm, stage)
        shape = tuple(int(v) for v in in_node.meta.get("ew_shape") or [])
        # the model input comes as the user gave it (``DeviceProgram.feed``), other maps channels-last
        seg = Segment(mod, (in_node.name,), ("__out__",), (shape,), (len(shape) == 4 and in_node.op != "placeholder",),
                      _computes(mod))
        run, used = _compile(seg, backend, threads, allow_fallback, where, notes)
        return StageProgram("whole", stage, device, used, run_graph=run,
                            copy_input=used == "torch" and writes_input(gm, stage))
    if stage.kind == "reduce":
        if device != 0 and (a is None or is_empty(a.in_rows)):
            return None
        return StageProgram("reduce", stage, device, "torch", in_axis=in_axis)
    if a is None or is_empty(a.out_rows):
        return None
    if stage.kind == "linear":
        return StageProgram("linear", stage, device, "torch")
    if stage.kind != "spatial":
        raise ValueError(f"device {device} cannot compute {stage.kind} stage {stage.index}")
    if stage.split == "channels":
        run, used = _compile(lower_channels(gm, stage, *a.out_rows), backend, threads, allow_fallback, where, notes)
        return StageProgram("channels", stage, device, used, run_graph=run,
                            copy_input=used == "torch" and writes_input(gm, stage))
    lowered = lower_strip(gm, stage, device, a.in_rows, a.out_rows)
    steps: list[tuple[Any, Any]] = []
    used = "torch"
    for step in lowered.steps:
        if isinstance(step, Segment):
            run, got = _compile(step, backend, threads, allow_fallback, where, notes)
            used = got if step.computes else used
            steps.append((step, run))
        else:
            steps.append((step, None))
    return StageProgram("strip", stage, device, used, steps=steps, lowered=lowered,
                        copy_input=used == "torch" and writes_input(gm, stage))


def _computes(mod: torch.fx.GraphModule) -> bool:
    return any(n.op in ("call_module", "call_function", "call_method") for n in mod.graph.nodes)


@dataclass
class DeviceProgram:
    """Everything one device runs under one plan, compiled for its backend."""

    gm: torch.fx.GraphModule
    plan: Plan
    device: int
    backend: str
    stages: list[StageProgram | None]
    fallbacks: list[str] = field(default_factory=list)

    def feed(self, x: torch.Tensor) -> torch.Tensor:
        """The model input in the layout this device's first stage takes it: as given (NCHW) where
        a backend computes that stage whole (its interface takes it so: no copy each way), else
        the runtime's channels-last layout (strips of it travel as rows)."""
        first = self.stages[0] if self.stages else None
        if first is not None and first.kind == "whole" and first.backend != "torch" and x.dim() == 4:
            return x.contiguous()
        return dense(x)

    def run(self, s: int, x: torch.Tensor | None, reduce_fn: ReduceFn | None = None) -> Any:
        """Stage ``s`` on ``x`` (this device's input rows), answering reductions with ``reduce_fn``."""
        prog = self.stages[s]
        stage = self.plan.stages[s]
        if prog is None:
            raise ValueError(f"device {self.device} has no work in stage {stage.index}")
        with torch.no_grad():
            return drive(prog.program(self.gm, x), reduce_fn, stage)


def prepare(gm: torch.fx.GraphModule, plan: Plan, device: int, backend: str | None = None,
            fallback: bool | None = None, threads: int | None = None) -> DeviceProgram:
    """Compile ``device``'s share of ``plan`` (and make the reordered weights its linear
    reductions read), so that no frame pays for it.

    ``backend`` defaults to the plan's choice for the device (``plan.backends``), else torch;
    ``fallback`` (default: the plan's ``meta["backend_fallback"]``, set by ``--backend auto``)
    runs on torch what the backend cannot compile instead of failing.
    """
    chosen = backend or backend_of(plan, device)
    allow = bool(plan.meta.get("backend_fallback", False)) if fallback is None else fallback
    notes: list[str] = []
    if chosen != "torch":
        try:
            backends.check(chosen)
        except EdgeweaveError as e:
            if not allow:
                raise BackendError(str(e)) from None
            notes.append(f"{e}; device {device} runs on torch")
            chosen = "torch"
    prepare_reductions(gm, plan, device)
    progs = [compile_stage(gm, st, device, chosen, threads, allow, notes, plan.in_axis(s))
             for s, st in enumerate(plan.stages)]
    return DeviceProgram(gm, plan, device, chosen, progs, notes)


def backend_of(plan: Plan, device: int) -> str:
    """The backend ``plan`` chose for ``device`` (torch where it says nothing)."""
    return str(plan.backends[device]) if device < len(plan.backends) else "torch"


@torch.no_grad()
def run_stage(gm: torch.fx.GraphModule, stage: Stage, device: int, x: torch.Tensor | None,
              reduce_fn: ReduceFn | None = None, backend: str = "torch") -> Any:
    """Compute ``device``'s rows of ``stage`` from ``x`` (its ``in_rows`` of the stage input; the
    whole tensor for leader stages; its held rows, or None, in a ``reduce`` stage).

    The one-off form of ``prepare(...).run(...)`` (compiled programs are cached per graph).
    Stages with reductions need ``reduce_fn(i, partial) -> total``.
    """
    prog = compile_stage(gm, stage, device, backend)
    if prog is None:
        raise ValueError(f"device {device} has no work in stage {stage.index}")
    return drive(prog.program(gm, x), reduce_fn, stage)
