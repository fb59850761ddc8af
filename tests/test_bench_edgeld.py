"""bench edgeld without the testbed: which runs it makes, how the summary and targets are
computed from rows, what it writes, and the planner's view of the emulated devices."""

from __future__ import annotations

import csv
import json
import statistics

import pytest

from edgeweave.bench.edgeld import (
    NAMES,
    EdgeldConfig,
    attach_speedups,
    build_runs,
    check_targets,
    ratio_interval,
    rel_error,
    summarize,
    write_outputs,
)
from edgeweave.bench.tbcluster import bench_spec, cpu_ceiling, metered, planner_cluster


def test_full_config_covers_every_experiment_once():
    cfg = EdgeldConfig()
    runs = build_runs(cfg)
    keys = [r.key for r in runs]
    assert len(keys) == len(set(keys))  # shared configurations run once, tagged twice
    by = lambda e: [r for r in runs if e in r.experiments]  # noqa: E731
    # (a) 2 models x 2 links x 4 follower counts x 2 modes
    assert len(by("a_followers")) == 2 * 2 * 4 * 2
    assert {r.k for r in by("a_followers")} == {1, 2, 3, 4}
    assert {r.model for r in by("a_followers")} == {"vgg13", "vgg16"}
    # (b) 4 partitioners x 2 modes x 2 fusions on the heterogeneous cluster, nothing else there
    b = by("b_partition")
    assert len(b) == 16 and {r.partition for r in b} == {"equal", "bodp", "ocbp", "optimal"}
    assert {r.fusion for r in b} == {"pools", "auto"}
    assert all(r.caps == (0.25, 0.5, 0.25, 0.25, 0.125) and r.rates == ("1000mbit", "1000mbit", "100mbit", "100mbit", "50mbit") for r in b)
    # (c) 3 fusions x 2 modes, (d) 3 sizes x 2 modes, both at 4 followers on fast links
    assert len(by("c_fusion")) == 6 and len(by("d_size")) == 6
    assert {r.size for r in by("d_size")} == {96, 224, 448}
    shared = [r for r in runs if len(r.experiments) > 1]
    assert shared and all(r.model == "vgg16" and r.k == 4 and r.fusion == "auto" for r in shared)
    # phases: homogeneous 1000 and 100 Mbit/s, and the heterogeneous one
    assert len({r.phase for r in runs}) == 3


def test_quick_config_is_small():
    q = EdgeldConfig.quick_config()
    runs = build_runs(q)
    assert q.quick and q.repeat <= 2 and len(q.models) == 1 and q.size < 224
    assert len(runs) < 0.6 * len(build_runs(EdgeldConfig()))


def _row(exp, partition="optimal", fusion="auto", mode="gather", k=4, link="1000mbit", het=False, lat=1.0, pred=None,
         size=224, model="vgg16", single=4.0):
    pred = lat if pred is None else pred
    return {"experiments": [exp], "model": model, "size": size, "followers": k, "partition": partition, "fusion": fusion,
            "mode": mode, "link": "mixed" if het else link, "heterogeneous": het, "latency_s": lat, "predicted_s": pred,
            "prediction_error": rel_error(pred, lat), "speedup": single / lat, "single_device_s": single, "rel_err": 1e-6,
            "caps": [0.25] * (k + 1), "rates": [link] * (k + 1), "stages": 5}


def test_summary_keys_from_rows():
    rows = [
        _row("a_followers", mode="gather", lat=1.0, pred=1.05),
        _row("a_followers", mode="exchange", lat=0.8, pred=0.8),
        _row("a_followers", mode="exchange", link="100mbit", lat=1.25, pred=1.0),
        _row("a_followers", mode="gather", link="100mbit", lat=2.0, pred=2.0),
        _row("b_partition", partition="bodp", fusion="pools", het=True, lat=2.2),
        _row("b_partition", partition="ocbp", fusion="pools", het=True, lat=2.1),
        _row("b_partition", partition="optimal", fusion="pools", het=True, lat=2.0),
        _row("b_partition", partition="bodp", het=True, lat=1.0),  # auto: not the summary's gain
        _row("b_partition", partition="optimal", het=True, lat=0.5),
        _row("b_partition", partition="ocbp", mode="exchange", het=True, lat=1.5),
        _row("b_partition", partition="optimal", mode="exchange", het=True, lat=1.6),
        _row("c_fusion", fusion="none", mode="gather", lat=1.6),
        _row("c_fusion", fusion="pools", mode="exchange", lat=0.9),
    ]
    rows[1]["experiments"].append("c_fusion")
    s = summarize(rows, EdgeldConfig())
    assert s["speedup_vgg16_4f_1000mbit"] == pytest.approx(4.0 / 0.8) and s["speedup_vgg16_4f_1000mbit_mode"] == "exchange"
    assert s["speedup_vgg16_4f_100mbit"] == pytest.approx(4.0 / 1.25)
    assert s["optimal_gain_over_bodp"] == pytest.approx(2.2 / 2.0 - 1)
    assert s["ocbp_gain_over_bodp"] == pytest.approx(2.2 / 2.1 - 1)
    assert s["optimal_vs_ocbp"]["auto/exchange"] == pytest.approx(1.5 / 1.6 - 1)
    assert s["partition_gains"]["auto/gather"]["optimal_over_bodp"] == pytest.approx(1.0)
    assert s["partition_gains"]["pools/exchange"]["optimal_over_bodp"] is None
    assert s["optimal_never_slower_than_ocbp"] is False
    assert s["fusion_gain_vgg16"] == pytest.approx(1.6 / 0.8) and s["fusion_best"] == "auto/exchange"
    # errors: 0.05, 0, 0.2, 0 and zeros elsewhere -> median 0
    assert s["prediction_error_median"] == pytest.approx(0.0)
    t = check_targets(s)
    assert t["speedup_vgg16_4f_1000mbit"]["met"] is True  # 5.0 >= 4.0
    assert t["speedup_vgg16_4f_100mbit"]["met"] is False  # 3.2 < 3.6
    assert t["optimal_gain_over_bodp"]["met"] is False  # 10% < 15%
    assert t["fusion_gain_vgg16"]["met"] is True
    assert t["optimal_never_slower_than_ocbp"]["met"] is False


def test_gain_intervals_tell_noise_from_a_difference():
    same = [0.50, 0.55, 0.48, 0.60, 0.52, 0.51, 0.58, 0.49, 0.53]
    lo, hi = ratio_interval(same, list(reversed(same)))
    assert lo < 0 < hi  # one configuration against itself: no difference can be claimed
    lo, hi = ratio_interval([x * 1.3 for x in same], same)
    assert 0.15 < lo <= 0.3 <= hi  # 30 % faster: the interval excludes 0 and holds the truth
    assert ratio_interval(same, same) == ratio_interval(same, same)  # seeded: reproducible
    rows = [_row("b_partition", partition=p, mode=m, het=True, lat=statistics.median(xs)) | {"latencies_s": xs}
            for p, m, xs in (("ocbp", "gather", same), ("optimal", "gather", [x * 1.02 for x in same]),
                             ("ocbp", "exchange", same), ("optimal", "exchange", [x * 1.3 for x in same]))]
    s = summarize(rows, EdgeldConfig())
    assert s["optimal_never_slower_than_ocbp"] is False  # the medians say "slower" in both modes
    assert s["optimal_slower_than_ocbp_beyond_noise"] == ["auto/exchange"]  # only one beyond noise


def test_speedups_use_the_phase_s_own_baseline_where_there_is_one():
    rows = [_row("a_followers", lat=0.5), _row("a_followers", lat=0.5), _row("d_size", lat=0.2)]
    rows[2]["size"] = 96
    rows[1]["single_device_adjacent_s"] = 2.2  # measured among the configurations of its phase
    attach_speedups(rows, {"vgg16@224": {"median_s": 2.0}, "vgg16@96": {"median_s": 0.6}})
    assert [r["speedup"] for r in rows] == pytest.approx([4.0, 4.4, 3.0])
    assert [r["speedup_startend"] for r in rows] == pytest.approx([4.0, 4.0, 3.0])
    assert all(r["single_device_s"] == (0.6 if r["size"] == 96 else 2.0) for r in rows)
    s = summarize(rows[1:2], EdgeldConfig())
    assert s["speedup_vgg16_4f_1000mbit"] == pytest.approx(4.4) and s["speedup_vgg16_4f_1000mbit_startend"] == pytest.approx(4.0)
    assert s["speedup_vgg16_4f_1000mbit_interval"] is None  # no samples: no interval
    # with the samples of both sides, the summary carries a bootstrap interval around the ratio
    rows[1] |= {"single_device_adjacent_times_s": [2.0, 2.2, 2.5, 2.1, 2.3], "latencies_s": [0.5, 0.48, 0.55, 0.5, 0.52]}
    lo, hi = summarize(rows[1:2], EdgeldConfig())["speedup_vgg16_4f_1000mbit_interval"]
    assert 2.2 / 0.55 <= lo < 4.4 < hi <= 2.5 / 0.48
    attach_speedups(rows, {})  # no baseline at all: no speedup, not an error
    assert rows[0]["speedup"] is None and rows[1]["speedup"] == pytest.approx(4.4)


def test_cpu_ceiling_is_the_bound_over_the_extra_work():
    # three frames of leader + 4 (CPU seconds per device) against one device alone
    frames = [[0.09, 0.08, 0.08, 0.08, 0.08], [0.10, 0.08, 0.08, 0.09, 0.08], [0.09, 0.08, 0.07, 0.08, 0.08]]
    c = cpu_ceiling(frames, [0.30, 0.31, 0.29], bound=5.0)
    assert c["cpu_s"] == pytest.approx([0.09, 0.08, 0.08, 0.08, 0.08])  # per device, median over frames
    assert c["work_ratio"] == pytest.approx(0.41 / 0.30)  # median frame total over median single frame
    assert c["speedup_ceiling"] == pytest.approx(5.0 * 0.30 / 0.41)
    # a cluster doing no extra work is bounded by the bound itself; less CPU than alone, above it
    assert cpu_ceiling([[0.15, 0.15]], [0.3], 2.0)["speedup_ceiling"] == pytest.approx(2.0)
    assert cpu_ceiling([[0.1, 0.1]], [0.3], 2.0)["speedup_ceiling"] == pytest.approx(3.0)
    assert cpu_ceiling([], [0.3], 5.0) == {} and cpu_ceiling(frames, [], 5.0) == {}  # nothing metered


def test_metered_reports_what_each_device_used_meanwhile():
    usage = [[1.0, 2.0], [1.25, 2.5]]
    out, used = metered(lambda: usage.pop(0), lambda: "answer")
    assert out == "answer" and used == pytest.approx([0.25, 0.5])
    assert metered(None, lambda: 7) == (7, None)  # no cgroups (loopback fallback): no numbers


def test_missing_experiments_give_none_not_errors():
    s = summarize([_row("a_followers")], EdgeldConfig())
    assert s.get("optimal_gain_over_bodp") is None
    assert s["fusion_gain_vgg16"] is None
    assert check_targets(s)["fusion_gain_vgg16"]["met"] is None


def test_outputs_written(tmp_path):
    cfg = EdgeldConfig.quick_config()
    rows = [_row("a_followers", k=k, lat=2.0 / k, pred=2.1 / k, size=112) for k in (1, 2, 4)]
    rows += [_row("b_partition", partition=p, het=True, lat=1.0 + i / 10) for i, p in enumerate(("equal", "bodp", "ocbp", "optimal"))]
    rows += [_row("c_fusion", fusion=f, lat=0.6 + i / 10) for i, f in enumerate(("none", "pools"))]
    rows += [_row("d_size", size=s, lat=s / 200) for s in (64, 112)]
    from dataclasses import asdict

    from edgeweave.runtime.timeline import frame_summary

    # the headline row's fastest frame, as the leader reports it (two stages, leader + 4)
    frame = {"total_s": 0.5, "stages": [
        {"index": i, "kind": "spatial", "wall_s": 0.2, "compute_s": 0.2,
         "devices": [{"device": d, "name": NAMES[d], "compute_s": 0.1 + 0.02 * d, "start_s": 0.25 * i,
                      "ready_s": 0.25 * i + 0.01, "wall_s": 0.2, "comm_s": 0.1} for d in range(5)]} for i in range(2)]
        + [{"index": "final", "kind": "final_transfers", "wall_s": 0.0, "compute_s": 0.0, "devices": []}]}
    rows[2]["timings"] = frame_summary(frame)
    rows[2]["latencies_s"] = [0.5, 0.6]
    rows[2] |= cpu_ceiling([[0.1, 0.08, 0.08, 0.08, 0.08]], [0.3], 5.0)  # 0.42 s of CPU against 0.3 s
    result = {
        "config": asdict(cfg) | {"devices": list(NAMES), "link_goodput_bps": {"1000mbit": 9.4e8},
                                 "message_latency": {"0.25": {"overhead_s": 4e-3, "work_ms": 4.0}},
                                 "planner_latency_s": {"0.25": 2e-3}},
        "profiles": {"0.25": {"a": 5e-11, "b": 2e-4, "per_kind": {}, "fits": {"conv": {"heldout_median_rel_err": 0.1}}}},
        "baselines": {"vgg16@112": {"median_s": 4.0, "times_s": [4.0]}},
        "rows": rows, "machine_before": {"cpus": 2, "loadavg": [0.5, 0.5, 0.5], "torch": "x"},
        "machine_after": {"cpus": 2, "loadavg": [0.6, 0.6, 0.6], "torch": "x"}, "seconds": 60.0,
    }
    result["summary"] = summarize(rows, cfg)
    result["targets"] = check_targets(result["summary"])
    files = write_outputs(result, tmp_path)
    for key in ("json", "csv", "report", "plot_followers", "plot_partition", "plot_fusion", "plot_sizes", "plot_prediction"):
        p = tmp_path / files[key].split("/")[-1]
        assert p.is_file() and p.stat().st_size > 100, key
    assert (tmp_path / "followers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "edgeld.json").read_text())
    assert len(data["rows"]) == len(rows) and "summary" in data and data["files"]["csv"].endswith("edgeld.csv")
    with open(tmp_path / "edgeld.csv") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == len(rows) and float(table[0]["latency_s"]) == pytest.approx(2.0)
    md = (tmp_path / "report.md").read_text()
    assert "load average [0.5, 0.5, 0.5] before" in md and "| speedup_vgg16_4f_1000mbit |" in md
    # where the headline frame's time went: mean compute 0.28 s (2 x 0.14), imbalance 2 x 0.04
    b = data["summary"]["speedup_vgg16_4f_1000mbit_breakdown"]
    assert b["compute_s"] == pytest.approx(0.28) and b["imbalance_s"] == pytest.approx(0.08)
    assert "| vgg16@112 k=4 1000mbit auto/gather | 0.500 | 0.280 | 0.080 | 0.140 | 2 | 1.400 | 3.571 |" in md
    assert data["summary"]["speedup_vgg16_4f_1000mbit_ceiling"] == pytest.approx(5 / 1.4)
    assert (tmp_path / "timeline_1000mbit.png").read_bytes()[:4] == b"\x89PNG"


def test_planner_sees_measured_profiles_and_links():
    profiles = {0.25: {"profile": {"name": "cap0.25", "a": 4e-10, "b": 1e-3, "per_kind": {"conv": [4e-10, 1e-3]}}},
                0.5: {"profile": {"name": "cap0.5", "a": 2e-10, "b": 5e-4, "per_kind": {"conv": [2e-10, 5e-4]}}}}
    goodput = {"1000mbit": 9.4e8, "100mbit": 9.5e7}
    cl = planner_cluster(["leader", "w1"], [0.25, 0.5], ["1000mbit", "100mbit"], profiles, goodput, {0.25: 3e-3, 0.5: 1e-3})
    a, b = cl.devices
    assert (a.name, b.name) == ("leader", "w1")
    assert a.a == 4e-10 and b.a == 2e-10 and b.per_kind["conv"] == [2e-10, 5e-4]
    assert a.bandwidth_bps == 9.4e8 and b.bandwidth_bps == 9.5e7
    assert (a.latency_s, b.latency_s) == (3e-3, 1e-3)  # each device's latency measured at its own cap
    assert b.meta == {"cpu": 0.5, "rate": "100mbit"}


def test_bench_spec_names_and_caps():
    spec = bench_spec(5, cpu=0.25, bandwidth="100mbit")
    assert [d["name"] for d in spec["devices"]] == list(NAMES)
    assert all(d["cpu"] == 0.25 and d["bandwidth"] == "100mbit" for d in spec["devices"])
    from edgeweave.testbed import spec_from_dict

    assert spec_from_dict(spec).prefix == "ewb-"


def test_cli_lists_edgeld():
    from typer.testing import CliRunner

    from edgeweave.cli import app

    r = CliRunner().invoke(app, ["bench", "edgeld", "--help"])
    assert r.exit_code == 0 and "--quick" in r.output and "testbed" in r.output
