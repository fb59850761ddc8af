"""The compute engine: what a device runs, below planning and the runtime.

Planning decides who computes which rows (a Plan); the runtime moves rows between devices; the
engine computes a device's share of each stage, on the backend the plan chose for it:

* ``stage``: what a stage is, derived from the graph (its input and outputs, whether a device
  computes it whole, its nodes as one module, whether it writes into its input);
* ``windows``: a convolution or pooling on a strip of rows, padded only at the true borders;
* ``lower``: a device's strip of a stage lowered, once per plan, to static torch.fx graphs;
* ``reduce``: exact reductions by partial sums, ``reduce`` and ``linear`` stages;
* ``backends``: torch, ONNX Runtime and OpenVINO, each compiling those graphs to its kernels;
* ``program``: ``prepare(gm, plan, device)`` compiles a device's share of a plan once (cached by
  shape), ``DeviceProgram.run(s, x, reduce_fn)`` runs stage ``s`` on a frame;
* ``simulate``: a whole plan in one process, every device in turn (tests prove plans exact).

A new backend is a ``backends.Backend``: a name, whether it is exact, and a function that turns
a lowered graph (``lower.Segment``: a GraphModule with fixed input shapes) into a callable on
channels-last torch tensors.
"""

from edgeweave.engine.backends import available as available_backends
from edgeweave.engine.program import BackendError, DeviceProgram, backend_of, compile_stage, prepare, run_stage
from edgeweave.engine.simulate import simulate

__all__ = ["BackendError", "DeviceProgram", "available_backends", "backend_of", "compile_stage", "prepare",
           "run_stage", "simulate"]
