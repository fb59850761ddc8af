"""Bad input as a user types it, through real processes: every case is one line on stderr, exit
code 2, no traceback and no C++ stack frames, and it is told before any heavy work (no model
loaded where the value alone is wrong, no follower process started). Also what the `plan` and
`run` tables look like at 80 columns."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from edgeweave.errors import EdgeweaveError
from edgeweave.limits import MEMORY_SHARE, check_followers_fit, follower_bytes, mem_available_bytes

pytestmark = pytest.mark.timeout(300)

GOOD = {"a": 1e-10, "bandwidth_bps": 1e9}


def _env(**more: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("GLOO_SOCKET_IFNAME", None)
    env.update(more)
    return env


def ew(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m edgeweave ARGS` as test_cli.ew runs it, with an environment."""
    return subprocess.run([sys.executable, "-m", "edgeweave", *args], capture_output=True, text=True,
                          timeout=timeout, env=env or _env())


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, exactly one non-empty stderr line starting with ``error:`` holding every needle,
    nothing of a traceback or of a C++ log."""
    err = r.stderr
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert r.returncode == 2, (r.returncode, err[-3000:])
    assert "Traceback" not in err and "frame #" not in err and "c10d" not in err, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- input size ---------------------------------------------------------------------------------

@pytest.mark.parametrize("size", ["0", "-5", "100000"])
def test_plan_input_size_out_of_range(size):
    one_line_error(ew("plan", "--model", "cifar_resnet18", "--workers", "2", "--input-size", size),
                   "--input-size must be 1-4096", f"got {size}")


def test_run_input_size_out_of_range_starts_nothing():
    t0 = time.monotonic()
    one_line_error(ew("run", "--model", "cifar_resnet18", "--workers", "1", "--input-size", "100000"),
                   "--input-size must be 1-4096")
    assert time.monotonic() - t0 < 60


def test_input_smaller_than_the_model_needs_says_its_minimum():
    # VGG halves the map five times: 16 pixels leave nothing for the last pooling
    one_line_error(ew("plan", "--model", "vgg11", "--workers", "1", "--input-size", "16"),
                   "--input-size 16 is too small for vgg11", "at least 32")
    one_line_error(ew("run", "--model", "vgg11", "--workers", "1", "--input-size", "16"), "at least 32")


def test_help_states_the_input_size_bound():
    r = ew("run", "--help", timeout=120)
    assert r.returncode == 0 and "1-4096" in " ".join(r.stdout.split())


# ---- cluster files ------------------------------------------------------------------------------

def _cluster_file(tmp_path: Path, devices) -> Path:
    cf = tmp_path / "cluster.json"
    cf.write_text(json.dumps({"devices": devices}))
    return cf


SLOW = pytest.mark.slow  # the same check on another key: in the full run only


@pytest.mark.parametrize("second,needles", [
    ({"name": "pi", **GOOD, "bandwidth_bps": 0}, ["device 'pi'", "'bandwidth_bps'", "> 0", "got 0"]),
    ({"name": "pi", **GOOD, "bandwidth_bps": -1e8}, ["device 'pi'", "'bandwidth_bps'", "> 0"]),
    ({"name": "pi", **GOOD, "a": 0}, ["device 'pi'", "'a'", "> 0"]),
    ({"name": "pi", **GOOD, "a": "fast"}, ["device 'pi'", "'a'", "a string 'fast'"]),
    pytest.param({"name": "pi", **GOOD, "a": True}, ["device 'pi'", "'a'", "a boolean"], marks=SLOW),
    pytest.param({"name": "pi", **GOOD, "b": -0.1}, ["device 'pi'", "'b'", ">= 0"], marks=SLOW),
    pytest.param({"name": "pi", **GOOD, "latency_s": "1ms"}, ["device 'pi'", "'latency_s'"], marks=SLOW),
    pytest.param({"name": "pi", **GOOD, "byte_s": -1e-9}, ["device 'pi'", "'byte_s'", ">= 0"], marks=SLOW),
    pytest.param({"name": "pi", **GOOD, "per_kind": {"conv": [1e-10]}}, ["device 'pi'", "'per_kind' 'conv'", "[a, b]"],
                 marks=SLOW),
    pytest.param({"name": "pi", **GOOD, "per_kind": {"conv": [0, 1e-3]}}, ["device 'pi'", "'per_kind' 'conv' a"],
                 marks=SLOW),
    ({"name": "pi", "bandwidth_bps": 1e8}, ["device 'pi'", "missing key 'a'"]),
    pytest.param({"name": "pi", "a": 1e-10}, ["device 'pi'", "missing key 'bandwidth_bps'"], marks=SLOW),
    (["pi", 1e-10, 1e8], ["device #2", "got a list"]),
    ({"name": "lead", **GOOD}, ["devices #1 and #2 are both named 'lead'"]),
])
def test_plan_refuses_a_bad_cluster_file_naming_file_device_and_key(tmp_path, second, needles):
    cf = _cluster_file(tmp_path, [{"name": "lead", **GOOD}, second])
    one_line_error(ew("plan", "--model", "small_cnn", "--in-channels", "1", "--input-size", "28",
                      "--cluster", str(cf)), f"cluster file {cf}", *needles)


def test_run_refuses_a_bad_cluster_file_before_starting_followers(tmp_path):
    cf = _cluster_file(tmp_path, [{"name": "lead", **GOOD}, {"name": "pi", **GOOD, "bandwidth_bps": 0}])
    t0 = time.monotonic()
    one_line_error(ew("run", "--model", "small_cnn", "--input-size", "28", "--workers", "1", "--cluster", str(cf)),
                   f"cluster file {cf}", "device 'pi'", "'bandwidth_bps'")
    assert time.monotonic() - t0 < 60


def test_a_cluster_file_that_is_not_an_object(tmp_path):
    cf = tmp_path / "c.json"
    cf.write_text("[1, 2]")
    one_line_error(ew("plan", "--model", "small_cnn", "--cluster", str(cf)), f"cluster file {cf}", "'devices'")


def test_worker_refuses_a_bad_profile_before_joining(tmp_path):
    pf = tmp_path / "p.json"
    pf.write_text(json.dumps({"name": "pi", "a": -1}))
    one_line_error(ew("worker", "--leader", f"127.0.0.1:{free_port()}", "--profile", str(pf)),
                   f"profile {pf}", "'a'", "> 0")


# ---- time-outs and addresses --------------------------------------------------------------------

@pytest.mark.parametrize("value", ["-1", "0"])
def test_run_refuses_a_non_positive_timeout(value):
    t0 = time.monotonic()
    one_line_error(ew("run", "--model", "small_cnn", "--input-size", "28", "--workers", "1", "--timeout", value),
                   "--timeout must be a positive number of seconds")
    assert time.monotonic() - t0 < 60


def test_serve_refuses_a_non_positive_timeout():
    one_line_error(ew("serve", "--model", "small_cnn", "--input-size", "28", "--workers", "1", "--timeout", "-1",
                      "--port", str(free_port())), "--timeout must be a positive number of seconds")


@pytest.mark.parametrize("value", ["-1", "0"])
def test_worker_refuses_a_non_positive_connect_timeout(value):
    one_line_error(ew("worker", "--leader", "127.0.0.1:29400", "--connect-timeout", value),
                   "--connect-timeout must be a positive number of seconds")


@pytest.mark.parametrize("leader", ["127.0.0.1:99999", "127.0.0.1:abc", "127.0.0.1:0", "host:99999"])
def test_worker_says_invalid_port(leader):
    line = one_line_error(ew("worker", "--leader", leader, "--connect-timeout", "60"), "invalid port", leader)
    assert "cannot reach" not in line


@pytest.mark.slow
def test_worker_gives_up_within_its_connect_timeout_in_one_line():
    """A leader that is not there: the follower waits its --connect-timeout (not 77-120 s for 60)
    and says so in one line, without the C++ client's stack frames. The process start-up (imports)
    is measured apart with a backend refused once torch is imported, and a bad port is told
    before (under a second on any host that imports torch in a few)."""
    t0 = time.monotonic()
    one_line_error(ew("worker", "--leader", "127.0.0.1:99999", env=_env()), "invalid port")
    told = time.monotonic() - t0
    t0 = time.monotonic()
    one_line_error(ew("worker", "--leader", "127.0.0.1:1", "--backend", "nope", env=_env()), "unknown backend")
    startup = time.monotonic() - t0
    assert told < 0.6 * startup, (told, startup)  # the port is checked before torch is imported
    timeout = 6.0
    t0 = time.monotonic()
    one_line_error(ew("worker", "--leader", f"127.0.0.1:{free_port()}", "--connect-timeout", f"{timeout:g}",
                      env=_env()), "cannot reach the leader", f"within {timeout:g} s")
    waited = time.monotonic() - t0 - startup
    assert timeout - 1.5 < waited < timeout + 3.0, (waited, startup)


def test_connect_store_gives_up_on_a_port_that_answers_but_is_no_store():
    from edgeweave.runtime.rendezvous import connect_store

    srv = socket.create_server(("127.0.0.1", 0))
    held: list = []
    threading.Thread(target=lambda: held.append(srv.accept()), daemon=True).start()
    t0 = time.monotonic()
    try:
        with pytest.raises(EdgeweaveError, match="answers but no store replied within 2 s"):
            connect_store("127.0.0.1", srv.getsockname()[1], 2.0)
        assert time.monotonic() - t0 < 3.5
    finally:
        for c, _ in held:
            c.close()
        srv.close()


# ---- --json PATH --------------------------------------------------------------------------------

def test_json_into_a_missing_folder_is_refused_before_the_work(tmp_path):
    target = tmp_path / "missing" / "dir" / "x.json"
    for args in (["plan", "--model", "small_cnn", "--workers", "1"],
                 ["run", "--model", "small_cnn", "--input-size", "28", "--workers", "1"]):
        t0 = time.monotonic()
        one_line_error(ew(*args, "--json", str(target)), f"folder {target.parent} does not exist")
        assert time.monotonic() - t0 < 60
    assert not (tmp_path / "missing").exists()  # no folder made on the way
    one_line_error(ew("plan", "--model", "small_cnn", "--workers", "1", "--json", str(tmp_path)), "is a folder")


# ---- --workers K and memory ---------------------------------------------------------------------

def test_follower_memory_estimate_says_how_many_fit():
    gb = 1e9
    check_followers_fit(4, model_bytes=43_000_000, available=int(24 * gb))  # fits: no error
    each = follower_bytes(43_000_000)
    fit = int(24 * gb * MEMORY_SHARE // each)
    with pytest.raises(EdgeweaveError, match=f"enough for {fit} followers; give --workers {fit} or less"):
        check_followers_fit(50, model_bytes=43_000_000, available=int(24 * gb))
    with pytest.raises(EdgeweaveError, match="enough for 0 followers"):
        check_followers_fit(1, available=100_000_000)


def _fit(model_bytes: int) -> int:
    avail = mem_available_bytes()
    assert avail, "this test reads /proc/meminfo (Linux)"
    return int(avail * MEMORY_SHARE // follower_bytes(model_bytes))


def test_run_refuses_more_followers_than_memory_holds_before_loading_the_model():
    k = 2 * _fit(0) + 10  # not even idle processes fit
    t0 = time.monotonic()
    line = one_line_error(ew("run", "--model", "small_cnn", "--input-size", "28", "--workers", str(k)),
                          f"--workers {k}", "of memory is available", "enough for")
    assert time.monotonic() - t0 < 60, line


def test_run_counts_the_model_in_each_follower():
    # vgg16's weights (528 MB) counted once per follower: one follower more than fit with this
    # model, which would fit well idle
    from edgeweave.limits import FOLLOWER_MODEL_COPIES

    avail = mem_available_bytes()
    assert avail
    k = int(avail * MEMORY_SHARE // follower_bytes(553_000_000)) + 1
    assert k * follower_bytes(0) < avail * MEMORY_SHARE / 1.5  # idle, they would fit well
    one_line_error(ew("run", "--model", "vgg16", "--input-size", "32", "--workers", str(k)),
                   f"--workers {k}", f"{FOLLOWER_MODEL_COPIES}x the model's")


# ---- the worker log folder ----------------------------------------------------------------------

def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.slow
def test_local_cluster_removes_its_log_folder_and_those_of_dead_leaders(tmp_path, monkeypatch):
    from edgeweave.runtime.leader import LocalCluster

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("EDGEWEAVE_KEEP_WORKER_LOGS", raising=False)
    dead = _dead_pid()
    stale = tmp_path / f"edgeweave-workers-{dead}-abc"
    kept = tmp_path / f"edgeweave-workers-{dead}-kept"
    alive = tmp_path / f"edgeweave-workers-{os.getpid()}-live"
    for d in (stale, kept, alive):
        d.mkdir()
    (kept / "KEPT").touch()
    with LocalCluster(1, timeout_s=60) as cl:
        assert cl.log_dir.parent == tmp_path and cl.log_dir.is_dir()
        assert not stale.exists() and kept.exists() and alive.exists()
    assert not cl.log_dir.exists()
    # a follower that fails to start: the error says why, and the folder goes all the same
    with pytest.raises(Exception, match="exited with code 2"):
        LocalCluster(1, timeout_s=60, extra_args={"worker1": ["--threads", "many"]})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([kept.name, alive.name])


# ---- readable output at 80 columns --------------------------------------------------------------

def _narrow(stderr: str) -> list[str]:
    lines = stderr.splitlines()
    assert all(len(ln) <= 80 for ln in lines), [ln for ln in lines if len(ln) > 80]
    return lines


def test_plan_table_at_80_columns_names_devices_and_says_uncalibrated():
    r = ew("plan", "--model", "cifar_resnet18", "--workers", "2", "--input-size", "32", "--json",
           env=_env(COLUMNS="80"))
    assert r.returncode == 0, r.stderr[-3000:]
    lines = _narrow(r.stderr)
    header = next(ln for ln in lines if " kind " in ln)
    assert header.split()[3:6] == ["leader", "worker1", "worker2"]
    text = " ".join(r.stderr.split())
    assert "rows a-b: the device computes output rows [a, b) of the stage's feature map" in text
    assert "uncalibrated: default profiles" in text and "(uncalibrated)" in text
    assert "0:0:" not in r.stderr  # no device indices in the rows
    res = json.loads(r.stdout)
    assert res["profiles"] == "default" and res["devices"] == ["leader", "worker1", "worker2"]


def test_plan_with_a_cluster_file_is_not_called_uncalibrated(tmp_path):
    cf = _cluster_file(tmp_path, [{"name": "gateway", **GOOD}, {"name": "board-a", "a": 2e-10, "bandwidth_bps": 1e8}])
    r = ew("plan", "--model", "cifar_resnet18", "--cluster", str(cf), "--input-size", "32", "--json",
           env=_env(COLUMNS="80"))
    assert r.returncode == 0, r.stderr[-3000:]
    lines = _narrow(r.stderr)
    assert "uncalibrated" not in r.stderr and json.loads(r.stdout)["profiles"] == "given"
    assert any(ln.split()[3:5] == ["gateway", "board-a"] for ln in lines if " kind " in ln)


def test_plan_table_with_many_devices_still_fits_80_columns():
    r = ew("plan", "--model", "cifar_resnet18", "--workers", "7", "--input-size", "32", env=_env(COLUMNS="80"))
    assert r.returncode == 0, r.stderr[-3000:]
    _narrow(r.stderr)
    assert "rows by device" in r.stderr and "worker7:" in r.stderr


@pytest.mark.slow
def test_run_table_at_80_columns(tmp_path):
    r = ew("run", "--model", "cifar_resnet18", "--input-size", "32", "--workers", "1", "--repeat", "1", "--check",
           "--json", env=_env(COLUMNS="80", TMPDIR=str(tmp_path)))
    assert r.returncode == 0, r.stderr[-3000:]
    lines = _narrow(r.stderr)
    header = next(ln for ln in lines if " kind " in ln)
    assert header.split()[3:] == ["leader", "worker1", "pred", "ms", "meas", "ms"]
    text = " ".join(r.stderr.split())
    assert "rows a-b:" in text and "uncalibrated" in text and "(default profiles)" in text
    assert json.loads(r.stdout)["profiles"] == "default"
    assert not list(tmp_path.glob("edgeweave-workers-*"))  # the followers' log folder went with the run
