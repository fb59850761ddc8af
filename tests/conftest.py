import os

import pytest
import torch

# Tests share a 2-core machine with real worker processes; one thread each keeps them fair.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
