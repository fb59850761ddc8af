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
