"""VGG16 at 224x224 through the CLI on real local processes, as a user would run it.

In its own module so that the module-scoped cluster of test_runtime_models.py (four workers
holding VGG16, ~2 GB each) is gone when this one starts four more: together with the test
process they once exceeded the 24 GB of the CI host and the kernel killed the test run.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_cli_vgg16_224_three_workers():
    out = subprocess.run(
        [sys.executable, "-m", "edgeweave", "run", "--model", "torchvision:vgg16", "--input-size", "224",
         "--workers", "3", "--check", "--json", "--repeat", "1", "--fusion", "pools", "--mode", "exchange"],
        capture_output=True, text=True, timeout=800)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout)
    assert res["rel_err"] <= 1e-4
    assert res["workers"] == 3 and res["latency_s"] > 0
    assert len(res["plan"]["devices"]) == 4
