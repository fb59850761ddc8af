"""The multi-exit network shape shared by every multi-exit architecture.

A backbone is written as an ordered list of named trunk blocks (stem, residual blocks, ...).
Exit positions name the block after which an early exit sits ("layer3" = after the last block of
layer3, "layer4.0" = after the first block of layer4); the last exit always sits at the end of
the trunk. The trunk is cut at those positions into *segments*: segment k runs from the previous
exit to exit k, and head k turns segment k's output into logits. At inference the trunk is run
once, segment by segment, so leaving at exit k costs segments 0..k plus head k only (EdgeKE's
original code ran a separate truncated model per exit and so recomputed the trunk).

``forward(x)`` returns the last exit's logits, so a multi-exit model is also an ordinary
classifier (plain training, evaluation, partitioned inference and pruning see the full model);
``forward_all(x)`` returns every exit's logits for training; ``run_segment``/``run_head`` are
the pieces early-exit inference (``edgeweave.exits.inference``) composes.

Exit positions are constructor keyword arguments (lists of strings) so a checkpoint's ModelSpec
rebuilds the same architecture.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

import torch
import torch.nn as nn

from edgeweave.errors import EdgeweaveError


class ExitHead(nn.Sequential):
    """Pool -> flatten -> [Linear(in, hidden) -> ReLU] -> Linear(-, classes).

    EdgeKE's intermediate heads are avgpool -> Linear(c, c) -> Linear(c, C); we put a ReLU between
    the two linear layers (two stacked linear maps are just one linear map without it).
    ``pool`` > 1 keeps a small spatial grid, which helps shallow exits on small inputs where a
    global average throws away where the strokes are. ``hidden=0`` gives a single linear layer
    (the plain ResNet classifier)."""

    def __init__(self, in_channels: int, num_classes: int, hidden: int = 0, pool: int = 1) -> None:
        feats = in_channels * pool * pool
        layers: list[nn.Module] = [nn.AdaptiveAvgPool2d((pool, pool)), nn.Flatten(1)]
        if hidden > 0:
            layers += [nn.Linear(feats, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)]
        else:
            layers += [nn.Linear(feats, num_classes)]
        super().__init__(*layers)


def out_channels(module: nn.Module) -> int:
    """Output channels of a conv block: the last Conv2d / BatchNorm2d it contains (in order)."""
    last = None
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            last = m.out_channels
        elif isinstance(m, nn.BatchNorm2d):
            last = m.num_features
    if last is None:
        raise EdgeweaveError(f"cannot tell the output channels of {type(module).__name__}")
    return last


def _resolve_exit_positions(names: list[str], exit_after: Sequence[str]) -> list[int]:
    """Map exit names to block indices. A stage name ("layer3") means its last block."""
    idx: list[int] = []
    for e in exit_after:
        if e in names:
            i = names.index(e)
        else:
            matches = [i for i, n in enumerate(names) if n.startswith(e + ".")]
            if not matches:
                raise EdgeweaveError(f"unknown exit position {e!r}; blocks are: {', '.join(names)}")
            i = matches[-1]
        idx.append(i)
    if idx != sorted(set(idx)):
        raise EdgeweaveError(f"exit positions {list(exit_after)} must be distinct and in trunk order")
    if idx and idx[-1] >= len(names) - 1:
        raise EdgeweaveError("an early exit cannot sit after the last block (the final exit is already there)")
    return idx


class MultiExitNet(nn.Module):
    """Trunk segments + one head per exit. See the module docstring."""

    def __init__(self, blocks: Sequence[tuple[str, nn.Module]], exit_after: Sequence[str],
                 head_factory: Callable[[int, int], nn.Module], final_head: nn.Module) -> None:
        """``head_factory(exit_index, in_channels)`` builds the head of each early exit;
        ``final_head`` is the last exit's head."""
        super().__init__()
        names = [n for n, _ in blocks]
        cut = _resolve_exit_positions(names, exit_after)
        bounds = [0] + [i + 1 for i in cut] + [len(blocks)]
        self.exit_after = list(exit_after)
        self.block_names = names
        self.segments = nn.ModuleList()
        for a, b in zip(bounds[:-1], bounds[1:]):
            self.segments.append(nn.Sequential(OrderedDict((n.replace(".", "_"), m) for n, m in blocks[a:b])))
        heads = [head_factory(k, out_channels(self.segments[k])) for k in range(len(cut))]
        self.heads = nn.ModuleList(heads + [final_head])

    @property
    def num_exits(self) -> int:
        return len(self.heads)

    def run_segment(self, k: int, h: torch.Tensor) -> torch.Tensor:
        return self.segments[k](h)

    def run_head(self, k: int, h: torch.Tensor) -> torch.Tensor:
        return self.heads[k](h)

    def forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every exit, running the trunk once."""
        outs = []
        h = x
        for k in range(self.num_exits):
            h = self.run_segment(k, h)
            outs.append(self.run_head(k, h))
        return outs

    def forward_exit(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Logits of exit ``k`` only: segments 0..k then head k."""
        h = x
        for j in range(k + 1):
            h = self.run_segment(j, h)
        return self.run_head(k, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for seg in self.segments:
            h = seg(h)
        return self.heads[-1](h)

    def exit_parameters(self, k: int) -> list[nn.Parameter]:
        """Parameters of segment k and head k (what exit k adds on top of the earlier exits)."""
        return list(self.segments[k].parameters()) + list(self.heads[k].parameters())


def is_multi_exit(model: nn.Module) -> bool:
    return isinstance(model, MultiExitNet)


def exit_part(model: nn.Module, part: dict | None) -> nn.Module:
    """The piece of a multi-exit model a distributed plan runs (``plan.meta["part"]``): segment
    ``k`` alone (``{"segment": k}``; its head runs where the output lands), or with its head
    (``{"segment": k, "head": true}``, the last exit's). None: the whole model. In a variant set
    (models/variants.py) ``"variant": NAME`` first picks the variant (alone: all of it). Leader
    and followers build the same piece from the same weights, so a plan names it, not its bytes."""
    if part is None:
        return model
    if "variant" in part:
        from edgeweave.models.variants import VariantSet

        if not isinstance(model, VariantSet):
            raise EdgeweaveError(f"a plan for variant {part['variant']!r} cannot run on {type(model).__name__}")
        rest = {k: v for k, v in part.items() if k != "variant"}
        return exit_part(model.variant(str(part["variant"])), rest or None)
    if not isinstance(model, MultiExitNet):
        raise EdgeweaveError(f"a plan for a piece of a multi-exit model ({part}) cannot run on {type(model).__name__}")
    k = int(part["segment"])
    if not 0 <= k < model.num_exits:
        raise EdgeweaveError(f"segment {k} out of range 0..{model.num_exits - 1}")
    if part.get("head"):
        return nn.Sequential(model.segments[k], model.heads[k]).eval()
    return model.segments[k]


__all__ = ["ExitHead", "MultiExitNet", "exit_part", "is_multi_exit", "out_channels"]
