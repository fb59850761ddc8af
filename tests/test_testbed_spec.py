"""Testbed spec parsing, rate/size parsing and command construction: pure, no root needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from edgeweave.errors import EdgeweaveError
from edgeweave.testbed import Testbed, load_spec, parse_rate, parse_size, spec_from_dict
from edgeweave.testbed import cgroups
from edgeweave.testbed import commands as C
from edgeweave.testbed.spec import format_rate


@pytest.mark.parametrize(
    "text,bps",
    [("100mbit", 1e8), ("1gbit", 1e9), ("1.5mbit", 1.5e6), ("500kbit", 5e5), ("50 mbit", 5e7), ("10mbps", 8e7), (2_000_000, 2e6), ("1e6bit", 1e6), ("64kibit", 65536.0)],
)
def test_parse_rate(text, bps):
    assert parse_rate(text) == pytest.approx(bps)


@pytest.mark.parametrize("bad", ["fast", "-5mbit", "0mbit", "100mb/s", "", True, None, [1], "1bit", float("inf")])
def test_parse_rate_rejects(bad):
    with pytest.raises(EdgeweaveError) as e:
        parse_rate(bad)
    assert "\n" not in str(e.value) and "bandwidth" in str(e.value)


@pytest.mark.parametrize("text,n", [("1g", 2**30), ("512m", 512 * 2**20), ("1.5g", int(1.5 * 2**30)), (2**30, 2**30), ("64MiB", 64 * 2**20)])
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("bad", ["1x", "1k", "lots", -5, 1.5, False])
def test_parse_size_rejects(bad):
    with pytest.raises(EdgeweaveError):
        parse_size(bad)


def test_format_rate_round_trips():
    for r in ("100mbit", "1gbit", "500kbit"):
        assert format_rate(parse_rate(r)) == r
    assert format_rate(None) == "-"


GOOD = {"devices": [{"name": "leader", "cpu": 0.25, "bandwidth": "1000mbit"}, {"name": "w1", "cpu": 0.5, "memory": "1g", "bandwidth": "100mbit"}, {"name": "w2"}]}


def test_spec_good():
    s = spec_from_dict(GOOD)
    assert [d.name for d in s.devices] == ["leader", "w1", "w2"]
    assert s.leader.name == "leader"
    assert s.device("w1").memory_bytes == 2**30 and s.device("w1").bandwidth_bps == 1e8
    assert s.device("w2").cpu is None and s.device("w2").bandwidth_bps is None
    assert s.prefix == "ew-" and s.subnet == "10.77.0.0/24"
    assert [s.address(n) for n in ("leader", "w1", "w2")] == ["10.77.0.1", "10.77.0.2", "10.77.0.3"]
    assert s.bridge_address() == "10.77.0.254"
    # a bare list means the device list
    assert spec_from_dict(GOOD["devices"]) == s


BAD = [
    ({}, "non-empty list under 'devices'"),
    ({"devices": []}, "non-empty list"),
    ({"devices": [{"name": "a"}, {"name": "a"}]}, "unique"),
    ({"devices": [{"name": "averyverylongname"}]}, "longer than"),
    ({"devices": [{"name": "bad name"}]}, "'name'"),
    ({"devices": [{"cpu": 1}]}, "'name'"),
    ({"devices": [{"name": "a", "cpu": 0}]}, "'cpu'"),
    ({"devices": [{"name": "a", "cpu": -1}]}, "'cpu'"),
    ({"devices": [{"name": "a", "cpu": "half"}]}, "'cpu'"),
    ({"devices": [{"name": "a", "cpu": True}]}, "'cpu'"),
    ({"devices": [{"name": "a", "bandwidth": "fast"}]}, "bandwidth"),
    ({"devices": [{"name": "a", "memory": "1x"}]}, "memory"),
    ({"devices": [{"name": "a", "gpu": 1}]}, "unknown keys"),
    ({"devices": ["a"]}, "expected a table"),
    ({"devices": [{"name": "a"}], "subnet": "8.8.8.0/24"}, "private"),
    ({"devices": [{"name": "a"}], "subnet": "nonsense"}, "'subnet'"),
    ({"devices": [{"name": "a"}, {"name": "b"}], "subnet": "10.77.0.0/30"}, "too small"),
    ({"devices": [{"name": "a"}], "prefix": "Edge"}, "'prefix'"),
    ({"devices": [{"name": "a"}], "colour": "red"}, "unknown keys"),
    ("leader", "expected an object"),
]


@pytest.mark.parametrize("data,msg", BAD)
def test_spec_bad_is_one_line(data, msg):
    with pytest.raises(EdgeweaveError) as e:
        spec_from_dict(data)
    text = str(e.value)
    assert msg in text and "\n" not in text


def test_load_spec_json_and_toml(tmp_path):
    j = tmp_path / "c.json"
    j.write_text(json.dumps(GOOD))
    t = tmp_path / "c.toml"
    t.write_text('prefix = "ewx-"\n[[devices]]\nname = "leader"\ncpu = 0.25\n[[devices]]\nname = "w1"\nbandwidth = "50mbit"\nmemory = "256m"\n')
    assert load_spec(j) == spec_from_dict(GOOD)
    s = load_spec(t)
    assert s.prefix == "ewx-" and s.device("w1").bandwidth_bps == 5e7 and s.device("w1").memory_bytes == 256 * 2**20
    bad = tmp_path / "b.json"
    bad.write_text("{nope")
    with pytest.raises(EdgeweaveError, match="not valid JSON"):
        load_spec(bad)
    with pytest.raises(EdgeweaveError, match="not found"):
        load_spec(tmp_path / "missing.json")


def test_cli_bad_spec_one_line_exit_2(tmp_path):
    bad = tmp_path / "b.json"
    bad.write_text(json.dumps({"devices": [{"name": "a", "cpu": "lots"}]}))
    r = subprocess.run([sys.executable, "-m", "edgeweave", "testbed", "up", "--spec", str(bad)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and "'cpu'" in lines[-1]
    assert "Traceback" not in r.stderr


# ---------------------------------------------------------------- command construction

def test_names_and_net_commands():
    s = spec_from_dict({"prefix": "ewt-", "subnet": "10.77.9.0/24", "devices": [{"name": "a", "bandwidth": "50mbit"}, {"name": "b"}]})
    assert (C.ns_name(s, "a"), C.host_if(s, "a"), C.ns_if(s, "a"), C.bridge_name(s)) == ("ewt-a", "ewt-a-h", "ewt-a-n", "ewt-br")
    cmds = C.device_net_cmds(s, s.device("a"))
    assert ["ip", "netns", "add", "ewt-a"] in cmds
    assert ["ip", "link", "add", "ewt-a-h", "type", "veth", "peer", "name", "ewt-a-n", "netns", "ewt-a"] in cmds
    assert ["ip", "-n", "ewt-a", "addr", "add", "10.77.9.1/24", "dev", "ewt-a-n"] in cmds
    tbf = [c for c in cmds if c[0] == "tc"]
    # both ends of the veth are shaped: host side and namespace side
    assert tbf == [C.tbf_cmd("ewt-a-h", 5e7), C.tbf_cmd("ewt-a-n", 5e7, netns="ewt-a")]
    assert tbf[1][:3] == ["tc", "-n", "ewt-a"] and "50000000bit" in tbf[1]
    assert not [c for c in C.device_net_cmds(s, s.device("b")) if c[0] == "tc"]  # unshaped
    assert C.bridge_cmds(s)[1] == ["ip", "addr", "add", "10.77.9.254/24", "dev", "ewt-br"]
    assert all(len(n) <= 15 for n in (C.host_if(s, "a"), C.ns_if(s, "a")))


def test_tbf_command():
    cmd = C.tbf_cmd("ew-x-h", 1e8)
    assert cmd[:7] == ["tc", "qdisc", "replace", "dev", "ew-x-h", "root", "tbf"]
    assert cmd[cmd.index("rate") + 1] == "100000000bit"
    assert int(cmd[cmd.index("burst") + 1]) >= 32 * 1024
    assert C.tbf_cmd("ew-x-h", None) == ["tc", "qdisc", "del", "dev", "ew-x-h", "root"]
    assert C.tbf_burst_bytes(1e9) == 125000  # 1 ms at 1 Gbit/s


def test_hosts_file_names_every_device():
    s = spec_from_dict({"devices": [{"name": "leader"}, {"name": "w1"}]})
    text = C.hosts_file(s, "w1", "myhost")
    assert "10.77.0.1\tleader ew-leader\n" in text
    assert "10.77.0.2\tw1 ew-w1 myhost\n" in text  # own hostname resolves to own address
    assert "nameserver 127.0.0.1" in C.RESOLV_CONF


def test_exec_argv_joins_cgroups_before_netns(tmp_path):
    argv = C.exec_argv(["python", "-c", "pass"], netns="ew-a", cgroup_procs=["/cg/cpu/ew-a/cgroup.procs", "/cg/memory/ew-a/cgroup.procs"])
    assert argv[:2] == ["/bin/sh", "-c"]
    assert argv[3:7] == ["ew-exec", "2", "/cg/cpu/ew-a/cgroup.procs", "/cg/memory/ew-a/cgroup.procs"]
    assert argv[7:] == ["ip", "netns", "exec", "ew-a", "python", "-c", "pass"]
    assert C.exec_argv(["x"], netns=None) == ["x"]
    # the wrapper really writes its own pid (the pid that then execs the command) to each file
    f1, f2 = tmp_path / "p1", tmp_path / "p2"
    f1.touch()
    f2.touch()
    r = subprocess.run(C.exec_argv(["sh", "-c", "echo $$"], netns=None, cgroup_procs=[str(f1), str(f2)]), capture_output=True, text=True)
    assert r.returncode == 0
    assert f1.read_text().strip() == f2.read_text().strip() == r.stdout.strip()
    # a group it cannot join stops the command instead of running it uncapped
    r = subprocess.run(C.exec_argv(["sh", "-c", "echo ran"], netns=None, cgroup_procs=[str(tmp_path / "no" / "such")]), capture_output=True, text=True)
    assert r.returncode == 126 and "ran" not in r.stdout


def test_worker_argv():
    assert C.worker_argv("py", "10.77.0.1", 29500, "w1") == ["py", "-m", "edgeweave", "worker", "--leader", "10.77.0.1:29500", "--name", "w1"]


def test_quota_and_cgroup_path():
    assert cgroups.quota_for(0.25) == (10_000, 2_500)
    assert cgroups.quota_for(2.0) == (10_000, 20_000)
    assert cgroups.quota_for(None) == (10_000, -1)
    period, quota = cgroups.quota_for(0.05)  # below the kernel's 1 ms minimum quota
    assert quota == 1_000 and quota / period == pytest.approx(0.05)
    text = "4:memory:/process_api/abc\n2:cpuacct:/\n1:cpu,cpuacct:/grp\n0::/\n"
    assert cgroups.own_cgroup_path("memory", text) == "/process_api/abc"
    assert cgroups.own_cgroup_path("cpu", text) == "/grp"
    assert cgroups.own_cgroup_path("pids", text) == "/"


def test_loopback_fallback_says_not_emulated():
    tb = Testbed.up({"devices": [{"name": "leader", "cpu": 0.25}, {"name": "w1", "cpu": 2, "bandwidth": "10mbit"}]}, emulate=False)
    try:
        assert tb.emulated is False and "NOT emulated" in tb.reason
        assert tb.address("w1") == "127.0.0.1" and tb.ifname("w1") == "lo"
        p = tb.exec("w1", [sys.executable, "-c", "import os; print(os.environ['OMP_NUM_THREADS'], os.environ['EDGEWEAVE_DEVICE'], os.environ['GLOO_SOCKET_IFNAME'])"], stdout=subprocess.PIPE, text=True)
        assert p.communicate(timeout=30)[0].split() == ["2", "w1", "lo"]
        tb.set_cpu("leader", 0.5)  # recorded, not enforced
        st = tb.status()
        assert st["emulated"] is False and st["devices"][0]["cpu"] == 0.5
        with pytest.raises(EdgeweaveError):
            tb.exec("nope", ["true"])
    finally:
        tb.down()


@pytest.mark.skipif(os.geteuid() == 0, reason="checks the message a non-root user gets")
def test_forced_emulation_without_root_fails_clearly():
    with pytest.raises(EdgeweaveError, match="not root"):
        Testbed.up({"devices": [{"name": "a"}]}, emulate=True)


def test_nominal_cluster_from_spec():
    from edgeweave.profiling.profile import DeviceProfile

    tb = Testbed.up({"devices": [{"name": "leader", "cpu": 0.25, "bandwidth": "1gbit"}, {"name": "w1", "cpu": 0.5, "bandwidth": "100mbit"}, {"name": "w2"}]}, emulate=False)
    base = DeviceProfile(name="host", a=1e-11, b=1e-4, per_kind={"conv": [1e-11, 1e-4], "linear": [4e-11, 0.0]},
                         latency_s=1e-4)
    c = tb.cluster(base)
    assert [d.name for d in c.devices] == ["leader", "w1", "w2"]
    lead, w1, w2 = c.devices
    assert lead.a == pytest.approx(4e-11) and w1.per_kind["conv"] == pytest.approx([2e-11, 2e-4]) and w2.a == pytest.approx(1e-11)
    assert (lead.bandwidth_bps, w1.bandwidth_bps, w2.bandwidth_bps) == (1e9, 1e8, 1e10)
    assert w1.compute_s(1e9) == pytest.approx(2 * base.compute_s(1e9))
    assert (lead.latency_s, w1.latency_s, w2.latency_s) == pytest.approx((4e-4, 2e-4, 1e-4))
    tb.set_cpu("w1", 0.25)  # a live change shows in the next description
    assert tb.cluster(base).devices[1].a == pytest.approx(4e-11)
