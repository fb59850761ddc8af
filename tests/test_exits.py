"""Multi-exit models, segmented early-exit inference, calibration, voting and the policy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edgeweave.errors import EdgeweaveError
from edgeweave.exits.calibrate import OperatingPoint, exit_proportions, thresholds_from_proportions
from edgeweave.exits.confidence import confidence
from edgeweave.exits.inference import NEVER, early_exit, forced_exit_thresholds, simulate
from edgeweave.exits.policy import choose
from edgeweave.exits.voting import default_voting_weights, vote
from edgeweave.models import build_model

torch.set_num_threads(1)


def _small(**kw):
    torch.manual_seed(0)
    return build_model("multi_exit_small", num_classes=10, in_channels=1, width=4, head_hidden=8, **kw).eval()


@pytest.mark.parametrize("name,kw,shape", [
    ("multi_exit_small", {"in_channels": 1, "width": 4}, (2, 1, 28, 28)),
    ("multi_exit_resnet18", {"num_classes": 7, "width": 4}, (2, 3, 32, 32)),
    ("multi_exit_tv_resnet", {"num_classes": 7, "arch": "resnet18"}, (1, 3, 64, 64)),
])
def test_multi_exit_models_share_one_trunk(name, kw, shape):
    m = build_model(name, **kw).eval()
    assert m.num_exits == 3
    x = torch.randn(*shape)
    with torch.no_grad():
        outs = m.forward_all(x)
        assert torch.allclose(outs[-1], m(x), atol=1e-5)
        for k in range(3):
            assert torch.allclose(outs[k], m.forward_exit(x, k), atol=1e-5)


def test_edgeke_exit_positions_and_heads():
    m = build_model("multi_exit_resnet18", num_classes=100, width=64)
    # segment 0: stem..layer3, segment 1: layer4.0, segment 2: layer4.1
    assert [n for n, _ in m.segments[0].named_children()][-1] == "layer3_1"
    assert [n for n, _ in m.segments[1].named_children()] == ["layer4_0"]
    assert [n for n, _ in m.segments[2].named_children()] == ["layer4_1"]
    lin0 = [l for l in m.heads[0] if isinstance(l, torch.nn.Linear)]
    lin1 = [l for l in m.heads[1] if isinstance(l, torch.nn.Linear)]
    assert (lin0[0].in_features, lin0[0].out_features, lin0[1].out_features) == (256, 256, 100)
    assert (lin1[0].in_features, lin1[0].out_features) == (512, 512)
    moved = build_model("multi_exit_resnet18", num_classes=10, width=8, exit_after=["layer2", "layer3.0", "layer4.0"])
    assert moved.num_exits == 4
    with pytest.raises(EdgeweaveError):
        build_model("multi_exit_small", exit_after=["layer9"])
    with pytest.raises(EdgeweaveError):
        build_model("multi_exit_small", exit_after=["layer2", "layer1"])


def test_early_exit_runs_only_the_segments_it_needs():
    m = _small()
    calls = [0, 0, 0]
    for k, seg in enumerate(m.segments):
        seg.register_forward_hook(lambda mod, i, o, k=k: calls.__setitem__(k, calls[k] + 1))
    r = early_exit(m, torch.randn(3, 1, 28, 28), forced_exit_thresholds(3, 0))
    assert calls == [1, 0, 0] and r.exit_index.tolist() == [0, 0, 0]
    early_exit(m, torch.randn(3, 1, 28, 28), forced_exit_thresholds(3, 1))
    assert calls == [2, 1, 0]


def test_batched_and_single_early_exit_agree():
    m = _small()
    g = torch.Generator().manual_seed(3)
    cal = torch.randn(200, 1, 28, 28, generator=g)
    x = torch.randn(60, 1, 28, 28, generator=g)
    with torch.no_grad():
        probs = torch.stack([F.softmax(o, -1) for o in m.forward_all(cal)], 1)
    thr = thresholds_from_proportions(probs, [0.3, 0.3, 0.2])  # 20 % left to the vote
    batched = early_exit(m, x, thr)
    assert len(set(batched.exit_index.tolist())) == 3, "the test needs samples leaving at every exit"
    assert batched.voted.any()
    for i in range(x.shape[0]):
        one = early_exit(m, x[i : i + 1], thr)
        assert one.pred.item() == batched.pred[i].item()
        assert one.exit_index.item() == batched.exit_index[i].item()
        assert one.voted.item() == batched.voted[i].item()
    # the pure simulation over precomputed probabilities gives the same answers
    with torch.no_grad():
        p_x = torch.stack([F.softmax(o, -1) for o in m.forward_all(x)], 1)
    sim = simulate(p_x, thr)
    assert torch.equal(sim.pred, batched.pred) and torch.equal(sim.exit_index, batched.exit_index)
    # each answer's probabilities: its exit's softmax, or for a voted sample the weighted mean of all
    w = default_voting_weights(3)
    for i in range(x.shape[0]):
        k = int(batched.exit_index[i])
        want = sum(w[j] * p_x[i, j] for j in range(3)) / sum(w) if batched.voted[i] else p_x[i, k]
        assert torch.allclose(batched.probs[i], want, atol=1e-6) and torch.allclose(sim.probs[i], want, atol=1e-6)
        assert int(batched.probs[i].argmax()) == int(batched.pred[i])


def _random_probs(n, k, c, seed):
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(n, k, 1, generator=g) * 4  # varied confidence
    return F.softmax(torch.randn(n, k, c, generator=g) * scale, -1)


@pytest.mark.parametrize("props", [[0.5, 0.3], [0.2, 0.2, 0.4], [0.7, 0.0, 0.3], [0.1, 0.8]])
def test_thresholds_reproduce_exit_proportions_on_held_out_data(props):
    val, held_out = _random_probs(4000, 3, 10, 0), _random_probs(4000, 3, 10, 1)
    thr = thresholds_from_proportions(val, props)
    want = props + [1 - sum(props)] if len(props) == 2 else props
    got_val = exit_proportions(simulate(val, thr).exit_index, 3)
    got = exit_proportions(simulate(held_out, thr).exit_index, 3)
    voted = simulate(held_out, thr).voted.float().mean().item()
    exp_exits = want[:2] + [want[2] + (1 - sum(want))]  # voted samples leave at the last exit
    for a, b in zip(got_val, exp_exits):
        assert a == pytest.approx(b, abs=1e-3)  # exact on the calibration split
    for a, b in zip(got, exp_exits):
        assert a == pytest.approx(b, abs=0.03)  # within sampling error on held-out data
    assert voted == pytest.approx(1 - sum(want), abs=0.03)


def test_bad_proportions_are_user_errors():
    with pytest.raises(EdgeweaveError):
        thresholds_from_proportions(_random_probs(10, 3, 4, 0), [0.8, 0.5])
    with pytest.raises(EdgeweaveError):
        thresholds_from_proportions(_random_probs(10, 3, 4, 0), [0.5])


def test_voting_uses_weighted_softmax_of_all_exits():
    p0 = torch.tensor([[0.3, 0.7]])
    p1 = torch.tensor([[0.3, 0.7]])
    p2 = torch.tensor([[0.6, 0.4]])
    assert vote([p0, p1, p2], [1 / 3, 1 / 3, 1 / 3]).item() == 1  # 1.2 vs 1.8: class 1
    assert vote([p0, p1, p2], [0.1, 0.1, 0.8]).item() == 0  # the last exit dominates
    probs = torch.stack([p0, p1, p2], 1)
    r = simulate(probs, [NEVER, NEVER, NEVER], voting_weights=[1, 1, 1])
    assert r.voted.item() and r.pred.item() == 1 and r.exit_index.item() == 2
    r = simulate(probs, [NEVER, NEVER, 0.0])
    assert not r.voted.item() and r.pred.item() == 0


def test_entropy_confidence_is_one_for_one_hot_and_zero_for_uniform():
    c = confidence(torch.tensor([[1.0, 0, 0, 0], [0.25, 0.25, 0.25, 0.25]]), "entropy")
    assert c.tolist() == pytest.approx([1.0, 0.0], abs=1e-5)
    with pytest.raises(EdgeweaveError):
        confidence(torch.ones(1, 2) / 2, "margin")


def _pt(name, acc, p95, mean=None):
    return OperatingPoint(name, [0.0], acc, mean if mean is not None else p95 * 0.8, p95, [1.0], 0.0, 1000)


POINTS = [_pt("fast", 0.90, 1.0), _pt("mid", 0.95, 2.0), _pt("mid2", 0.95, 2.5), _pt("slow", 0.98, 4.0)]


def test_policy_latency_budget_picks_best_accuracy_within_p95():
    assert choose(POINTS, latency_budget_ms=2.6).point.name == "mid"
    assert choose(POINTS, latency_budget_ms=10).point.name == "slow"
    assert choose(POINTS, latency_budget_ms=1.0).point.name == "fast"


def test_policy_accuracy_target_picks_fastest():
    c = choose(POINTS, min_accuracy=0.95)
    assert c.satisfied and c.point.name == "mid"
    assert choose(POINTS, min_accuracy=0.5).point.name == "fast"
    assert choose(POINTS, min_accuracy=0.94, latency_budget_ms=3.0).point.name == "mid"


def test_policy_default_and_unsatisfiable_requests():
    assert choose(POINTS).point.name == "slow"
    assert choose(POINTS, default="mid").point.name == "mid"
    c = choose(POINTS, latency_budget_ms=0.5)
    assert not c.satisfied and c.point.name == "fast" and "0.5 ms" in c.message
    c = choose(POINTS, min_accuracy=0.99)
    assert not c.satisfied and c.point.name == "slow" and "0.99" in c.message
    c = choose(POINTS, min_accuracy=0.98, latency_budget_ms=1.5)
    assert not c.satisfied
    with pytest.raises(EdgeweaveError):
        choose(POINTS, min_accuracy=95)
    with pytest.raises(EdgeweaveError):
        choose([], latency_budget_ms=1)


def test_best_speedup_only_counts_points_within_the_tolerance():
    from edgeweave.exits.evaluate import best_speedup, budget_grid

    pts = [_pt("a", 0.97, 1.0, mean=0.5), _pt("b", 0.985, 2.0, mean=1.0), _pt("c", 0.99, 4.0, mean=2.0)]
    s, name = best_speedup(pts, ref_accuracy=0.99, ref_ms=4.0)
    assert name == "b" and s == pytest.approx(4.0)  # "a" is 2 points below: excluded
    assert best_speedup(pts[:1], ref_accuracy=0.99, ref_ms=4.0) == (0.0, None)
    g = budget_grid(pts, 3)
    assert g[0] == pytest.approx(1.0) and g[-1] == pytest.approx(4.8)


def test_policy_scales_latencies_by_the_observed_load():
    from edgeweave.exits.policy import LoadTracker

    assert choose(POINTS, latency_budget_ms=2.6, latency_scale=2.0).point.name == "fast"  # mid: 4 ms now
    c = choose(POINTS, latency_budget_ms=1.5, latency_scale=2.0)
    assert not c.satisfied and c.point.name == "fast"
    pts = [OperatingPoint("p", [0.0], 0.9, 1.0, 2.0, [1.0], 0.0, 1, p50_ms=1.0)]
    lt = LoadTracker(window=8, min_samples=3)
    assert lt.factor() == 1.0
    for ms in (3.0, 3.2, 2.8):
        lt.observe(pts[0], ms)
    assert lt.factor() == pytest.approx(3.0)
    for _ in range(8):
        lt.observe(pts[0], 0.5)  # faster than calibrated: never scale below 1
    assert lt.factor() == 1.0
