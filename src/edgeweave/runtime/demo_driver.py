"""The leader process of the demo's emulated cluster: :mod:`edgeweave.bench.leader_driver`'s
protocol (``plan``, ``infer``, ``quit``), with a real photo as the input instead of seeded noise.

It runs inside the leader device's namespace and CPU cap (``edgeweave.runtime.demo`` starts it
there), so that the leader's share of every inference runs at the emulated board's speed; the
demo only plans and reads the replies. ``plan`` compares the cluster's output with the whole
model run here on the same photo (``rel_err``).
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from edgeweave.bench.leader_driver import LeaderDriver, main


class DemoDriver(LeaderDriver):
    description = "edgeweave demo leader (JSON lines on stdin/stdout)"

    def ref_for(self, plan: Any) -> tuple[torch.Tensor, torch.Tensor]:
        from edgeweave.runtime.demo import sample_photo

        shape = tuple(plan.input_shape)
        if shape not in self.refs:
            x = sample_photo(int(shape[-1])).expand(int(shape[0]), -1, -1, -1).contiguous()
            with torch.no_grad():
                self.refs[shape] = (x, self.model(x))
        return self.refs[shape]


if __name__ == "__main__":
    sys.exit(main(driver=DemoDriver))
