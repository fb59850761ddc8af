import os

import pytest
import torch

# Tests share a 2-core machine with real worker processes; one thread each keeps them fair.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _free_module_caches(request):
    """Drop a module's cached models and graphs when it ends. The caches (``lru_cache`` on
    set-up helpers) hold VGGs of ~0.5 GB each; kept for the whole session they added up, with
    the slow runtime tests' followers, to more than the 24 GB of the CI machine."""
    yield
    import gc

    for obj in list(vars(request.module).values()):
        if callable(getattr(obj, "cache_clear", None)) and hasattr(obj, "cache_info"):
            obj.cache_clear()
    gc.collect()
