"""bench edgedi: model variants, recovery arithmetic, speedups/bounds, summary and outputs
(synthetic results, no testbed), and the adaptive stream driver on real local processes."""

from __future__ import annotations

import json

import pytest
import torch

from edgeweave.bench import edgedi as E


@pytest.mark.slow
def test_variants_shrink_and_compact_vgg16_is_at_most_a_fifth(tmp_path):
    cfg = E.EdgediConfig(size=64)
    sizes = {}
    for v in cfg.variants:
        path, h, size = E.write_variant("vgg16", v, cfg, tmp_path / f"{v}.safetensors")
        assert path.is_file() and len(h) == 64
        sizes[v] = size
        # the checkpoint reloads into the same (pruned) architecture
        from edgeweave.checkpoint import load_checkpoint

        m, spec, extra = load_checkpoint(path)
        assert spec.in_channels == 1 and spec.num_classes == 6 and extra["variant"] == v
        assert m(torch.randn(1, 1, 64, 64)).shape == (1, 6)
    assert sizes["compact"]["flops"] <= sizes["original"]["flops"] / 5
    assert sizes["compact_pruned"]["flops"] < 0.8 * sizes["compact"]["flops"]
    assert sizes["compact_pruned"]["params"] < sizes["compact"]["params"]


def test_recovery_counts_frames_from_the_change():
    lat = [(2.0, ""), (1.0, ""), (2.1, "replanned"), (2.0, ""), (1.05, ""), (1.2, ""), (1.0, "")]
    recs = [{"latency_s": x, "event": e} for x, e in lat]
    r = E.recovery(recs, 1.0)  # one lucky frame (the 2nd) is not a recovery
    assert r["frames_to_recover"] == 5 and r["first_replan_frame"] == 3
    assert r["within_after_recovery"] == pytest.approx(2 / 3)
    assert r["not_recovered"] is None
    never = E.recovery([{"latency_s": x, "event": e} for x, e in [(3.0, ""), (2.0, "replanned"), (1.5, ""), (1.4, "")]], 1.0)
    assert never["frames_to_recover"] is None  # and it says how close it came and whether it re-planned
    assert never["not_recovered"].startswith("the last 3 frames' median 1.500 s is 1.50x the reference 1.000 s")
    assert "re-planned at frame 2" in never["not_recovered"]
    assert "no re-plan" in E.recovery([{"latency_s": 3.0, "event": ""}], 1.0)["not_recovered"]


def synthetic_result(cfg):
    models, rows = {}, []
    single = {"original": 1.0, "compact": 0.25, "compact_pruned": 0.15}
    for b in cfg.models:
        for v in cfg.variants:
            key = f"{b}/{v}"
            models[key] = {"base": b, "variant": v, "flops": 100 * single[v], "params": 10,
                           "single_s": {"leader": single[v], "w1": single[v] / 1.5}}
            for k in cfg.devices:
                rows.append({"model": key, "base": b, "variant": v, "devices": k, "caps": list(cfg.caps[:k]),
                             "rates": list(cfg.rates[:k]), "latency_s": single[v] / (0.8 * k), "predicted_s": single[v] / k,
                             "prediction_error": 0.2, "rel_err": 1e-7, "latencies_s": [single[v] / (0.8 * k)] * 3})
    spec = [(0, "calibrate", .25, 1.3, "", 1), (0, "calibrate", .25, 1.0, "replanned", 1), (1, "steady", .25, 1.0, "", 1),
            (1, "steady", .25, 1.0, "kept", 1), (2, "low", .1, 2.0, "", 2.4), (2, "low", .1, 2.0, "replanned", 2.5),
            (2, "low", .1, 1.3, "", 2.5), (2, "low", .1, 1.2, "", 2.5), (3, "back", .25, 1.0, "", 1.0),
            (3, "back", .25, 1.0, "replanned", 1.0), (3, "back", .25, 0.95, "", 1)]
    recs = [{"index": i, "phase": p, "phase_name": n, "cap": c, "latency_s": x, "event": e, "plan_version": 0,
             "predicted_s": 1.0, "estimated_s": 1.0, "factors": [1.0, 1.0, f, 1.0], "replan_s": 0.01}
            for i, (p, n, c, x, e, f) in enumerate(spec)]
    phases = []
    for p, n, first, cnt, ref in [(0, "calibrate", 0, 2, 1.0), (1, "steady", 2, 2, 1.0), (2, "low", 4, 4, 1.25), (3, "back", 8, 3, 1.0)]:
        sel = recs[first:first + cnt]
        ph = {"phase": p, "name": n, "cap": sel[0]["cap"], "first_frame": first, "frames": cnt, "reference_s": ref,
              "replans": sum(r["event"] == "replanned" for r in sel), "evaluations": sum(r["event"] != "" for r in sel),
              "median_latency_s": 1.0}
        if n in ("low", "back"):
            ph.update(E.recovery(sel, ref))
        phases.append(ph)
    adapt = {"model": "resnet18/original", "device": "w2", "caps": [.25, .25, .1, .25], "frames": [2, 2, 4, 3],
             "records": recs, "phases": phases, "start_rel_err": 0.0, "final_rel_err": 0.0, "nominal_predicted_s": 1.0,
             "calibrated_predicted_s": 1.0, "oracle_predicted_s": 1.25, "oracle_rows_of_device": {"calibrated": 50, "low": 20},
             "policy": {}}
    m = {"cpus": 2, "loadavg": [1.0, 1.0, 1.0], "torch": torch.__version__}
    return {"config": {**E.asdict(cfg), "device_names": list(E.NAMES), "link_goodput_bps": {"1000mbit": 9.5e8}},
            "models": models, "rows": rows, "adapt": adapt, "machine_before": m, "machine_after": m, "seconds": 60.0}


def test_summary_bounds_targets_and_outputs(tmp_path):
    cfg = E.EdgediConfig()
    res = synthetic_result(cfg)
    r4 = E._row(res["rows"], "vgg16/original", 4)
    # the four devices' CPU per frame (two frames) against the leader alone: 1.25x its work
    r4 |= {"cpu_frames_s": [[0.2, 0.3, 0.2, 0.3], [0.25, 0.3, 0.2, 0.3]], "single_device_cpu_frames_s": [0.8, 0.84, 0.76]}
    E._speedups(res["rows"], res["models"], cfg)
    assert r4["bound"] == pytest.approx(1 + 1.5 + 1 + 1.5)  # two 0.25-core and two 0.375-core boards
    assert r4["speedup"] == pytest.approx(3.2) and r4["speedup_vs_bound"] == pytest.approx(3.2 / 5)
    assert r4["work_ratio"] == pytest.approx(1.025 / 0.8) and r4["speedup_ceiling"] == pytest.approx(5 * 0.8 / 1.025)
    assert "work_ratio" not in E._row(res["rows"], "vgg16/original", 3)  # nothing metered: no ceiling
    from edgeweave.runtime.timeline import frame_summary

    r4["timings"] = frame_summary({"total_s": 0.4, "stages": [
        {"index": 0, "kind": "spatial", "wall_s": 0.3, "compute_s": 0.3,
         "devices": [{"device": d, "name": E.NAMES[d], "compute_s": 0.3 - 0.05 * d, "start_s": 0.0, "ready_s": 0.01}
                     for d in range(4)]}]})
    s = E.summarize(res, cfg)
    assert s["breakdown_4dev"]["compute_s"] == pytest.approx(0.225) and s["breakdown_4dev"]["imbalance_s"] == pytest.approx(0.075)
    assert s["compact_flops_ratio"] == pytest.approx(0.25)
    assert s["speedup_ceiling_4dev"] == pytest.approx(r4["speedup_ceiling"])
    assert s["compact_speedup_4dev"] == pytest.approx(1.0 / (0.25 / 3.2))
    assert s["adapt_frames_to_recover_per_change"] == [3, 1]  # median of 3 frames within 10% from the 3rd frame on
    assert s["adapt_frames_to_recover"] == 3 and s["adapt_not_recovered"] == {}
    assert s["adapt_replans_steady"] == 0 and s["adapt_calibration_replans"] == 1
    tg = E.check_targets(s)
    assert tg["speedup_vs_bound"]["met"] is False and tg["adapt_frames_to_recover"]["met"] is True
    res["summary"], res["targets"] = s, tg
    files = E.write_outputs(res, tmp_path)
    for k in ("json", "csv", "report", "plot_adapt", "plot_speedup", "adapt_csv", "plot_timeline"):
        assert (tmp_path / files[k].split("/")[-1]).stat().st_size > 0
    back = json.loads((tmp_path / "edgedi.json").read_text())
    assert back["summary"]["adapt_frames_to_recover"] == 3
    assert "speedup_vs_bound" in (tmp_path / "report.md").read_text()
    assert "= compute 0.225 s (the mean device's) + imbalance 0.075 s" in (tmp_path / "report.md").read_text()
    assert "that work allows at most 3.90x, 0.78 of the bound" in (tmp_path / "report.md").read_text()


@pytest.mark.slow
def test_adaptive_stream_on_local_processes():
    """Real followers over gloo: the stream serves exact results, records per-device compute, and
    a profile that is badly wrong for one device is corrected by one re-plan."""
    from edgeweave.models import build_model
    from edgeweave.checkpoint import ModelSpec
    from edgeweave.planning.adapt import AdaptPolicy
    from edgeweave.planning.graph import capture
    from edgeweave.planning.planner import make_plan
    from edgeweave.profiling.profile import Cluster, DeviceProfile
    from edgeweave.runtime.leader import LocalCluster
    from edgeweave.runtime.stream import AdaptiveStream

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model("vgg11", num_classes=6, in_channels=1).eval()
    spec = ModelSpec("vgg11", 6, 1, (96, 96), {})
    true_a = 2e-10
    # w1 is claimed 6x faster than it is: the first plan overloads it
    prof = Cluster([DeviceProfile("leader", a=true_a), DeviceProfile("w1", a=true_a / 6)])
    with LocalCluster(workers=1, profiles=prof, timeout_s=60) as cl:
        cl.load_model(model, spec)
        gm = capture(model, (1, 1, 96, 96))
        plan = make_plan(gm, prof, partition="optimal", fusion="auto", mode="exchange", model_hash=cl.model_hash)
        # rule 5 (undo a re-plan that runs slower) is off: on loopback the two devices share two
        # host cores and the re-plan's gain is inside frame noise; tests/test_adapt.py covers it
        s = AdaptiveStream(cl, plan, prof, policy=AdaptPolicy(change=0.5, patience=2, min_gain=0.05,
                                                              worse_by=float("inf")))
        first_share = s.pred_base[0] / s.pred_base[1]  # leader's planned compute over w1's
        x = torch.randn(1, 1, 96, 96)
        ys, recs = [], []
        for _ in range(6):
            y, r = s.step(x)
            ys.append(y)
            recs.append(r)
        with torch.no_grad():
            ref = model(x)
        for y in ys:
            assert torch.allclose(y, ref, rtol=1e-4, atol=1e-5)
        assert all(len(r.compute_s) == 2 and r.compute_s[1] > 0 for r in recs)
        # relative to the leader, w1 is found several times slower than claimed (absolute factors
        # also absorb how fast this host is compared with the made-up profiles; the per-call
        # overheads both devices share pull the ratio below the true 6: 3.5-3.7 measured at 96 px;
        # at 64 px, where those overheads weigh more, 2.5-3.1 locally and 1.7 once in CI)
        assert recs[-1].factors[1] / recs[-1].factors[0] > 2.0
        # and the re-plan moved work from w1 to the leader
        assert s.pred_base[0] / s.pred_base[1] > 2 * first_share
        assert 1 <= sum(r.event == "replanned" for r in recs) <= 2
        assert s.plan is not plan and s.version >= 1
