"""Plan building: (graph, cluster, choices) -> Plan. Pure: no processes, no clocks.

Steps:
1. ``fusion.atomic_segments`` cuts the graph at every point where one value is live.
2. Runs of consecutive spatial segments are grouped into fused blocks by the fusion mode
   (``auto``: DP whose block cost is this module's stage estimate).
3. Linear segments become ``linear`` stages (split by output features) when that is predicted
   faster than leaving them on the leader; everything else becomes ``leader`` stages
   (consecutive ones merged: nothing travels between them).
4. Stages are built in order: the partitioner splits each spatial block's output rows (or a
   linear layer's output features) over the devices, strips go to devices top to bottom in the
   plan's strip order (``meta["strip_order"]``; device order unless ``optimal`` in exchange mode
   finds a faster one, see ``_best_orders``), ``halo.required_rows`` gives each strip's input
   rows, and transfers follow the mode:

   * ``gather`` (EdgeLD): every stage's output goes back to the leader, which then sends every
     device the input rows (halo included) of its next strip;
   * ``exchange``: strips stay where they were computed; a device receives only the rows of its
     next input it does not hold (halos, or rows that moved because the split changed) from the
     devices that hold them; only leader stages and the final output pull rows to the leader.

Partitioners see, per device, the predicted seconds for ``n`` rows of a *centred* strip (halo
computation included, clipped at the map's borders) plus the link time the strip implies; the
prediction stored in the plan is then recomputed for the actual strips and transfers with the
event model of ``planning.cost``. In gather mode every stage is split on its own (EdgeLD); in
exchange mode one split per run of spatial segments is scaled to every block of the run
(``_Planner.run_split``), so strips stay in place. ``optimal`` additionally keeps the fastest of
the plans made from every partitioner's split and from the leader alone, so its prediction is
never worse than theirs under the full model.

Global reductions (``plan.py``): a spatial block may contain sums/means over H and W (a
channel-attention squeeze). Each device owns the rows of the reduced value that correspond to its
output strip scaled to that value's height (``owned_rows``; the owned ranges tile the rows, so
every row is summed once), computes them besides its halo-extended strip, and contributes their
partial sum; each device sends it straight to every other device with work in the stage, and
each adds them in the plan's order (one small message delay per reduction). A
``reduce`` segment (a final global average pool, or VGG's first classifier layer on the flattened
map) becomes a ``reduce`` stage: partial sums of the strips where they are, only ``[N, C, 1, 1]``
(or the layer's ``[N, out]`` partial products) per device travels to the leader. The spatial
block before it is split knowing that: a device's share of it is priced with the partial sums it
will then compute over those rows (and one partial's trip to the leader) instead of a gather of
the map; priced as a gather, gather mode gave the whole last block, and so all of VGG's fc1, to
the leader of a cluster with slow links (bench edgeld, run O).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch.fx

from edgeweave.errors import EdgeweaveError
from edgeweave.planning.cost import (
    Work,
    add_work,
    DTYPE_BYTES,
    WEIGHTS,
    aggregate,
    compute_s,
    flop_kind,
    node_flops,
    node_weights,
    partial_work,
    relay_bytes,
    row_bytes,
    wire_row_bytes,
    rows_of,
    schedule_transfers,
)
from edgeweave.planning.memory import RUNTIME_BYTES, over_budget, plan_memory
from edgeweave.planning.fusion import (
    FUSION_MODES,
    Segment,
    atomic_segments,
    choose_blocks,
    ends_with_pool,
    is_reduce_segment,
    unfold_flatten,
)
from edgeweave.planning.graph import (
    is_folded,
    is_small,
    measure_density,
    node_reduce,
    node_shape,
    reduce_partial_shape,
    reduce_pool,
    reduce_source,
)
from edgeweave.planning.halo import EMPTY, Range, intersect, is_empty, required_rows, size
from edgeweave.planning.hybrid import UNIT, channel_blocks, channel_ranges, slice_work, tail_starts, unit_bytes, units
from edgeweave.planning.partition import PARTITIONERS
from edgeweave.planning.plan import Assignment, Plan, Reduction, Stage, Transfer, whole_on
from edgeweave.profiling.profile import Cluster, DeviceProfile

MODES = ("gather", "exchange")
Partitioner = Callable[..., list[int]]
Holders = list[tuple[int, int, int]]  # (device, lo, hi) of the value the next stage reads


@dataclass
class Block:
    kind: str  # spatial | linear | leader | reduce
    nodes: list[torch.fx.Node]
    input: torch.fx.Node
    output: torch.fx.Node | None
    # Exchange mode: the run-wide split (row counts at a reference height) every block of the
    # run derives its strips from, so that strips stay in place and only halos travel.
    ref: tuple[list[int], int] | None = None
    segs: tuple[Segment, ...] = ()  # the atomic segments it was merged from (spatial blocks)
    split: str = "rows"  # a spatial block's cut: rows | channels (planning/hybrid.py)

    @property
    def in_shape(self) -> list[int]:
        return list(node_shape(self.input) or [])

    @property
    def out_shape(self) -> list[int]:
        if self.output is None:
            return []
        return list(node_shape(self.output) or [])


Merged = list[tuple[Block, bool, bool]]  # (block, first_in_run, last_in_run), in execution order
Candidate = tuple[Merged, dict[str, Block], Partitioner]  # a plan's blocks, feeds and split rule


def _merge(segs: Sequence[Segment], kind: str, ref: tuple[list[int], int] | None = None, split: str = "rows") -> Block:
    nodes = [n for s in segs for n in s.nodes]
    return Block(kind, nodes, segs[0].input, segs[-1].output, ref, tuple(segs), split)


def scale_counts(counts: Sequence[int], ref_total: int, total: int, order: Sequence[int] | None = None) -> list[int]:
    """Map a split of ``ref_total`` rows onto ``total`` rows, keeping the boundaries in place.

    ``counts[d]`` is device d's share; the strips lie top to bottom in ``order`` (default:
    device order), and that is the order the boundaries are accumulated in."""
    out, cum, prev = [0] * len(counts), 0, 0
    for d in order if order is not None else range(len(counts)):
        cum += counts[d]
        b = round(cum * total / ref_total) if ref_total else 0
        out[d] = b - prev
        prev = b
    return out


def _subtract(r: Range, pieces: Sequence[Range]) -> list[Range]:
    """Parts of ``r`` not covered by ``pieces``."""
    out, cur = [], r[0]
    for lo, hi in sorted(p for p in pieces if not is_empty(p)):
        if hi <= cur:
            continue
        if lo > cur:
            out.append((cur, min(lo, r[1])))
        cur = max(cur, hi)
        if cur >= r[1]:
            break
    if cur < r[1]:
        out.append((cur, r[1]))
    return [p for p in out if not is_empty(p)]


def owned_rows(out: Range, total: int, height: int) -> Range:
    """The rows of a ``height``-row value a device owns when it computes strip ``out`` of ``total``.

    A pure function of the strip boundaries, so strips that tile ``[0, total)`` give owned
    ranges that tile ``[0, height)``.
    """
    if is_empty(out) or total <= 0:
        return EMPTY
    lo, hi = round(out[0] * height / total), round(out[1] * height / total)
    return (lo, hi) if hi > lo else EMPTY


def _reducers(nodes: Sequence[torch.fx.Node]) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
    """(reducing node, the value it reduces) for the reductions among ``nodes``."""
    out = []
    for n in nodes:
        if node_reduce(n) is not None:
            out.append((n, reduce_source(n)))
    return out


def _strips(counts: Sequence[int], order: Sequence[int]) -> list[Range]:
    """Device d's strip for share ``counts[d]``, strips laid top to bottom in ``order``."""
    out, cur = [EMPTY] * len(counts), 0
    for d in order:
        c = counts[d]
        out[d] = (cur, cur + c) if c > 0 else EMPTY
        cur += c
    return out


class _Planner:
    def __init__(self, gm: torch.fx.GraphModule, devices: Sequence[DeviceProfile], partition: Partitioner, mode: str,
                 tables: dict | None = None, order: Sequence[int] | None = None, split: str = "rows") -> None:
        self.gm = gm
        self.split_mode = split  # rows | channels | auto (make_plan)
        self.runs: dict[tuple, list] = {}  # a run's rows-only blocks (_run_blocks)
        self.devices = list(devices)
        self.k = len(self.devices)
        # the devices' strips top to bottom; partitioners and cost tables do not depend on it
        self.order = tuple(order) if order is not None else tuple(range(self.k))
        self.partition = partition
        self.mode = mode
        self.capabilities = [d.capability for d in self.devices]
        # Strip pricing is a pure function of the graph: share it across make_plan calls.
        self._memo: dict[tuple[str, str, Range], tuple[Range, Work]] = gm.meta.setdefault("ew_chain_memo", {})
        self._walks: dict[tuple[str, str, Range], tuple[Range, Work]] = gm.meta.setdefault("ew_chain_walks", {})
        # Cost tables depend on the block and the devices, not on the partitioner: make_plan
        # shares them among the partitioners it tries on the same cluster.
        self._tables: dict[tuple, list[list[float]]] = tables if tables is not None else {}
        # A spatial run's last value read by a ``reduce`` stage (name -> that block): the rows a
        # device ends the run with are the rows it sums there, and nothing else leaves it.
        self.feeds: dict[str, Block] = {}

    # ---- compute ------------------------------------------------------------------------
    def _work(self, nodes: Sequence[torch.fx.Node], need: dict[str, Range] | None) -> list[tuple[str, float]]:
        """(kind, FLOPs) of computing ``need`` rows of every node (all rows when need is None)."""
        work = []
        for n in nodes:
            f = node_flops(self.gm, n)
            if need is not None:
                shape = node_shape(n) or [1]
                f = f * size(need.get(n.name, EMPTY)) / max(rows_of(shape), 1)
            work.append((flop_kind(self.gm, n), f))
            if f > 0 and (wts := node_weights(self.gm, n)):
                work.append((WEIGHTS, wts))  # a strip of any height reads all the weights
        return work

    def chain(self, block: Block, out: Range) -> tuple[Range, Work]:
        """Input rows and work of a spatial block's strip ``out``, segment by segment.

        Only one value crosses a segment boundary, so propagating the rows backward one segment
        at a time is the same as propagating through the whole block; memoising per segment
        and output range lets the fusion DP price every block of a run without redoing it.
        """
        block_total = rows_of(block.out_shape)
        if not block.segs:
            assert block.output is not None
            extra = self._extra(block.nodes, out, block_total)
            need = required_rows(self.gm, block.nodes, block.output, out, extra)
            work = self._work(block.nodes, need) + self._small_work(block.nodes, extra)
            return need.get(block.input.name, EMPTY), aggregate(work)
        # the walk from a block's end up to each of its segments is the same for every block that
        # ends there and reaches that far: the fusion DP prices blocks [i, j) for every i, so
        # each walk is kept (shared by the partitioners, like the per-segment memo) and a
        # shorter block ending at j reads it instead of walking again (O(n^2) -> O(n) segment
        # steps per block end and strip)
        end = block.output.name if block.output is not None else ""
        walked = self._walks.get((end, block.segs[0].input.name, out))
        if walked is not None:
            return walked
        total: Work = {}
        r = out
        for seg in reversed(block.segs):
            assert seg.output is not None
            extra = self._extra(seg.nodes, out, block_total)
            # names: stable even if gm is copied; owned rows of reductions are part of the key
            key = (seg.input.name, seg.output.name, r, *sorted(extra.items()))
            hit = self._memo.get(key)
            if hit is None:
                need = required_rows(self.gm, seg.nodes, seg.output, r, extra)
                work = self._work(seg.nodes, need) + self._small_work(seg.nodes, extra)
                hit = (need.get(seg.input.name, EMPTY), aggregate(work))
                self._memo[key] = hit
            r, w = hit
            total = add_work(total, w)
            self._walks[(end, seg.input.name, out)] = (r, total)
            if is_empty(r):
                break  # windows reading padding only: nothing further up is needed
        return r, total

    def _extra(self, nodes: Sequence[torch.fx.Node], out: Range, block_total: int) -> dict[str, Range]:
        """Owned rows of every value reduced among ``nodes`` for block output strip ``out``."""
        return {
            src.name: owned_rows(out, block_total, rows_of(node_shape(src) or [1]))
            for _, src in _reducers(nodes)
        }

    def _small_work(self, nodes: Sequence[torch.fx.Node], extra: dict[str, Range]) -> list[tuple[str, float]]:
        """Partial sums over the owned rows, plus the small nodes every device computes whole."""
        work = []
        for n in nodes:
            if node_reduce(n) is not None:
                src = reduce_source(n)
                work.append(partial_work(self.gm, n, size(extra.get(src.name, EMPTY)), rows_of(node_shape(src) or [1])))
            elif is_small(n):
                work.append((flop_kind(self.gm, n), node_flops(self.gm, n)))
        return work

    def reduction_s(self, reductions: Sequence[Reduction], receivers: Sequence[int], nbytes: Sequence[int]) -> float:
        """Every owner's partial straight to each of ``receivers`` (runtime/executor.py), per
        reduction."""
        t = 0.0
        for red, nb in zip(reductions, nbytes):
            moves = [(d, r, float(nb), False) for d, rows in red.rows if not is_empty(rows) for r in receivers if r != d]
            t += schedule_transfers(moves, self.devices)[1]
        return t

    def reduce_cost_fns(self, block: Block) -> list[Callable[[int], float]] | None:
        """Per device, the seconds of the reduce stage ``block``'s output feeds, for ``n`` rows
        held there: partial sums over the rows, and the partials' trip to the leader."""
        red = self.feeds.get(block.output.name) if block.output is not None else None
        if red is None:
            return None
        h = max(rows_of(block.out_shape), 1)
        reds = _reducers(red.nodes)
        nbytes = sum(math.prod(reduce_partial_shape(n)) * DTYPE_BYTES for n, _ in reds)
        lead = self.devices[0]

        def fn(d: int) -> Callable[[int], float]:
            dev = self.devices[d]
            send = 0.0 if d == 0 else nbytes * 8.0 / min(dev.bandwidth_bps, lead.bandwidth_bps) + dev.latency_s + lead.latency_s
            return lambda n: compute_s(dev, [partial_work(self.gm, r, n, h) for r, _ in reds]) + send if n > 0 else 0.0

        return [fn(d) for d in range(self.k)]

    def _linear_work(self, block: Block, n: int) -> list[tuple[str, float]]:
        out_rows = max(rows_of(block.out_shape), 1)
        return [(flop_kind(self.gm, nd), node_flops(self.gm, nd) * n / out_rows) for nd in block.nodes]

    # ---- transfers ----------------------------------------------------------------------
    def _transfers(self, holders: Holders, needs: Sequence[tuple[int, Range]]) -> list[tuple[Transfer, bool]]:
        """Transfers (with "forwards received rows" flags) so each device holds what it needs."""
        out: list[tuple[Transfer, bool]] = []
        if self.mode == "gather":
            for d, lo, hi in holders:
                if d != 0 and hi > lo:
                    out.append((Transfer(d, 0, (lo, hi)), False))
            own = [(lo, hi) for d, lo, hi in holders if d == 0]
            for d, r in needs:
                if d != 0 and not is_empty(r):
                    out.append((Transfer(0, d, r), bool(_subtract(r, own))))
            return out
        for d, r in needs:
            if is_empty(r):
                continue
            own = [(lo, hi) for dd, lo, hi in holders if dd == d]
            for miss in _subtract(r, own):
                got = []
                for h, lo, hi in sorted(holders, key=lambda t: (t[1], t[0])):
                    if h == d:
                        continue
                    ov = intersect(miss, (lo, hi))
                    if not is_empty(ov) and _subtract(ov, got):
                        for part in _subtract(ov, got):
                            out.append((Transfer(h, d, part), False))
                            got.append(part)
                if _subtract(miss, got):
                    raise AssertionError(f"rows {miss} needed by device {d} are held by nobody")
        return out

    def _schedule(self, transfers: Sequence[tuple[Transfer, bool]], rb: float) -> tuple[dict[int, float], float]:
        return schedule_transfers([(t.src, t.dst, size(t.rows) * rb, f) for t, f in transfers], self.devices)

    # ---- stages -------------------------------------------------------------------------
    def build(self, block: Block, counts: Sequence[int] | None, holders: Holders, index: int,
              axis: int = 2) -> tuple[Stage, Holders]:
        """One Stage for ``block`` given its split and who holds its input (along ``axis``: 1 where
        the block before was split by channels); plus its output holders."""
        in_shape, out_shape = block.in_shape, block.out_shape
        in_rows_total = in_shape[axis] if axis == 1 else rows_of(in_shape)
        compute: dict[int, float] = {}
        if block.kind == "reduce":
            return self._build_reduce(block, holders, index, axis)
        if block.split == "channels":
            assert counts is not None
            return self._build_channels(block, counts, holders, index, axis)
        if axis == 1 and len(in_shape) == 4 and block.kind != "leader":
            raise AssertionError(f"a {block.kind} block cannot read a map split by channels")
        if block.kind == "leader":
            out_total = rows_of(out_shape) if out_shape else 0
            needs = [(0, (0, in_rows_total))]
            assignments = {0: ((0, in_rows_total), (0, out_total) if out_total else (0, 1))}
            compute[0] = compute_s(self.devices[0], self._work(block.nodes, None))
            new_holders: Holders = [(0, 0, out_total)]
        else:
            assert counts is not None
            strips = _strips(counts, self.order)
            assignments = {}
            needs = []
            for d, out in enumerate(strips):
                if is_empty(out):
                    continue
                if block.kind == "spatial":
                    in_r, work = self.chain(block, out)
                    if is_empty(in_r):  # windows that read padding only still need a slice
                        in_r = (0, 1)
                    compute[d] = compute_s(self.devices[d], work)
                else:
                    in_r = (0, in_rows_total)
                    compute[d] = compute_s(self.devices[d], self._linear_work(block, size(out)))
                assignments[d] = (in_r, out)
                needs.append((d, in_r))
            new_holders = [(d, o[0], o[1]) for d, (_, o) in assignments.items()]
        transfers = self._transfers(holders, needs)
        ready, end_all = self._schedule(transfers, unit_bytes(block.input, axis))
        reductions: list[Reduction] = []
        red_s = 0.0
        if block.kind == "spatial":
            out_total = rows_of(out_shape)
            sizes = []
            for node, src in _reducers(block.nodes):
                h = rows_of(node_shape(src) or [1])
                rows = tuple((d, owned_rows(o, out_total, h)) for d, (_, o) in sorted(assignments.items()))
                reductions.append(Reduction(node.name, src.name, rows))
                shape = node_shape(src) or [1, 1]
                sizes.append(int(shape[0]) * int(shape[1]) * DTYPE_BYTES)
            red_s = self.reduction_s(reductions, sorted(assignments), sizes)
        relay = relay_bytes([(t.src, t.dst, t.rows) for t, _ in transfers], {d: a[0] for d, a in assignments.items()},
                            row_bytes(in_shape) if axis != 1 else unit_bytes(block.input, axis))
        assigns = []
        finish_max = end_all
        for d in range(self.k):
            cpu_net = self.devices[d].byte_s * relay.get(d, 0.0)
            finish_max = max(finish_max, cpu_net)
            if d in assignments:
                fin = ready.get(d, 0.0) + compute[d] + cpu_net
                finish_max = max(finish_max, fin)
                assigns.append(Assignment(d, assignments[d][0], assignments[d][1], fin, compute[d] + cpu_net))
            else:
                assigns.append(Assignment(d, EMPTY, EMPTY, 0.0))
        stage = Stage(
            index=index,
            kind=block.kind,
            nodes=[n.name for n in block.nodes],
            input_shape=in_shape,
            output_shape=out_shape,
            assignments=assigns,
            transfers=[t for t, _ in transfers],
            predicted_s=finish_max + red_s,
            reductions=reductions,
        )
        return stage, new_holders

    def _build_reduce(self, block: Block, holders: Holders, index: int, axis: int = 2) -> tuple[Stage, Holders]:
        """A ``reduce`` stage: every holder sums its own rows (or channels: ``axis`` 1); only
        partial sums travel."""
        in_shape, out_shape = block.in_shape, block.out_shape
        out_total = rows_of(out_shape)
        held = {d: (lo, hi) for d, lo, hi in holders if hi > lo}
        reds = _reducers(block.nodes)
        reductions = [Reduction(n.name, src.name, tuple(sorted(held.items()))) for n, src in reds]
        h = max(in_shape[axis] if axis == 1 else rows_of(in_shape), 1)
        finish = 0.0
        busy: dict[int, float] = {}
        for d, r in held.items():
            work = [partial_work(self.gm, n, size(r), h) for n, _ in reds]
            # a device's rows (or channels) meet their share of a Linear layer's weights only
            work += [(WEIGHTS, node_weights(self.gm, n) * size(r) / h) for n, _ in reds]
            busy[d] = compute_s(self.devices[d], work)
            finish = max(finish, busy[d])
        nbytes = [math.prod(reduce_partial_shape(n)) * DTYPE_BYTES for n, _ in reds]
        t = finish + self.reduction_s(reductions, [0], nbytes)
        rest = compute_s(self.devices[0], [(flop_kind(self.gm, n), node_flops(self.gm, n))
                                           for n in block.nodes if node_reduce(n) is None and not is_folded(n)])
        t += rest
        busy[0] = busy.get(0, 0.0) + rest
        assigns = [
            Assignment(d, held.get(d, EMPTY), (0, out_total) if d == 0 else EMPTY, t if d == 0 else 0.0,
                       busy.get(d, 0.0))
            for d in range(self.k)
        ]
        stage = Stage(index, "reduce", [n.name for n in block.nodes], in_shape, out_shape, assigns, [], t,
                      reductions)
        return stage, [(0, 0, out_total)]

    def _build_channels(self, block: Block, counts: Sequence[int], holders: Holders, index: int,
                        axis: int) -> tuple[Stage, Holders]:
        """A stage split by output channels (planning/hybrid.py): device d computes every row of
        its ``counts[d]`` units of channels from the whole input, which it must first hold."""
        in_shape, out_shape = block.in_shape, block.out_shape
        in_total, channels = int(in_shape[axis]), int(out_shape[1])
        ranges = channel_ranges(counts, channels)
        work = {d: slice_work(self.gm, block.nodes, size(r) / channels) for d, r in enumerate(ranges) if not is_empty(r)}
        needs = [(d, (0, in_total)) for d in work]
        transfers = self._transfers(holders, needs)
        ready, end_all = self._schedule(transfers, unit_bytes(block.input, axis))
        relay = relay_bytes([(t.src, t.dst, t.rows) for t, _ in transfers], dict(needs), unit_bytes(block.input, axis))
        assigns, finish_max = [], end_all
        for d in range(self.k):
            cpu_net = self.devices[d].byte_s * relay.get(d, 0.0)
            finish_max = max(finish_max, cpu_net)
            if d in work:
                busy = compute_s(self.devices[d], work[d]) + cpu_net
                fin = ready.get(d, 0.0) + busy
                finish_max = max(finish_max, fin)
                assigns.append(Assignment(d, (0, in_total), ranges[d], fin, busy))
            else:
                assigns.append(Assignment(d, EMPTY, EMPTY, 0.0))
        stage = Stage(index, "spatial", [n.name for n in block.nodes], in_shape, out_shape, assigns,
                      [t for t, _ in transfers], finish_max, split="channels")
        return stage, [(d, r[0], r[1]) for d, r in enumerate(ranges) if not is_empty(r)]

    def channel_counts(self, block: Block, holders: Holders, axis: int) -> list[int]:
        """Units of output channels per device for a channel block: the partitioner's split of
        per-device costs (the slice's compute, plus receiving the input it does not hold: a
        device pays that once it takes any share, so slow links keep devices out)."""
        channels = int(block.out_shape[1])
        total = units(channels)
        in_total = int(block.in_shape[axis])
        own = [0] * self.k
        for h, lo, hi in holders:
            own[h] += hi - lo
        key = ("channels", self.partition, tuple(n.name for n in block.nodes), axis, tuple(own))
        if key in self._tables:
            return list(self._tables[key])
        rb = unit_bytes(block.input, axis)
        lead = self.devices[0]
        whole = slice_work(self.gm, block.nodes, 1.0)
        tables = []
        for d, dev in enumerate(self.devices):
            recv = max(0, in_total - own[d]) * rb
            comm = recv * 8.0 / min(dev.bandwidth_bps, lead.bandwidth_bps) + dev.latency_s + lead.latency_s if recv else 0.0
            tables.append([0.0] + [comm + compute_s(dev, {k: (f * min(channels, n * UNIT) / channels, c)
                                                         for k, (f, c) in whole.items()}) for n in range(1, total + 1)])
        counts = self.partition([t.__getitem__ for t in tables], total, self.capabilities)
        assert sum(counts) == total and all(c >= 0 for c in counts), counts
        self._tables[key] = list(counts)
        return list(counts)

    def aligned_counts(self, block: Block, holders: Holders) -> list[int] | None:
        """Counts that keep every device on the rows it already holds (exchange mode).

        The previous stage's strip boundaries are mapped to this block's output rows, so only
        halos travel. None when the input is not spread over several devices.
        """
        in_total, out_total = rows_of(block.in_shape), rows_of(block.out_shape)
        per_dev = [0] * self.k
        for d, lo, hi in holders:
            per_dev[d] += hi - lo
        if sum(per_dev) != in_total or sum(1 for c in per_dev if c) < 2:
            return None
        return scale_counts(per_dev, in_total, out_total, self.order)

    def gather_time(self, holders: Holders, rb: float) -> float:
        return self._schedule([(Transfer(d, 0, (lo, hi)), False) for d, lo, hi in holders if d != 0 and hi > lo], rb)[1]

    # ---- partition cost functions -------------------------------------------------------
    def cost_fns(self, block: Block, first_in_run: bool, last_in_run: bool) -> list[Callable[[int], float]]:
        """Per-device predicted seconds for ``n`` output rows/features of ``block`` (monotone)."""
        key = (block.kind, tuple(n.name for n in block.nodes), first_in_run, last_in_run)
        if key not in self._tables:
            self._tables[key] = self._cost_tables(block, first_in_run, last_in_run)
        return [t.__getitem__ for t in self._tables[key]]

    def _cost_tables(self, block: Block, first_in_run: bool, last_in_run: bool) -> list[list[float]]:
        in_shape, out_shape = block.in_shape, block.out_shape
        total = rows_of(out_shape)
        in_total = rows_of(in_shape)
        rb_in, rb_out = wire_row_bytes(block.input), wire_row_bytes(block.output)
        works: list[Work] = []
        in_counts: list[int] = []
        if block.kind == "spatial":
            for n in range(total + 1):
                c = (total - n) // 2
                in_r, work = self.chain(block, (c, c + n))
                works.append(work)
                in_counts.append(size(in_r))
        else:  # features: every node's work is proportional to the share (one call each)
            whole = aggregate(self._linear_work(block, total))
            works = [{k: (f * n / total, c) for k, (f, c) in whole.items()} if n else {} for n in range(total + 1)]
            in_counts = [in_total if n else 0 for n in range(total + 1)]
        lead = self.devices[0]
        # the reduce stage this block feeds, if any: its output stays where it is computed
        reduce_fns = self.reduce_cost_fns(block) if block.kind == "spatial" and last_in_run else None
        tables = []
        for d, dev in enumerate(self.devices):
            bw = min(dev.bandwidth_bps, lead.bandwidth_bps)
            lat = dev.latency_s + lead.latency_s
            table = [0.0]
            for n in range(1, total + 1):
                t = compute_s(dev, works[n])
                comm_bytes = 0.0
                if block.kind == "linear" or self.mode == "gather" or first_in_run:
                    if d != 0:
                        comm_bytes += in_counts[n] * rb_in
                else:
                    own = round(n * in_total / max(total, 1))
                    comm_bytes += max(0, in_counts[n] - own) * rb_in
                if reduce_fns is not None:
                    t += reduce_fns[d](n)
                elif d != 0 and (block.kind == "linear" or self.mode == "gather" or last_in_run):
                    comm_bytes += n * rb_out
                if comm_bytes > 0:
                    t += comm_bytes * 8.0 / bw + lat
                if d == 0 and dev.byte_s > 0 and block.kind == "spatial":
                    # the leader's CPU for the strips it scatters and gathers for the others
                    # (``relay_bytes``): fewer as it computes more rows itself
                    moved = 0.0
                    if self.mode == "gather" or first_in_run:
                        moved += max(0, in_total - in_counts[n]) * rb_in
                    if reduce_fns is None and (self.mode == "gather" or last_in_run):
                        moved += (total - n) * rb_out
                    t += dev.byte_s * moved
                table.append(max(t, table[-1]))
            tables.append(table)
        return tables

    def run_split(self, run: Sequence[Segment]) -> tuple[list[int], int]:
        """Exchange mode: one split for a whole run of spatial segments.

        Per device, the cost of a share of ``n`` rows at the run's largest output height is the
        sum over the run's segments of the segment's cost for the matching rows; the
        partitioner splits that. Every block of the run then uses the same boundaries (scaled to
        its height), so a device keeps its strip from block to block and only halos travel; a
        per-stage split would re-shuffle rows whenever two stages balance differently.
        """
        heights = [rows_of(_merge([sg], "spatial").out_shape) for sg in run]
        ref = max(heights)
        tables = [
            self.cost_fns(_merge([sg], "spatial"), i == 0, i == len(run) - 1) for i, sg in enumerate(run)
        ]
        maps = [[round(n * h / ref) for n in range(ref + 1)] for h in heights]

        def fn(d: int) -> Callable[[int], float]:
            vals = [sum(tables[i][d](maps[i][n]) for i in range(len(run))) for n in range(ref + 1)]
            return vals.__getitem__

        counts = self.partition([fn(d) for d in range(self.k)], ref, self.capabilities)
        assert sum(counts) == ref and all(c >= 0 for c in counts), counts
        return list(counts), ref

    def split(self, block: Block, first_in_run: bool, last_in_run: bool) -> list[int]:
        total = rows_of(block.out_shape)
        if self.k == 1:
            return [total]
        if block.ref is not None:
            return scale_counts(block.ref[0], block.ref[1], total, self.order)
        # shared like the tables: the split of a block priced in isolation does not depend on the order
        key = ("split", self.partition, block.kind, tuple(n.name for n in block.nodes), first_in_run, last_in_run)
        if key not in self._tables:
            fns = self.cost_fns(block, first_in_run, last_in_run)
            counts = self.partition(fns, total, self.capabilities)
            assert sum(counts) == total and all(c >= 0 for c in counts), counts
            self._tables[key] = list(counts)
        return list(self._tables[key])

    def block_estimate(self, block: Block, first_in_run: bool, last_in_run: bool) -> float:
        """Predicted time of a fused block in isolation (the DP's block cost).

        In exchange mode the block starts from the strips the block before it leaves: the
        run's split scaled to this block's input height. Their rounding can differ from this
        block's own split (a lone pool then fetches a row or two), and that cost is the DP's
        to weigh: pricing the block from strips aligned with its own split made every lone
        pool look free, and the DP cut a stage at each of them (VGG16: 12 stages, predicted
        4 % slower than the 10 it now finds).
        """
        counts = self.split(block, first_in_run, last_in_run)
        in_total = rows_of(block.in_shape)
        holders: Holders = [(0, 0, in_total)]
        if self.mode == "exchange" and not first_in_run and block.ref is not None:
            strips = _strips(scale_counts(block.ref[0], block.ref[1], in_total, self.order), self.order)
            holders = [(d, lo, hi) for d, (lo, hi) in enumerate(strips) if hi > lo]
        stage, out_holders = self.build(block, counts, holders, 0)
        t = stage.predicted_s
        reduce_fns = self.reduce_cost_fns(block) if last_in_run else None
        if reduce_fns is not None:  # the next stage sums the strips where they are
            t += max((reduce_fns[d](hi - lo) for d, lo, hi in out_holders), default=0.0)
        elif self.mode == "gather" or last_in_run:
            t += self.gather_time(out_holders, wire_row_bytes(block.output))
        return t


def make_plan(
    gm: torch.fx.GraphModule,
    cluster: Cluster,
    *,
    partition: str | Partitioner = "optimal",
    fusion: str = "auto",
    mode: str = "exchange",
    model_name: str = "",
    model_hash: str = "",
    order: Sequence[int] | None = None,
    backend: str = "torch",
    split: str = "auto",
) -> Plan:
    """Plan the execution of captured graph ``gm`` (``planning.graph.capture``) on ``cluster``.

    Device 0 is the leader: it holds the input, computes a strip of every spatial stage, runs
    the leader stages and ends with the output. ``partition`` is a name from
    ``partition.PARTITIONERS`` or any function with the same signature ``(costs, total,
    capabilities) -> counts`` (tests use this to force uneven splits). ``order`` lays the
    devices' strips top to bottom (a permutation of the device indices; default: device order,
    except that ``optimal`` in exchange mode, where links differ, searches for a faster one: see
    :func:`_best_orders`). ``backend`` is what every device computes with (engine/backends.py),
    or ``auto``: per device, the fastest its profile measured (``choose_backends``); each device
    is priced on its backend's lines and the plan records the choice (``plan.backends``).
    ``split``: how spatial blocks may be cut: ``rows`` only, ``channels`` (every run's longest
    tail that can be, for tests and experiments) or ``auto``: with ``optimal``, a run's tail of
    small maps is cut by output channels where that is predicted faster (planning/hybrid.py);
    the other partitioners (the published systems') cut rows only.
    """
    if split not in ("rows", "channels", "auto"):
        raise EdgeweaveError(f"unknown split {split!r}; expected rows, channels or auto")
    chosen = choose_backends(gm, cluster, backend)
    cluster = Cluster([d.on(b) for d, b in zip(cluster.devices, chosen)])
    def made(how: str, left_out: frozenset[int] = frozenset()) -> Plan:
        p = _make_plan_on(gm, cluster, partition, fusion, mode, model_name, model_hash, order, how, left_out)
        p.backends = chosen  # before its memory is counted: a backend's sessions hold copies
        return p

    plan = made(split)
    if _with_memory(gm, cluster, plan):
        plan = _fitting_plan(gm, cluster, made, [split, "channels", "rows", "auto"], partition, plan)
    plan.meta["backend_request"] = backend  # what a re-plan asks for again (runtime/stream.py)
    plan.meta["split_request"] = split
    if backend == "auto":
        plan.meta["backend_fallback"] = True  # a graph a device's backend cannot compile runs on torch
    return plan


def _fitting_plan(gm: torch.fx.GraphModule, cluster: Cluster, made: Callable[[str, frozenset[int]], Plan],
                  ways: Sequence[str], partition: str | Partitioner, first: Plan) -> Plan:
    """The fastest plan that fits every device's memory, when the fastest one does not (memory
    is a hard limit): each other way to cut the blocks (``ways``: the requested one first;
    ``auto`` cuts rows only, except with optimal), then the same leaving out, one round at a
    time, the followers that still overfill the plan that comes closest (they hold no work: a
    board too small for any share does not stop the others). The leader keeps the whole model
    and is never left out. Raises with what the closest plan needs when none fits. ``first``:
    the plan of ``ways[0]`` on every device, already made."""
    ways = list(dict.fromkeys("rows" if w == "auto" and partition != "optimal" else w for w in ways))
    left_out: frozenset[int] = frozenset()
    while True:
        tried = [first if w == ways[0] and not left_out else made(w, left_out) for w in ways]
        shorts = [_with_memory(gm, cluster, p) for p in tried]
        fitting = [p for p, sh in zip(tried, shorts) if not sh]
        if fitting:
            plan = min(fitting, key=lambda p: p.predicted_s)
            plan.meta["memory_bound"] = True  # not the fastest plan: the fastest one overfilled a device
            if left_out:
                plan.meta["left_out"] = [cluster.devices[d].name for d in sorted(left_out)]
            return plan
        near, short = min(zip(tried, shorts), key=lambda c: max(n - h for _d, n, h in c[1]))
        over = {d for d, _n, _h in short}
        if 0 in over or over <= left_out:  # the leader, or a follower short even without work
            raise EdgeweaveError(_short_message(cluster, near, short, left_out))
        left_out |= over


def _without(part: Partitioner, left_out: frozenset[int]) -> Partitioner:
    """``part`` over the devices not in ``left_out``; those get nothing to compute."""
    def split(costs: Sequence[Callable[[int], float]], total: int, capabilities: Sequence[float] | None = None) -> list[int]:
        keep = [d for d in range(len(costs)) if d not in left_out]
        counts = [0] * len(costs)
        caps = None if capabilities is None else [capabilities[d] for d in keep]
        for d, n in zip(keep, part([costs[d] for d in keep], total, caps)):
            counts[d] = n
        return counts

    split.__name__ = getattr(part, "__name__", "custom")
    return split


def _with_memory(gm: torch.fx.GraphModule, cluster: Cluster, plan: Plan) -> list[tuple[int, int, int]]:
    """Record each device's memory in ``plan.meta["memory"]``; the devices it overfills."""
    mem = plan_memory(gm, plan, [int(d.meta.get("runtime_bytes", RUNTIME_BYTES)) for d in cluster.devices])
    plan.meta["memory"] = [m.to_dict() for m in mem]
    return over_budget(mem, [d.memory_bytes for d in cluster.devices])


def _short_message(cluster: Cluster, plan: Plan, short: list[tuple[int, int, int]],
                   left_out: frozenset[int] = frozenset()) -> str:
    mb = 1 << 20
    parts = []
    for d, needs, has in short:
        m = plan.meta["memory"][d]
        why = " (the leader keeps the whole model)" if d == 0 else " (with no work)" if d in left_out else ""
        parts.append(f"{cluster.devices[d].name} needs {needs / mb:.0f} MB{why}: weights {m['weights'] / mb:.0f}, "
                     f"activations {m['activations'] / mb:.0f}, runtime {m['runtime'] / mb:.0f}; it has {has / mb:.0f} MB")
    return ("no plan fits the devices' memory; the closest needs: " + "; ".join(parts) +
            ". Add devices, give these more memory, or use a compact or pruned model (edgeweave compress)")


# auto: among backends priced equal (a profile without measured lines for them), the field's
# CPU runtime first; bf16 OpenVINO is not exact and never chosen for the user
_PREFERENCE = ("ort", "openvino", "torch")


def choose_backends(gm: torch.fx.GraphModule, cluster: Cluster, backend: str) -> list[str]:
    """Each device's backend: ``backend`` for all, or for ``auto`` the one its profile predicts
    fastest on the whole model, among those it measured (``DeviceProfile.backends``) and those
    it has installed (``meta["backends_available"]``, default torch and ort)."""
    from edgeweave.engine.backends import NAMES

    if backend != "auto":
        if backend not in NAMES:
            raise EdgeweaveError(f"unknown backend {backend!r}; choose one of {', '.join(NAMES)} or auto")
        return [backend] * len(cluster.devices)
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    work = [(flop_kind(gm, n), node_flops(gm, n)) for n in nodes]
    out = []
    for dev in cluster.devices:
        if dev.meta.get("backend", "auto") in NAMES:  # the device asked for its backend (worker --backend)
            out.append(str(dev.meta["backend"]))
            continue
        have = dev.meta.get("backends_available") or ["torch", "ort"]
        cands = [b for b in _PREFERENCE if b in have or b in dev.measured()]
        out.append(min(cands, key=lambda b: (compute_s(dev.on(b), work), _PREFERENCE.index(b))))
    return out


def _make_plan_on(
    gm: torch.fx.GraphModule,
    cluster: Cluster,
    partition: str | Partitioner,
    fusion: str,
    mode: str,
    model_name: str,
    model_hash: str,
    order: Sequence[int] | None,
    split: str,
    left_out: frozenset[int] = frozenset(),
) -> Plan:
    if callable(partition):
        part_fn, part_name = partition, getattr(partition, "__name__", "custom")
    elif partition in PARTITIONERS:
        part_fn, part_name = PARTITIONERS[partition], partition
    else:
        raise EdgeweaveError(f"unknown partitioner {partition!r}; expected one of {sorted(PARTITIONERS)}")
    if fusion not in FUSION_MODES:
        raise EdgeweaveError(f"unknown fusion mode {fusion!r}; expected one of {list(FUSION_MODES)}")
    if mode not in MODES:
        raise EdgeweaveError(f"unknown mode {mode!r}; expected one of {list(MODES)}")
    if not cluster.devices:
        raise EdgeweaveError("the cluster has no devices")
    if "ew_input_shape" not in gm.meta:
        raise EdgeweaveError("make_plan needs a graph from edgeweave.planning.graph.capture")
    k = len(cluster.devices)
    if k > 1:
        measure_density(gm)  # links are priced by the bytes the runtime's codec sends
    if order is not None and sorted(order) != list(range(k)):
        raise EdgeweaveError(f"strip order {list(order)} is not a permutation of the {k} devices' indices")
    tables: dict = {}
    if split == "auto":
        split = "auto" if part_name == "optimal" else "rows"
    args = (fusion, mode, model_name, model_hash, tables)

    def best(order_: Sequence[int] | None) -> tuple[Plan, list[Candidate]]:
        fns = [part_fn]
        if part_name == "optimal" and k > 1:
            # The optimal split is exact for the partition cost functions, which price a strip
            # in isolation; the plan's prediction then accounts for shared links, real strip
            # positions and re-splits between stages. So that "optimal" never predicts worse
            # than any other partitioner under that full model either, their plans are built
            # too and the fastest kept (meta["split_from"] says whose split won).
            fns += [PARTITIONERS[o] for o in ("bodp", "ocbp", "equal")]
        if left_out:  # devices that hold no work (memory: _fitting_plan)
            fns = [_without(f, left_out) for f in fns]
        made = [(_make_plan(gm, cluster, fn, part_name, *args, order_, split), fn) for fn in fns]
        plan = min((m[0][0] for m in made), key=lambda p: p.predicted_s)  # first of equals: optimal's
        return plan, [(merged, feeds, fn) for (_, merged, feeds), fn in made]

    plan, cands = best(order)
    links = {d.bandwidth_bps for d in cluster.devices}
    if (order is None and part_name == "optimal" and mode == "exchange" and k > 2 and len(links) > 1
            and not plan.meta["leader_only"]):
        # Strip order: rank orders by re-pricing the plans just made, re-plan the best few in
        # full, and go again from a better plan (its splits rank orders near it better). Only
        # where links differ: on equal links the model's preference for another order rests on
        # second-order terms, and measured it was not faster (5 x 100 Mbit/s: predicted 8 %
        # faster, measured 6 % slower; docs/bench-edgeld.md).
        tried = {tuple(plan.meta["strip_order"])}
        while True:
            improved = None
            for found in _best_orders(gm, cluster, cands, tables, exclude=tried):
                tried.add(found)
                alt, alt_cands = best(found)
                if alt.predicted_s < (improved or plan).predicted_s:
                    improved, cands_next = alt, alt_cands
            if improved is None:
                break
            plan, cands = improved, cands_next
    return plan


def _order_cost(gm: torch.fx.GraphModule, cluster: Cluster, merged: Merged, feeds: dict[str, Block],
                part_fn: Partitioner, tables: dict, order: Sequence[int]) -> float:
    """Predicted time of the same blocks and run splits with the strips laid in ``order``."""
    pl = _Planner(gm, cluster.devices, part_fn, "exchange", tables, order)
    pl.feeds = dict(feeds)
    return _assemble(pl, merged, list(gm.meta["ew_input_shape"]), False, True)[3]


def _best_orders(gm: torch.fx.GraphModule, cluster: Cluster, cands: Sequence[Candidate], tables: dict,
                 exclude: set[tuple[int, ...]], keep: int = 2) -> list[tuple[int, ...]]:
    """The ``keep`` strip orders (top to bottom) predicted fastest for the candidates' blocks.

    In exchange mode a device trades halos with the devices whose strips border its own, so
    which devices are neighbours decides how many halo rows cross the slow links: a device on a
    slow link does best at an end of the map (one neighbour), next to a fast one. An order is
    priced by one pass over each candidate's stages (every partitioner's blocks and run splits
    as made for the best plan so far, in its order; no partitioning, no fusion search), which
    ranks orders well but not exactly, so the caller re-plans the best few in full. Up to five
    devices every order with the leader at an end is priced (48 at five); beyond, pairwise swaps
    from device order while one helps.

    The leader stays at an end of the map: it also scatters the input, coordinates the
    reductions and collects the timings, so its halos leave later than a follower's, and a
    leader between two strips holds up two neighbours. Measured twice where the cost model
    preferred it inside: on five equal 100 Mbit/s devices 6.1-6.6 % slower (predicted 8 %
    faster), on the heterogeneous bench cluster 12 % slower than device order (predicted 4 %
    faster; bench edgeld run U).
    """
    k = len(cluster.devices)

    def leader_at_end(o: Sequence[int]) -> bool:
        return o[0] == 0 or o[-1] == 0

    def allowed(o: tuple[int, ...]) -> bool:
        return o not in exclude and leader_at_end(o)

    distinct = {}
    for m, f, fn in cands:  # partitioners often agree: price each distinct split once
        distinct.setdefault(tuple((b.kind, b.output.name if b.output is not None else "", str(b.ref)) for b, _, _ in m), (m, f, fn))

    def cost(o: tuple[int, ...]) -> float:
        return min(_order_cost(gm, cluster, m, f, fn, tables, o) for m, f, fn in distinct.values())

    if k <= 5:
        return sorted((o for o in itertools.permutations(range(k)) if allowed(o)), key=cost)[:keep]
    cur = tuple(range(k))
    cur_s = cost(cur)
    while True:
        swaps = []
        for i, j in itertools.combinations(range(k), 2):
            o = list(cur)
            o[i], o[j] = o[j], o[i]
            if leader_at_end(o):
                swaps.append((cost(tuple(o)), tuple(o)))
        s, o = min(swaps)
        if s >= cur_s:
            return [cur] if allowed(cur) else []
        cur, cur_s = o, s


def _make_plan(
    gm: torch.fx.GraphModule,
    cluster: Cluster,
    part_fn: Partitioner,
    part_name: str,
    fusion: str,
    mode: str,
    model_name: str,
    model_hash: str,
    tables: dict | None = None,
    order: Sequence[int] | None = None,
    split: str = "rows",
) -> tuple[Plan, Merged, dict[str, Block]]:
    """The plan for one split rule and strip order; also its blocks and ``feeds`` (what
    :func:`_order_cost` needs to re-price the same blocks under another order)."""
    pl = _Planner(gm, cluster.devices, part_fn, mode, tables, order, split)
    segs, merged = _blocks(pl, gm, fusion, mode)
    in_shape = list(gm.meta["ew_input_shape"])
    optimal = part_name == "optimal"
    stages, final, final_s, predicted = _assemble(pl, merged, in_shape, False, optimal)
    if split == "auto" and any(b.split == "channels" for b, _, _ in merged):
        # channel tails were chosen run by run from estimates: the plan keeps them only where
        # the whole plan is predicted faster than with rows everywhere
        pl.split_mode = "rows"
        rows = _blocks(pl, gm, fusion, mode)[1]
        pl.split_mode = split
        alt = _assemble(pl, rows, in_shape, False, optimal)
        if alt[3] < predicted:
            merged, (stages, final, final_s, predicted) = rows, alt
    fallback = False
    if part_name == "optimal" and pl.k > 1:
        # "optimal" promises the fastest predicted plan we can find; when spreading the work is
        # predicted slower than not spreading it (tiny inputs, slow links, a global op in every
        # block), the leader computes everything and the followers sit out.
        alt = _assemble(pl, merged, in_shape, True, optimal)
        if alt[3] < predicted:
            stages, final, final_s, predicted = alt
            fallback = True
    stages = _merge_leader_runs(gm, stages)
    all_nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    single = compute_s(pl.devices[0], pl._work(all_nodes, None))
    plan = Plan(
        model=model_name,
        model_hash=model_hash,
        input_shape=in_shape,
        devices=[d.name for d in cluster.devices],
        partition=part_name,
        fusion=fusion,
        mode=mode,
        stages=stages,
        final_transfers=final,
        predicted_s=predicted,
        meta={
            "single_device_s": single,
            "predicted_speedup": single / predicted if predicted > 0 else None,
            "final_transfer_s": final_s,
            "segments": len(segs),
            "leader_only": fallback,
            "split_from": part_fn.__name__ if hasattr(part_fn, "__name__") else part_name,
            # the speed estimates the prediction assumes (adapt.scaled_cluster); 1 = as profiled
            "speed_factors": [float(d.meta.get("speed_factor", 1.0)) for d in cluster.devices],
            "strip_order": list(pl.order),  # devices' strips top to bottom
        },
    )
    return plan, merged, pl.feeds


def _blocks(pl: _Planner, gm: torch.fx.GraphModule, fusion: str, mode: str) -> tuple[list[Segment], Merged]:
    """Cut, fuse and classify: the blocks the stages are built from (steps 1-3 above)."""
    try:
        if "ew_segments" not in gm.meta:  # cached: cutting is a pure function of the graph
            gm.meta["ew_segments"] = atomic_segments(gm)
        segs = list(gm.meta["ew_segments"])  # copied: unfold_flatten may re-cut it below
    except ValueError as e:
        raise EdgeweaveError(f"cannot plan this model: {e}") from None

    blocks: list[tuple[Block, bool, bool]] = []  # (block, first_in_run, last_in_run)
    i = 0
    while i < len(segs):
        seg = segs[i]
        if seg.kind == "spatial":
            j = i
            while j < len(segs) and segs[j].kind == "spatial":
                j += 1
            run = segs[i:j]
            if j < len(segs) and is_reduce_segment(segs[j]) and run[-1].output is not None:
                pl.feeds[run[-1].output.name] = _merge([segs[j]], "reduce")
            feed = pl.feeds.get(run[-1].output.name) if run[-1].output is not None else None
            blocks += _run_blocks(pl, gm, run, fusion, mode, feed)
            i = j
            continue
        if is_reduce_segment(seg) and not (blocks and blocks[-1][0].kind == "spatial"):
            parts = unfold_flatten(gm, seg)
            if len(parts) > 1:  # nothing is spread out to reduce from: split the Linear instead
                segs[i:i + 1] = parts
                continue
        if is_reduce_segment(seg):
            blocks.append((_merge([seg], "reduce"), True, True))
            i += 1
            continue
        if seg.kind == "linear" and pl.k > 1:
            blk = _merge([seg], "linear")
            split_t = pl.block_estimate(blk, True, True)
            leader_t = compute_s(pl.devices[0], pl._work(blk.nodes, None))
            if split_t < leader_t:
                blocks.append((blk, True, True))
                i += 1
                continue
        blocks.append((_merge([seg], "leader"), True, True))
        i += 1

    merged: list[tuple[Block, bool, bool]] = []
    for blk, first, last in blocks:
        if blk.kind == "leader" and merged and merged[-1][0].kind == "leader":
            prev = merged[-1][0]
            merged[-1] = (Block("leader", prev.nodes + blk.nodes, prev.input, blk.output), True, True)
        else:
            merged.append((blk, first, last))

    return segs, merged


def _row_blocks(pl: _Planner, gm: torch.fx.GraphModule, run: Sequence[Segment], fusion: str,
                mode: str) -> list[tuple[Block, bool, bool]]:
    """``run`` cut into row-split blocks by the fusion mode (its last block's output leaves the
    strips: to the leader, a reduce stage, or the channel blocks after it)."""
    ref = pl.run_split(run) if mode == "exchange" and pl.k > 1 else None
    cache: dict[tuple[int, int], float] = {}
    n = len(run)

    def cost(a: int, b: int) -> float:
        if (a, b) not in cache:
            cache[(a, b)] = pl.block_estimate(_merge(run[a:b], "spatial", ref), a == 0, b == n)
        return cache[(a, b)]

    groups = choose_blocks(n, fusion, [ends_with_pool(gm, s) for s in run], cost)
    return [(_merge(run[a:b], "spatial", ref), a == 0, b == n) for a, b in groups]


def _run_blocks(pl: _Planner, gm: torch.fx.GraphModule, run: Sequence[Segment], fusion: str, mode: str,
                feed: Block | None) -> list[tuple[Block, bool, bool]]:
    """A run of spatial segments as blocks: rows everywhere, or rows and then, from some
    segment on where the maps are small, blocks split by output channels (planning/hybrid.py):
    whichever the run's predicted time (with the reduce stage it ``feed`` s) says is fastest;
    with ``split="channels"`` the longest tail that can be."""
    key = ("rows", fusion, mode, tuple(s.names[0] for s in run), run[-1].names[-1])
    if key not in pl.runs:  # the rows-only cut, shared by the auto cut and its check (_make_plan)
        pl.runs[key] = _row_blocks(pl, gm, run, fusion, mode)
    rows_only = pl.runs[key]
    if pl.split_mode == "rows" or pl.k == 1:
        return rows_only
    # the tail may start where a row block of the rows-only cut starts: the head keeps those
    # blocks and their run-wide split (re-cutting the head for every tail cost 2-3x the planning)
    starts, cur = {}, 0
    for i, blk in enumerate(rows_only):
        starts[cur] = i
        cur += len(blk[0].segs)
    options = [rows_only]
    for p in tail_starts(gm, run):
        if p not in starts:
            continue
        tail = channel_blocks(gm, run[p:])
        assert tail is not None
        options.append(rows_only[:starts[p]] + [(_merge(g, "spatial", split="channels"), False, False) for g in tail])
    if pl.split_mode == "channels":
        return options[1] if len(options) > 1 else rows_only
    return min(options, key=lambda blocks: _run_time(pl, blocks, feed))


def _run_time(pl: _Planner, blocks: Sequence[tuple[Block, bool, bool]], feed: Block | None) -> float:
    """Predicted seconds of a run's blocks, from the input on the leader to the reduce stage
    they feed (or to the output gathered on the leader)."""
    merged = list(blocks) + ([(feed, True, True)] if feed is not None else [])
    in_shape = merged[0][0].in_shape
    return _assemble(pl, merged, list(in_shape), False, pl.partition is PARTITIONERS.get("optimal"))[3]


def _alone_on_leader(gm: torch.fx.GraphModule, stage: Stage) -> bool:
    """Whether the leader computes ``stage`` whole while every other device sits it out (a stage
    split by channels is not merged: the stages after it read its output by channels)."""
    if stage.split != "rows" or any(a.device != 0 and not is_empty(a.out_rows) for a in stage.assignments):
        return False
    if stage.kind == "reduce":  # unless its partial-sum path reads a smaller weight (a folded pool)
        by = {n.name: n for n in gm.graph.nodes}
        return (all(d == 0 or is_empty(r) for red in stage.reductions for d, r in red.rows)
                and not any(reduce_pool(by[red.node]) for red in stage.reductions))
    return whole_on(stage, 0)


def _merge_leader_runs(gm: torch.fx.GraphModule, stages: list[Stage]) -> list[Stage]:
    """Consecutive stages the leader computes whole and alone, with nothing travelling into the
    later ones, as one ``leader`` stage (the model on one device is one stage).

    Why: each stage is a graph the leader's backend runs on its own; on one device a plan of 11
    stages ran MobileNetV2 1.36x slower under ONNX Runtime than one session for the model (every
    boundary a separate session, fusions cut, the map handed over), and 1.08x for ResNet18.
    """
    out: list[Stage] = []
    for st in stages:
        prev = out[-1] if out else None
        if prev is not None and not st.transfers and _alone_on_leader(gm, prev) and _alone_on_leader(gm, st):
            first, last = prev.assignment(0), st.assignment(0)
            assert first is not None and last is not None
            assigns = [Assignment(0, first.in_rows, last.out_rows, prev.predicted_s + st.predicted_s,
                                  first.busy_s + last.busy_s)] + [
                Assignment(a.device, EMPTY, EMPTY, 0.0) for a in st.assignments if a.device != 0]
            out[-1] = Stage(prev.index, "leader", prev.nodes + st.nodes, prev.input_shape, st.output_shape, assigns,
                            prev.transfers, prev.predicted_s + st.predicted_s)
        else:
            out.append(dataclasses.replace(st, index=len(out)))
    return out


def _assemble(pl: _Planner, merged: Merged, in_shape: list[int], leader_only: bool,
              optimal: bool) -> tuple[list[Stage], list[Transfer], float, float]:
    """Build every stage in order (step 4); returns stages, final transfers, their time and the
    predicted total."""
    holders: Holders = [(0, 0, rows_of(in_shape))]
    axis = 2 if len(in_shape) == 4 else 1
    stages: list[Stage] = []
    for idx, (blk, first, last) in enumerate(merged):
        if blk.kind in ("leader", "reduce"):
            counts = None
        elif blk.split == "channels":
            counts = [units(blk.out_shape[1])] + [0] * (pl.k - 1) if leader_only else pl.channel_counts(blk, holders, axis)
        elif leader_only:
            counts = [rows_of(blk.out_shape)] + [0] * (pl.k - 1)
        else:
            counts = pl.split(blk, first, last)
        stage, new_holders = pl.build(blk, counts, holders, idx, axis)
        axis = stage.out_axis
        if not leader_only and blk.split == "rows" and blk.kind == "spatial" and pl.mode == "exchange" and optimal:
            # The partitioner prices a strip as if the previous split were aligned with it;
            # the split that really keeps strips in place is also a candidate.
            aligned = pl.aligned_counts(blk, holders)
            if aligned is not None and aligned != list(counts or []):
                alt, alt_holders = pl.build(blk, aligned, holders, idx)
                if alt.predicted_s < stage.predicted_s:
                    stage, new_holders = alt, alt_holders
        holders = new_holders
        stages.append(stage)
    final = [Transfer(d, 0, (lo, hi)) for d, lo, hi in holders if d != 0 and hi > lo]
    final_s = pl._schedule([(t, False) for t in final],
                           unit_bytes(merged[-1][0].output, axis) if merged else row_bytes(in_shape))[1]
    return stages, final, final_s, sum(s.predicted_s for s in stages) + final_s
