import os
import socket
import threading
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from edgeweave.runtime.wire import Channel

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
    from edgeweave.resident import give_back

    give_back()  # the freed heap back to the system: the other worker needs it


# The files whose tests run whole models on several local processes or the emulated testbed:
# marked ``heavy``. `make test` runs the other files on two workers, then these two at a time,
# then the testbed's one after another (CPU caps and timings want the host to themselves). Two
# heavy files at once ran the 24 GB CI machine out of memory while every follower held two
# copies of its model (VGG at 64 px on five processes held 13-18 GB); a follower now maps the
# model it receives and keeps only its share (checkpoint.py, engine/columns.py). The servers of
# small models with a few followers (serving, security, bench serve) run with the light files:
# they wait more than they compute or hold.
HEAVY = {"test_runtime_cli.py", "test_runtime_models.py", "test_runtime_models_cli.py", "test_runtime_zoo.py",
         "test_models_zoo.py", "test_runtime_channels.py", "test_runtime_plans.py", "test_runtime_reduce.py",
         "test_runtime_session.py", "test_stream_regroup.py", "test_bench_edgedi.py", "test_bench_edgedi_testbed.py",
         "test_bench_edgeld_testbed.py", "test_bench_ondemand_testbed.py", "test_demo.py", "test_testbed.py", "test_backend_choice.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in HEAVY:
            item.add_marker(pytest.mark.heavy)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def pair():
    """Channels for two ranks of one gloo group in this process (each built on its own thread, since the
    constructor waits for the other)."""
    port = _free_port()
    groups: dict[int, object] = {}

    def build(rank: int) -> None:
        store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timedelta(seconds=30))
        opts = dist.ProcessGroupGloo._Options()
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
        opts._timeout = timedelta(seconds=30)
        groups[rank] = (store, dist.ProcessGroupGloo(store, rank, 2, opts))

    ts = [threading.Thread(target=build, args=(r,)) for r in (0, 1)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert set(groups) == {0, 1}
    names = ["a", "b"]
    return [Channel(groups[r][1], r, names, timeout_s=1.0) for r in (0, 1)]
