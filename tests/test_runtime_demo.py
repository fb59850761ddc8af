"""The distributed step of `edgeweave demo` (real photo, local workers, plan table)."""

from __future__ import annotations

import io
import re

import pytest
import torch
from rich.console import Console

from edgeweave.runtime.demo import distributed_demo_step, sample_photo

pytestmark = pytest.mark.timeout(300)


def test_sample_photo_is_a_normalised_real_image():
    x = sample_photo(224)
    assert x.shape == (1, 3, 224, 224) and x.dtype == torch.float32
    assert -3 < float(x.mean()) < 3 and float(x.std()) > 0.2  # a photo, not a constant
    assert not torch.equal(sample_photo(64, 0), sample_photo(64, 1))


def test_distributed_demo_step_small_model_prints_the_plan():
    buf = io.StringIO()
    threads = torch.get_num_threads()
    res = distributed_demo_step(workers=1, model_name="cifar_resnet18", size=32, repeat=1,
                                console=Console(file=buf, width=140))
    assert torch.get_num_threads() == threads  # the caller's setting is restored
    assert res["rel_err"] <= 1e-4 and res["latency_s"] > 0 and res["single_device_s"] > 0
    assert res["devices"] == ["leader", "worker1"]
    text = buf.getvalue()
    assert "rows a-b" in text and "worker1" in text and "rel_err" in text
    assert not re.search(r"speedup [0-9]", text)  # processes sharing one machine's cores are no cluster
