"""bench stream's arithmetic (the testbed run itself is `edgeweave bench stream`): which offered
stream a configuration is judged by, the summary's ratios, the failover's recovery count."""

from __future__ import annotations

import pytest

from edgeweave.bench.stream import _recovery, summarize
from edgeweave.runtime.frames import FrameResult, latency_stats


def _row(streams, slo):
    kept = [r for r in streams if slo is None or r["p95_s"] <= slo]
    best = max(kept, key=lambda r: r["offered_fps"]) if kept else None
    return {"best": best, "streams": streams, "slo_s": slo, "lost_frames": 0, "rel_err": 1e-6,
            "p95_over_slo": (best["p95_s"] / slo if best else min(r["p95_s"] for r in streams) / slo) if slo else None}


def test_summary_judges_the_fastest_stream_that_kept_its_slo():
    s1 = {"offered_fps": 1.0, "served_fps": 1.0, "p95_s": 2.0}
    s2 = {"offered_fps": 1.5, "served_fps": 1.45, "p95_s": 2.9}
    s3 = {"offered_fps": 2.0, "served_fps": 1.6, "p95_s": 5.0}  # overloaded: p95 past the SLO
    res = {"models": {"vgg16": {"single_s": {"torch": 3.0, "ort": 2.0},
                                "rows": {"relaxed": _row([s1, s2, s3], 3.0), "tight": _row([s3], 1.0),
                                         "one": _row([s1, s3], None)}}}}
    s = summarize(res)
    assert s["throughput_ratio_vgg16_relaxed"] == pytest.approx(1.45 * 3.0)
    assert s["ratio_vgg16_relaxed_over_ort"] == pytest.approx(1.45 * 2.0)
    assert s["throughput_ratio_vgg16_tight"] is None  # no offered rate kept the SLO: no figure
    assert s["fps_vgg16_one"] == 1.6  # no SLO: the highest rate served
    assert s["p95_over_slo_max"] == pytest.approx(5.0)
    assert s["lost_frames"] == 0 and s["max_rel_err"] == 1e-6


def test_recovery_counts_answers_until_the_rate_is_back():
    # answers every 0.5 s, a gap of 3 s at the failure (t = 10), then every 0.6 s
    ends = [0.5 * i for i in range(1, 21)] + [13 + 0.6 * i for i in range(10)]
    frames = [{"end_s": e} for e in ends]
    r = _recovery(frames, 10.5, reference_fps=1 / 0.6)
    assert r["frames_to_recover"] == 3 and r["rate_after"] == pytest.approx(1 / 0.6)
    assert _recovery(frames, None, 1.0)["frames_to_recover"] is None
    assert _recovery(frames, 10.5, reference_fps=10.0)["frames_to_recover"] is None  # never that fast


def test_steady_rate_counts_after_every_server_answered_once():
    # five servers, 2 s per frame, 25 frames at once: waves of five answers every 2 s
    res = [FrameResult(i, 0.0, 2.0 * (i // 5), 2.0 * (i // 5 + 1), i % 5, [f"d{i % 5}"]) for i in range(25)]
    st = latency_stats(res, parallel=5)
    assert st["fps_steady"] == pytest.approx(2.5)  # 5 frames / 2 s, not 24 / 8 s = 3
    assert latency_stats(res)["fps_steady"] == pytest.approx(3.0)  # counted from the first answer: too high


def test_serve_clients_summary_checks_every_refusal_was_counted():
    from edgeweave.bench.stream_clients import summarize_clients

    answers = [{"end_s": 1.0 + 0.5 * i, "latency_s": 2.0 + 0.01 * i, "rel_err": 1e-7} for i in range(21)]
    raw = {"answers": answers, "refused": 7, "refused_slo": 7, "errors": 0,
           "stats": {"refused": 7, "refused_slo": 7}, "metrics": {"refused": 7.0, "refused_slo": 7.0}}
    r = summarize_clients(raw)
    assert r["fps"] == pytest.approx(2.0) and r["answered"] == 21 and r["refusals_counted"]
    assert r["p50_s"] == pytest.approx(2.1) and r["rel_err"] == 1e-7
    raw["metrics"]["refused"] = 6.0  # one refusal the clients saw that /metrics missed
    assert not summarize_clients(raw)["refusals_counted"]
    # the summary reports serve's rate against the bench's relaxed stream
    sv = {"fps": 1.8, "ratio_to_bench": 0.9, "p95_over_slo": 0.8, "refused": 7, "refusals_counted": True, "errors": 0,
          "rel_err": 2e-6}
    res = {"models": {"vgg16": {"single_s": {"torch": 3.0, "ort": 2.0}, "rows": {}, "serve": sv}}}
    s = summarize(res)
    assert s["serve_ratio_to_bench_vgg16"] == 0.9 and s["serve_refusals_counted_vgg16"] and s["max_rel_err"] == 2e-6
    res["models"]["vgg16"]["serve"] = {"error": "the serve clients failed"}
    assert summarize(res)["serve_error_vgg16"] == "the serve clients failed"
