"""The breakdown of one inference's time (runtime/timeline.py): pure arithmetic over timings."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from edgeweave.runtime.timeline import breakdown, plot_timeline


def _timings(compute: list[list[float | None]], total: float) -> dict:
    """compute[s][d]: seconds device d computed in stage s (None: it sat the stage out)."""
    stages = []
    t = 0.0
    for s, row in enumerate(compute):
        devs = []
        for d, c in enumerate(row):
            devs.append({"device": d, "name": f"d{d}", "compute_s": c or 0.0, "start_s": t,
                         "ready_s": None if c is None else t + 0.001})
        t += max((c or 0.0) for c in row) + 0.002
        stages.append({"index": s, "kind": "spatial", "devices": devs})
    stages.append({"index": "final", "kind": "final_transfers", "devices": []})
    return {"total_s": total, "stages": stages}


def test_an_even_split_has_no_imbalance_and_the_rest_is_communication():
    b = breakdown(_timings([[0.1, 0.1, 0.1], [0.05, 0.05, 0.05]], total=0.2))
    assert abs(b["compute_s"] - 0.15) < 1e-12 and abs(b["imbalance_s"]) < 1e-12
    assert abs(b["other_s"] - 0.05) < 1e-12 and b["stages"] == 2


def test_the_slowest_device_of_each_stage_is_imbalance():
    # stage 0: 0.3 vs 0.1 (mean 0.2, max 0.3); stage 1: only device 1 computes (no imbalance)
    b = breakdown(_timings([[0.3, 0.1], [None, 0.2]], total=0.6))
    assert abs(b["imbalance_s"] - 0.1) < 1e-12
    assert all(abs(c - 0.3) < 1e-12 for c in b["compute_by_device_s"])
    assert abs(b["compute_s"] - 0.4) < 1e-12  # 0.2 (stage 0's mean) + 0.2 (stage 1, one device)


def test_compute_on_the_leader_alone_counts_as_compute_not_transfers():
    # three devices split stage 0 evenly; the leader alone computes stage 1 (the classifier)
    b = breakdown(_timings([[0.1, 0.1, 0.1], [0.2, None, None]], total=0.35))
    assert abs(b["compute_s"] - 0.3) < 1e-12 and abs(b["imbalance_s"]) < 1e-12
    assert abs(b["other_s"] - 0.05) < 1e-12  # only what is left: transfers and waits


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.one_of(st.none(), st.floats(0.0, 1.0)), min_size=1, max_size=5), min_size=1, max_size=8),
       st.floats(0.0, 20.0))
def test_the_parts_add_up_to_the_total(rows, total):
    width = max(len(r) for r in rows)
    rows = [r + [None] * (width - len(r)) for r in rows]
    b = breakdown(_timings(rows, total))
    assert abs(b["compute_s"] + b["imbalance_s"] + b["other_s"] - total) < 1e-9
    assert b["imbalance_s"] >= -1e-12 and b["compute_s"] >= 0
    assert b["compute_s"] <= sum(b["compute_by_device_s"]) + 1e-12


def test_timeline_plot_is_written(tmp_path):
    p = plot_timeline(_timings([[0.01, 0.02], [0.02, None]], total=0.05), tmp_path / "t.png", "two devices")
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG" and p.endswith("t.png")
