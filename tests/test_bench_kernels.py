"""bench kernels: the runtime's CPU split into a cost per stage and one per byte moved, and the
whole bench on a small model (every variant exact, files written, targets stated)."""

from __future__ import annotations

import json

import pytest
import torch

from edgeweave.bench import kernels as K
from edgeweave.planning.graph import capture
from edgeweave.planning.planner import make_plan
from edgeweave.profiling.profile import Cluster

pytestmark = pytest.mark.timeout(600)


def test_moved_counts_each_transfer_at_both_ends():
    torch.manual_seed(0)
    model, x, _spec = K.build("small_cnn", 32, 0)
    plan = make_plan(capture(model, tuple(x.shape)), Cluster.uniform(3), mode="gather", split="rows", backend="torch")
    traffic = K.moved(plan)
    assert len(traffic) == len(plan.stages) + 1 and all(len(r) == 3 for r in traffic)
    for s, st in enumerate(plan.stages):
        shape, axis = list(st.input_shape), plan.in_axis(s)
        per_row = 4 * torch.Size(shape).numel() // shape[axis]
        sent = [(t.rows[1] - t.rows[0]) * per_row for t in st.transfers if t.src != t.dst and t.rows[1] > t.rows[0]]
        assert sum(b for b, _m in traffic[s]) == 2 * sum(sent)  # once at the sender, once at the receiver
        assert sum(m for _b, m in traffic[s]) == 2 * len(sent)
    assert sum(b for row in traffic for b, _m in row) > 0  # a split plan moves rows


def test_split_runtime_cpu_recovers_its_three_costs():
    # 0.1 ms per stage, 0.3 ms per message, 1 ms per MiB
    mb = 1 << 20
    cases = [(0, 0), (mb, 1), (3 * mb, 2), (mb // 2, 4), (0, 0), (2 * mb, 1)]
    cells = {(s, 0): (b, m, 1e-4 + 3e-4 * m + 1e-3 * b / mb) for s, (b, m) in enumerate(cases)}
    r = K.split_runtime_cpu(cells)
    assert r["fixed_ms"] == pytest.approx(0.1) and r["per_message_ms"] == pytest.approx(0.3)
    assert r["per_mb_ms"] == pytest.approx(1.0) and r["no_messages_median_ms"] == pytest.approx(0.1)
    assert r["messages_max"] == 4 and r["mb_max"] == pytest.approx(3.0)
    short = K.split_runtime_cpu({(0, 0): (0, 0, 1e-3), (1, 0): (mb, 1, 2e-3)})
    assert short["fixed_ms"] is None and short["no_messages_median_ms"] == pytest.approx(1.0)  # too few to fit


def test_the_bench_on_a_small_model(tmp_path):
    cfg = K.KernelsConfig(models=("small_cnn",), size=32, rounds=2, devices=3, runtime_frames=2, backends=("torch",))
    res = K.run_kernels_bench(cfg, out_dir=tmp_path)
    s = res["summary"]
    assert s["max_rel_err"] <= 1e-4
    assert s["runtime_cpu_per_stage_ms"] > 0 and "runtime_cpu_fixed_per_stage_ms" in s
    rt = res["runtime"]["torch"]
    assert len(rt["per_stage_ms"]) == 3 and rt["cells"] >= 3
    assert res["targets"]["runtime_cpu_per_stage_ms"]["target"] == "<= 0.3"
    back = json.loads((tmp_path / "kernels" / "kernels.json").read_text())
    assert back["summary"]["max_rel_err"] == s["max_rel_err"]
    assert (tmp_path / "kernels" / "kernels.png").stat().st_size > 0
