"""One on-demand policy over the variants a cluster holds (models/variants.py, runtime/variants.py):
a variant set survives a checkpoint, every exit of every variant run over real follower
processes equals the single-device variant's, and a request's budget or accuracy target picks
the (variant, operating point) that serves it."""

from __future__ import annotations

import pytest
import torch

from edgeweave.checkpoint import ModelSpec, model_from_bytes, model_to_bytes
from edgeweave.errors import EdgeweaveError
from edgeweave.exits.calibrate import OperatingPoint
from edgeweave.exits.inference import forced_exit_thresholds
from edgeweave.exits.policy import choose, split_name, variant_points
from edgeweave.models.multi_exit import exit_part
from edgeweave.models.variants import variant_entry
from edgeweave.runtime.run import compare

SIZE = 32
ENTRIES = [variant_entry("full", "multi_exit_resnet18", width=16),
           variant_entry("student", "compact", base="multi_exit_resnet18", ratio=4, base_kwargs={"width": 16})]


def _spec() -> ModelSpec:
    return ModelSpec("variant_set", 10, 3, (SIZE, SIZE), {"variants": ENTRIES})


def _vset():
    torch.manual_seed(0)
    return _spec().build().eval()


def _x(seed: int) -> torch.Tensor:
    return torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _point(name: str, k: int, exit_k: int, accuracy: float) -> OperatingPoint:
    props = [0.0] * k
    props[exit_k] = 1.0
    return OperatingPoint(name, forced_exit_thresholds(k, exit_k), accuracy, 1.0, 1.0, props, 0.0, 0)


def test_a_variant_set_reloads_from_its_checkpoint_with_every_variant():
    vset = _vset()
    again, spec, _ = model_from_bytes(model_to_bytes(vset, _spec()))
    assert again.names == ["full", "student"] and spec.name == "variant_set"
    x = _x(0)
    with torch.no_grad():
        for name in vset.names:
            a, b = vset.variant(name).forward_all(x), again.variant(name).forward_all(x)
            assert all(torch.equal(u, v) for u, v in zip(a, b))
        assert torch.equal(vset(x), vset.variant("full")(x))  # the set classifies as its first variant
    assert exit_part(vset, {"variant": "student", "segment": 0}) is vset.variant("student").segments[0]
    with pytest.raises(EdgeweaveError, match="no variant named"):
        exit_part(vset, {"variant": "nope"})
    with pytest.raises(EdgeweaveError, match="distinct identifiers"):
        ModelSpec("variant_set", 10, 3, (SIZE, SIZE), {"variants": ENTRIES[:1] * 2}).build()


def test_the_policy_chooses_among_every_variants_points():
    pts = variant_points({"full": [OperatingPoint("p0", [0.0], 0.95, 40.0, 50.0, [1.0], 0.0, 0),
                                   OperatingPoint("p1", [0.5], 0.90, 20.0, 25.0, [1.0], 0.0, 0)],
                          "student": [OperatingPoint("p0", [0.0], 0.93, 8.0, 10.0, [1.0], 0.0, 0)]})
    assert [p.name for p in pts] == ["full/p0", "full/p1", "student/p0"]
    assert choose(pts, latency_budget_ms=30).point.name == "student/p0"  # more accurate than full/p1 and fits
    assert choose(pts, latency_budget_ms=60).point.name == "full/p0"
    assert choose(pts, min_accuracy=0.92).point.name == "student/p0"  # the fastest reaching 92 %
    c = choose(pts, latency_budget_ms=5)
    assert not c.satisfied and c.point.name == "student/p0"
    assert split_name("student/p0") == ("student", "p0")
    with pytest.raises(EdgeweaveError):
        split_name("p0")


@pytest.mark.timeout(300)
def test_every_variant_runs_exactly_over_the_cluster_and_the_budget_picks_the_variant():
    from edgeweave.runtime.leader import LocalCluster
    from edgeweave.runtime.variants import VariantsOnDemand

    vset = _vset()
    with LocalCluster(3, timeout_s=60) as cl:
        cl.load_model(vset, _spec())
        k = {n: vset.variant(n).num_exits for n in vset.names}
        points = {"full": [_point("early", k["full"], 0, 0.80), _point("last", k["full"], k["full"] - 1, 0.95)],
                  "student": [_point("last", k["student"], k["student"] - 1, 0.90)]}
        od = VariantsOnDemand(cl, vset, points, (1, 3, SIZE, SIZE), model_name="set")
        od.warm_up()
        x = _x(1)
        for name, m in od.members.items():
            assert all(p.devices == cl.names for p in m.exits.plans)  # every segment over every device
            with torch.no_grad():
                refs = vset.variant(name).forward_all(x)
            for j in range(m.exits.num_exits):
                ans = m.exits.infer(x, forced_exit_thresholds(m.exits.num_exits, j))
                assert ans.exit_index == j
                for z, ref in zip(ans.logits, refs):
                    assert float(ref.std()) > 1e-4, "degenerate reference proves nothing"
                    assert compare(z, ref)["rel_err"] <= 1e-5, (name, j)
        by = {p.name: p for p in od.points}
        assert set(by) == {"full/early", "full/last", "student/last"}
        assert by["full/early"].p95_ms < by["full/last"].p95_ms  # priced on this cluster's segments
        pred = od.predict(x, min_accuracy=0.94)
        assert pred.choice.point.name == "full/last" and int(pred.exits[0]) == k["full"] - 1
        with torch.no_grad():
            assert torch.allclose(pred.probs, torch.softmax(vset.variant("full")(x), -1), atol=1e-5)
        fastest = min(od.points, key=lambda p: p.p95_ms)
        pred = od.predict(x, latency_budget_ms=fastest.p95_ms * 1.001)
        assert pred.choice.satisfied and pred.choice.point.name == fastest.name
        assert od.num_exits(pred.choice.point) == k[split_name(fastest.name)[0]]
        assert 0.0 <= od.skipped_fraction() <= 1.0
        with pytest.raises(EdgeweaveError, match="without operating points"):
            VariantsOnDemand(cl, vset, {"full": points["full"]}, (1, 3, SIZE, SIZE))
