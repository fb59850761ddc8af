"""The plan: pure data that says who computes what and which rows travel where.

The runtime only executes a Plan; it never decides (DESIGN.md). A plan is built for one input
shape. Every tensor that crosses a stage boundary is split along one axis, the *split axis*:
dim 2 (rows) for 4-D feature maps, dim 1 (features) for 2-D activations, and dim 1 (channels)
for the output of a stage split by output channels (``split == "channels"``, see below). All
ranges below are half-open ``[start, stop)`` in global coordinates of the value's split axis
(called "rows" whatever the axis); ``(0, 0)`` means "nothing".

How a spatial stage is divided (``split``):

* ``rows``: each device computes a strip of the output's rows from the input rows the strip
  needs (its halo included);
* ``channels``: each device computes every row of a slice of the output's channels
  (``out_rows`` is that slice, along dim 1), from the whole input (``in_rows`` is the whole of
  the input along its split axis). Its output is split along the channels: the next stage's
  transfers, assignments and reductions speak of channel ranges of it.

Execution of stage ``s`` on device ``d``:
1. run ``stage.transfers`` in list order: each moves rows ``rows`` of the previous stage's output
   (for stage 0: the model input, held whole by the leader) from ``src`` to ``dst``. A device
   only sends rows it holds (its own output rows, or rows it received earlier in the list), so
   a leader-gather stage lists "to leader" transfers before "from leader" ones.
2. assemble rows ``assignments[d].in_rows`` of the stage input from what it holds, and compute
   rows ``assignments[d].out_rows`` of the stage output (``planning`` provides the function).
After the last stage, ``final_transfers`` bring the model output to the leader (device 0).

Global reductions (optional, additive; plans without them execute as above). A sum or mean over
H and W of a map (``planning.graph.reduction_of``) is computed exactly from strips:
``stage.reductions`` lists, in execution order, each reducing node of the stage with the value
it reduces (``source``) and ``rows``: ``(device, owned rows of source)`` pairs whose ranges tile
the source's rows (no halo: every row is counted once). At a reducing node each listed device
sums its owned rows over dims 2 and 3 (keepdim, ``[N, C, 1, 1]``), and the partial sums are
added *in the order of ``rows``* (reproducible results: every device that adds them gets the
same bits):

* in a ``spatial`` stage, every listed device sends its partial sum to every other device with
  work in the stage, and each such device adds them, computes the reducing node's value (mean:
  total / (H*W)) and the small nodes computed from it (Linear, sigmoid, ...) whole, then goes
  on with its strip (an elementwise op broadcasting such small values over a map is row-local).
  A device's ``in_rows`` include its owned rows of every source;
* in a ``reduce`` stage (nodes: reducing nodes reading the stage input, then small nodes), the
  stage input is not moved at all (``transfers`` is empty): the assignments' ``in_rows`` are the
  rows each device already holds (its owned rows, equal to ``rows``), followers have
  ``out_rows == (0, 0)`` and send their partial sums to the leader, and the leader finishes
  the small nodes and holds the whole output.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

Range = tuple[int, int]

STAGE_KINDS = ("spatial", "linear", "leader", "reduce")
SPLITS = ("rows", "channels")


def split_axis(shape: list[int] | tuple[int, ...]) -> int:
    """The axis a value is cut along by default: rows (dim 2) of 4-D maps, features (dim 1) of
    2-D values, dim 0 of a vector."""
    n = len(shape)
    if n == 4:
        return 2
    return 1 if n >= 2 else 0


@dataclass(frozen=True)
class Transfer:
    src: int
    dst: int
    rows: Range


@dataclass(frozen=True)
class Assignment:
    """What one device does in a stage. Devices with ``out_rows == (0, 0)`` sit the stage out."""

    device: int
    in_rows: Range
    out_rows: Range
    predicted_s: float = 0.0  # when the device is predicted to finish the stage (waits included)
    busy_s: float = 0.0  # of which computing (and the network stack's CPU): what frames in flight share


@dataclass(frozen=True)
class Reduction:
    """An exact reduction of ``source`` over H and W, by partial sums (module docstring)."""

    node: str  # the reducing node (torch.fx name)
    source: str  # the 4-D value it reduces (a node of the stage, or the stage input)
    rows: tuple[tuple[int, Range], ...]  # (device, owned rows of source), in summation order

    def owned(self, device: int) -> Range:
        for d, r in self.rows:
            if d == device:
                return r
        return (0, 0)


@dataclass
class Stage:
    index: int
    kind: str  # one of STAGE_KINDS
    nodes: list[str]  # torch.fx node names computed in this stage, in execution order
    input_shape: list[int]
    output_shape: list[int]
    assignments: list[Assignment]
    transfers: list[Transfer] = field(default_factory=list)
    predicted_s: float = 0.0  # predicted wall time of the stage, transfers included
    reductions: list[Reduction] = field(default_factory=list)  # exact global sums (see above)
    split: str = "rows"  # how a spatial stage is divided: rows | channels (see above)

    def assignment(self, device: int) -> Assignment | None:
        for a in self.assignments:
            if a.device == device:
                return a
        return None

    @property
    def out_axis(self) -> int:
        """The axis the stage's output is split along (what the next stage's ranges speak of)."""
        return 1 if self.split == "channels" else split_axis(self.output_shape)


@dataclass
class Plan:
    model: str  # registry name or checkpoint path the plan was made for
    model_hash: str  # sha256 of the weights; followers refuse to compute with other weights
    input_shape: list[int]  # N, C, H, W
    devices: list[str]  # device names; index 0 is the leader
    partition: str  # equal | bodp | ocbp | optimal
    fusion: str  # none | pools | auto
    mode: str  # gather (EdgeLD: every block's output goes back to the leader) | exchange
    stages: list[Stage]
    final_transfers: list[Transfer] = field(default_factory=list)
    predicted_s: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)
    # The compute backend of each device (engine/backends.py), in device order; empty or
    # shorter: torch for the devices it does not name.
    backends: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def busy_s(self) -> list[float]:
        """Each device's predicted seconds of work per frame (its stages' ``busy_s``): a device
        serving several frames at once cannot take more than one per this many seconds."""
        out = [0.0] * len(self.devices)
        for st in self.stages:
            for a in st.assignments:
                if 0 <= a.device < len(out):
                    out[a.device] += a.busy_s
        return out

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        def tr(t: dict[str, Any]) -> Transfer:
            return Transfer(int(t["src"]), int(t["dst"]), (int(t["rows"][0]), int(t["rows"][1])))

        stages = [
            Stage(
                index=int(s["index"]),
                kind=str(s["kind"]),
                nodes=[str(n) for n in s["nodes"]],
                input_shape=[int(x) for x in s["input_shape"]],
                output_shape=[int(x) for x in s["output_shape"]],
                assignments=[
                    Assignment(
                        int(a["device"]),
                        (int(a["in_rows"][0]), int(a["in_rows"][1])),
                        (int(a["out_rows"][0]), int(a["out_rows"][1])),
                        float(a.get("predicted_s", 0.0)),
                        float(a.get("busy_s", 0.0)),
                    )
                    for a in s["assignments"]
                ],
                transfers=[tr(t) for t in s.get("transfers", [])],
                predicted_s=float(s.get("predicted_s", 0.0)),
                reductions=[
                    Reduction(
                        str(r["node"]),
                        str(r["source"]),
                        tuple((int(d), (int(rr[0]), int(rr[1]))) for d, rr in r["rows"]),
                    )
                    for r in s.get("reductions", [])
                ],
                split=str(s.get("split", "rows")),
            )
            for s in d["stages"]
        ]
        return cls(
            model=str(d["model"]),
            model_hash=str(d["model_hash"]),
            input_shape=[int(x) for x in d["input_shape"]],
            devices=[str(x) for x in d["devices"]],
            partition=str(d["partition"]),
            fusion=str(d["fusion"]),
            mode=str(d["mode"]),
            stages=stages,
            final_transfers=[tr(t) for t in d.get("final_transfers", [])],
            predicted_s=float(d.get("predicted_s", 0.0)),
            meta=dict(d.get("meta", {})),
            backends=[str(b) for b in d.get("backends", [])],
        )

    def in_axis(self, s: int) -> int:
        """The axis stage ``s``'s input is split along (the model input: ``split_axis``)."""
        return self.stages[s - 1].out_axis if s > 0 else split_axis(self.input_shape)

    @property
    def out_axis(self) -> int:
        """The axis the model output is split along before the final transfers."""
        return self.stages[-1].out_axis if self.stages else split_axis(self.input_shape)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        return cls.from_json(Path(path).read_text())


def whole_on(stage: Stage, device: int) -> bool:
    """Whether ``device`` computes the whole stage alone: the leader's stages, and spatial stages
    where its strip is the whole map, nobody else computes, and every row a reduction sums is its
    own (one device, or a block the planner left on one device).

    ``reduce`` stages keep their partial-sum path even then: with a pool folded into the Linear
    after it (``graph.reduce_pool``) that reads a smaller weight than the model's own layers.
    """
    if stage.kind == "leader":
        return device == 0
    a = stage.assignment(device)
    if stage.kind != "spatial" or a is None or len(stage.input_shape) != 4:
        return False
    if stage.split == "channels":  # its input is whole by definition
        if a.out_rows != (0, int(stage.output_shape[1])):
            return False
    elif a.in_rows != (0, int(stage.input_shape[2])) or a.out_rows != (0, int(stage.output_shape[2])):
        return False
    if any(b.device != device and b.out_rows[1] > b.out_rows[0] for b in stage.assignments):
        return False
    return all(d == device or r[1] <= r[0] for red in stage.reductions for d, r in red.rows)
