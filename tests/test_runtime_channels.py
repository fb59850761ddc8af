"""Channel-split plans on real processes over gloo: each device computes a slice of a layer's
output channels from the whole input map it first receives; the result must equal one device.

Forced channel tails (``split="channels"``) on VGG11 and VGG16 (the first Linear layer sums the
devices' channel columns), even and uneven slices, a device holding no channels. Residual adds
and concatenations stay in rows (tests/test_planning_channels.py checks where tails may start).
"""

from __future__ import annotations

import pytest
from _runtime_helpers import check, edges

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def cl():
    from edgeweave.runtime.leader import LocalCluster

    with LocalCluster(3, timeout_s=60) as session:
        yield session


def _channel_sizes(plan) -> list[int]:
    return [a.out_rows[1] - a.out_rows[0] for s in plan.stages if s.split == "channels" for a in s.assignments]


@pytest.mark.parametrize("name,size,workers,partition,mode", [
    ("vgg11", 64, 3, "equal", "exchange"),
    ("vgg11", 64, 2, "optimal", "gather"),
    ("vgg11", 64, 3, edges, "gather"),
    ("vgg16", 32, 3, "equal", "gather"),
    ("vgg16", 32, 3, edges, "exchange"),
])
def test_forced_channel_plans_are_exact_on_real_processes(cl, name, size, workers, partition, mode):
    plan = check(cl, name, size, workers, partition=partition, mode=mode, split="channels")
    sizes = _channel_sizes(plan)
    assert sizes, "the plan has no channel stage: nothing was tested"
    if partition is edges:
        assert 0 in sizes and len(set(s for s in sizes if s)) > 1  # uneven, and a device holding none
