"""Compute backends: what runs a device's graphs (engine/lower.py, engine/program.py).

* ``torch``: the graphs' generated code on torch's kernels (channels-last maps). Always there;
  the reference every other backend is checked against.
* ``ort``: ONNX Runtime on the CPU, one intra-op thread per device process unless the device
  says otherwise. Each graph is exported once (``torch.onnx.export``, opset 17) and compiled
  into a session with every graph optimisation on (it fuses convolutions with their
  activations, and lays weights out for its kernels).
* ``openvino``: OpenVINO on the CPU, when installed, with f32 inference pinned
  (``INFERENCE_PRECISION_HINT=f32``): on CPUs with bf16 units its default is bf16, which is not
  exact; ``openvino-bf16`` is that default, an explicit non-exact choice (``exact`` is False and
  ``--check`` says so).

Every backend takes and returns maps in the runtime's layout (channels-last torch tensors): the
exported graph's interface is NHWC, and a transpose at its ends lets the runtime hand a strip
over without a copy (ONNX Runtime folds it into the reorder it does anyway). The model's own
input, on the leader that computes the first stage whole, comes as the user gave it (NCHW):
``DeviceProgram.feed``. Rows, halos and
padding at the true borders are in the graph itself, so every backend computes exactly the
strip the plan says.
"""

from __future__ import annotations

import importlib.util
import io
import warnings
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from edgeweave.errors import EdgeweaveError
from edgeweave.resident import give_back

NAMES = ("torch", "ort", "openvino", "openvino-bf16")
_MODULES = {"ort": "onnxruntime", "openvino": "openvino", "openvino-bf16": "openvino"}
_PACKAGES = {"ort": "onnxruntime", "openvino": "openvino", "openvino-bf16": "openvino"}
OPSET = 17


@dataclass(frozen=True)
class Backend:
    name: str
    exact: bool  # equal to torch up to float rounding (rel_err <= 1e-5 on a strip)
    compile: Callable[[Any, int], Callable[..., Any]]  # (segment, threads) -> runner


def available() -> list[str]:
    """The backends this machine can run, torch first."""
    return [n for n in NAMES if n == "torch" or importlib.util.find_spec(_MODULES[n]) is not None]


def check(name: str) -> None:
    """Raise a one-line error when ``name`` is unknown or not installed here."""
    if name not in NAMES:
        raise EdgeweaveError(f"unknown backend {name!r}; choose one of {', '.join(NAMES)} or auto")
    if name not in available():
        raise EdgeweaveError(f"backend {name} is not installed on this device (pip install {_PACKAGES[name]})")


def get(name: str) -> Backend:
    check(name)
    return _BACKENDS[name]


def is_exact(name: str) -> bool:
    return name == "torch" or _BACKENDS[name].exact


def compile_module(module: torch.nn.Module, shapes: list[tuple[int, ...]], name: str,
                   threads: int = 1) -> Callable[..., Any]:
    """A plain module with inputs of fixed ``shapes`` compiled by backend ``name`` (what the
    profiler times: one layer as a device's backend runs it)."""
    seg = SimpleNamespace(module=module, inputs=tuple(f"x{i}" for i in range(len(shapes))),
                          input_shapes=tuple(tuple(int(v) for v in s) for s in shapes),
                          maps=tuple(len(s) == 4 for s in shapes))
    return get(name).compile(seg, threads)


class _NHWC(torch.nn.Module):
    """A graph with a channels-last interface for its maps (``maps``) and flat outputs: what an
    exporter is given."""

    def __init__(self, graph: torch.nn.Module, maps: tuple[bool, ...]) -> None:
        super().__init__()
        self.graph, self.maps = graph, maps
        self.spec: Any = None

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.graph(*[x.permute(0, 3, 1, 2) if m else x for x, m in zip(xs, self.maps)])
        flat, self.spec = tree_flatten(out)
        return tuple(o.permute(0, 2, 3, 1) if o.dim() == 4 else o for o in flat)


def _nhwc_shape(shape: tuple[int, ...], is_map: bool) -> tuple[int, ...]:
    return (shape[0], shape[2], shape[3], shape[1]) if is_map else shape


def _to_onnx(seg: Any) -> tuple[bytes, list[str], Any]:
    """The segment exported to ONNX with an NHWC interface: (model bytes, input names, output spec)."""
    wrapper = _NHWC(seg.module, seg.maps)
    names = [f"in{i}" for i in range(len(seg.inputs))]
    examples = tuple(torch.randn(_nhwc_shape(s, m)) for s, m in zip(seg.input_shapes, seg.maps))
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # PRESERVE: the exporter must not switch modules to eval and back to train (the graph's
        # modules are the model's own; "back" would be train mode for all of them)
        torch.onnx.export(wrapper, examples, buf, dynamo=False, opset_version=OPSET, input_names=names,
                          do_constant_folding=True, training=torch.onnx.TrainingMode.PRESERVE)
    return buf.getvalue(), names, wrapper.spec


def _numpy(x: torch.Tensor, is_map: bool) -> Any:
    return (x.permute(0, 2, 3, 1) if is_map else x).contiguous().numpy()


def _tensors(outs: list[Any], spec: Any) -> Any:
    ts = [torch.from_numpy(o) for o in outs]
    return tree_unflatten([t.permute(0, 3, 1, 2) if t.dim() == 4 else t for t in ts], spec)


def _compile_ort(seg: Any, threads: int) -> Callable[..., Any]:
    import onnxruntime as ort

    model, names, spec = _to_onnx(seg)
    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    del model
    give_back()  # the export's and the session's transient copies of the weights: a board's peak otherwise
    # the exporter drops unused inputs
    read = [(i.name, names.index(i.name), seg.maps[names.index(i.name)]) for i in sess.get_inputs()]
    run = sess.run

    def runner(*xs: torch.Tensor) -> Any:
        return _tensors(run(None, {n: _numpy(xs[i], m) for n, i, m in read}), spec)

    return runner


def _openvino(precision: str) -> Callable[[Any, int], Callable[..., Any]]:
    def compile_ov(seg: Any, threads: int) -> Callable[..., Any]:
        import openvino as ov

        model, names, spec = _to_onnx(seg)
        config = {"INFERENCE_NUM_THREADS": max(1, threads), "ENABLE_CPU_PINNING": False,
                  "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        if precision:
            config["INFERENCE_PRECISION_HINT"] = precision
        compiled = ov.Core().compile_model(ov.convert_model(io.BytesIO(model)), "CPU", config)
        request = compiled.create_infer_request()
        ports = {p.get_any_name(): p for p in compiled.inputs}
        read = [(ports[n], i, seg.maps[i]) for i, n in enumerate(names) if n in ports]

        def runner(*xs: torch.Tensor) -> Any:
            res = request.infer({p: _numpy(xs[i], m) for p, i, m in read})
            return _tensors([res[p] for p in compiled.outputs], spec)

        return runner

    return compile_ov


_BACKENDS = {
    "torch": Backend("torch", True, lambda seg, threads: seg.module),
    "ort": Backend("ort", True, _compile_ort),
    "openvino": Backend("openvino", True, _openvino("f32")),
    "openvino-bf16": Backend("openvino-bf16", False, _openvino("")),
}
