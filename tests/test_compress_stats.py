"""Parameter / FLOP / latency measurement."""

from __future__ import annotations

import torch
import torch.nn as nn

from edgeweave.compress.stats import compare, count_flops, count_params, measure_latency, model_stats

torch.set_num_threads(1)


def test_conv_and_linear_flops_are_two_per_mac() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(8 * 10 * 12, 5))
    assert count_flops(net, (1, 3, 10, 12)) == 2 * (3 * 8 * 9 * 10 * 12) + 2 * (8 * 10 * 12 * 5)
    assert count_flops(net, (2, 3, 10, 12)) == 2 * count_flops(net, (1, 3, 10, 12))


def test_params_and_modes_restored() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert count_params(net) == 3 * 4 * 9 + 4 + 4 + 4
    net.train()
    threads = torch.get_num_threads()
    s = model_stats(net, (1, 3, 8, 8), repeats=3, warmup=1)
    assert net.training and torch.is_grad_enabled() and torch.get_num_threads() == threads
    assert s.latency_s is not None and 0 < s.latency_min_s <= s.latency_s and s.params == count_params(net)
    assert s.to_dict()["input_shape"] == [1, 3, 8, 8]
    assert model_stats(net, (1, 3, 8, 8), latency=False).latency_s is None


def test_latency_grows_with_work() -> None:
    small = nn.Conv2d(8, 8, 3, padding=1)
    big = nn.Sequential(*[nn.Conv2d(8, 8, 3, padding=1) for _ in range(20)])
    assert measure_latency(big, (1, 8, 48, 48), repeats=5) > measure_latency(small, (1, 8, 48, 48), repeats=5)


def test_compare_ratios() -> None:
    a = model_stats(nn.Conv2d(4, 8, 3), (1, 4, 8, 8), latency=False)
    b = model_stats(nn.Conv2d(4, 4, 3), (1, 4, 8, 8), latency=False)
    r = compare(a, b)
    assert abs(r["flops_ratio"] - 0.5) < 1e-9 and r["latency_ratio"] is None
