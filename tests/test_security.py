"""Only the cluster's devices join, command or answer (docs/security.md).

The key and the sealed control values are checked in-process; membership through a real store;
then real follower processes on loopback: followers with no key, a wrong key or a name not in the
cluster file are refused and the listed ones run exact inferences; forged and replayed control
values change nothing; ``serve --token-file`` answers 401 without the token.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import torch.distributed as dist

from edgeweave.checkpoint import save_checkpoint
from edgeweave.errors import EdgeweaveError
from edgeweave.profiling.profile import Cluster, DeviceProfile
from edgeweave.runtime import auth
from edgeweave.runtime import rendezvous as rv
from edgeweave.runtime.leader import LocalCluster, RemoteCluster
from edgeweave.runtime.run import load_for_run
from _runtime_helpers import check
from _serving_helpers import free_port, scrape, serve_command

EW = [sys.executable, "-m", "edgeweave"]
KEY = bytes(range(32))


def _env(**more: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop(auth.KEY_ENV, None)
    env.pop("GLOO_SOCKET_IFNAME", None)
    env.update(more)
    return env


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("[W")]


# ---- the key ----------------------------------------------------------------------------------

def test_keygen_writes_a_private_random_key_and_keeps_an_existing_one(tmp_path: Path):
    path = tmp_path / "cluster.key"
    out = subprocess.run(EW + ["keygen", str(path), "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = path.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}\n", first)
    assert json.loads(out.stdout)["fingerprint"] == auth.fingerprint(auth.load_key(path))
    out = subprocess.run(EW + ["keygen", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "exists" in out.stderr and path.read_text() == first
    path.chmod(0o644)
    out = subprocess.run(EW + ["keygen", str(path), "--force"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and path.read_text() != first  # rotated
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_key_file_others_can_read_or_without_a_key_is_refused(tmp_path: Path):
    path = auth.write_key(tmp_path / "k", KEY)
    assert auth.load_key(path) == KEY
    path.chmod(0o640)
    with pytest.raises(EdgeweaveError, match="chmod 600"):
        auth.load_key(path)
    out = subprocess.run(EW + ["worker", "--leader", "127.0.0.1:1", "--key", str(path)], capture_output=True,
                         text=True, timeout=120, env=_env())
    lines = _error_lines(out.stderr)
    assert out.returncode == 2 and len(lines) == 1 and "open to other users" in lines[0], out.stderr
    bad = tmp_path / "bad"
    bad.write_text("not a key\n")
    bad.chmod(0o600)
    with pytest.raises(EdgeweaveError, match="holds no cluster key"):
        auth.load_key(bad)


def test_without_a_key_nothing_listens_or_connects_beyond_loopback(tmp_path: Path):
    cf = tmp_path / "cluster.json"
    cf.write_text(json.dumps({"devices": [{"name": "gl"}, {"name": "a"}]}))
    port = free_port()
    cases = [
        (["run", "--model", "small_cnn", "--input-size", "28", "--cluster", str(cf), "--listen", f"0.0.0.0:{port}"],
         "without a cluster key the leader listens on loopback only"),
        (["serve", "--model", "small_cnn", "--cluster", str(cf), "--listen", f"0.0.0.0:{port}", "--port",
          str(free_port())], "without a cluster key the leader listens on loopback only"),
        (["worker", "--leader", f"192.0.2.1:{port}"], "without a cluster key a follower joins a leader on this "
                                                     "machine only"),
    ]
    for args, needle in cases:
        t0 = time.monotonic()
        out = subprocess.run(EW + args, capture_output=True, text=True, timeout=120, env=_env())
        lines = _error_lines(out.stderr)
        assert out.returncode == 2 and len(lines) == 1 and needle in lines[0], (args, out.stderr[-2000:])
        assert time.monotonic() - t0 < 60
    assert auth.is_loopback("127.0.0.1") and auth.is_loopback("::1") and auth.is_loopback("localhost")
    assert not auth.is_loopback("0.0.0.0") and not auth.is_loopback("192.0.2.1")


# ---- sealed control values --------------------------------------------------------------------

def test_a_sealed_value_opens_only_where_when_and_with_the_key_it_was_sealed_with():
    leader = auth.Control(KEY, writer="leader", session="s1")
    raw = leader.seal("ew/g0/cmd/3", {"op": "infer", "plan_id": 0})
    reader = auth.Control(KEY, session="s1")
    assert reader.open("ew/g0/cmd/3", raw, writer="leader", ordered=True) == {"op": "infer", "plan_id": 0}
    mac, body = raw.split("\n", 1)
    cases = {
        "another key": (auth.Control(bytes(32), session="s1"), "ew/g0/cmd/3", raw),
        "no key (an unsealed value)": (reader, "ew/g0/cmd/3", "-\n" + body),
        "another name": (reader, "ew/g0/cmd/4", raw),
        "another generation": (reader, "ew/g1/cmd/3", raw),
        "another session": (auth.Control(KEY, session="s2"), "ew/g0/cmd/3", raw),
        "a changed payload": (reader, "ew/g0/cmd/3", mac + "\n" + body.replace('"infer"', '"end"')),
        "plain JSON": (reader, "ew/g0/cmd/3", json.dumps({"op": "end"})),
    }
    for why, (ctl, name, value) in cases.items():
        with pytest.raises(auth.Forged):
            ctl.open(name, value, writer="leader")
            pytest.fail(why)
    with pytest.raises(auth.Forged, match="written by"):
        reader.open("ew/g0/cmd/3", raw, writer="t1")
    # a reader that reads a stream in order refuses what is older than what it read
    older = leader.seal("ew/g0/cmd/4", {"op": "ping"})
    newer = leader.seal("ew/g0/cmd/5", {"op": "ping"})
    fresh = auth.Control(KEY, session="s1")
    assert fresh.open("ew/g0/cmd/5", newer, ordered=True) == {"op": "ping"}
    with pytest.raises(auth.Forged, match="replayed"):
        fresh.open("ew/g0/cmd/4", older, ordered=True)
    with pytest.raises(auth.Forged, match="replayed"):
        fresh.open("ew/g0/cmd/5", newer, ordered=True)


def test_a_forgery_read_again_and_again_is_logged_and_counted_once():
    said: list[str] = []
    ctl = auth.Control(KEY, session="s", log=said.append)
    for _ in range(5):
        assert ctl.check("ew/gen/1", json.dumps({"shutdown": True})) is None
    assert ctl.forged == 1 and len(said) == 1 and "ew/gen/1" in said[0]
    assert ctl.check("ew/gen/2", json.dumps({"shutdown": True})) is None and ctl.forged == 2


def test_the_tags_that_stand_for_a_model_reveal_nothing_without_the_key():
    a, b = auth.Control(KEY), auth.Control(bytes(32))
    h = "ab" * 32
    assert a.tag("model", h) == auth.Control(KEY).tag("model", h) != b.tag("model", h)
    assert h not in a.tag("model", h) and a.tag("model", h) != a.tag("plan", h)
    # challenge and answer differ in every field they cover
    base = ("s", 3, "w1", "n" * 32, "m" * 32)
    macs = {auth.challenge_mac(KEY, *base), auth.response_mac(KEY, *base)}
    for i, v in enumerate(("t", 4, "w2", "x" * 32, "y" * 32)):
        args = list(base)
        args[i] = v
        macs.add(auth.challenge_mac(KEY, *args))
    assert len(macs) == 7


def test_a_file_tag_read_in_pieces_equals_the_tag_of_its_bytes(tmp_path: Path):
    data = os.urandom(5 << 20) + b"tail"  # more than one piece of tag_file's reads
    p = tmp_path / "model.bin"
    p.write_bytes(data)
    for ctl in (auth.Control(KEY), auth.Control(None)):
        with p.open("rb") as f:
            f.read(100)  # from the start, wherever the file stood
            assert ctl.tag_file("model-bytes", f) == ctl.tag("model-bytes", data)
        with p.open("rb") as f:
            assert ctl.tag_file("model-bytes", f) != ctl.tag("model-bytes", data[:-1])


# ---- membership through a real store (threads play the followers) -----------------------------

def _client(port: int) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", port, None, False, timedelta(seconds=20), wait_for_workers=False)


def test_the_gate_admits_only_followers_that_prove_the_key_and_are_listed(caplog):
    store = rv.host_store("127.0.0.1", 0, 20)
    leader = auth.Control(KEY, writer="leader", session=auth.new_nonce())
    gate = rv.Gate(store, leader, allowed={"a", "b"})
    outcome: dict[str, object] = {}

    def follower(label: str, name: str, key: bytes | None) -> None:
        try:
            outcome[label] = rv.join(_client(store.port), auth.Control(key), name, {"name": name, "profile": {}})
        except EdgeweaveError as e:
            outcome[label] = str(e)

    cases = [("good", "a", KEY), ("wrong key", "b", bytes(32)), ("no key", "b", None), ("unlisted", "c", KEY)]
    threads = [threading.Thread(target=follower, args=c) for c in cases]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    with caplog.at_level(logging.WARNING, logger="edgeweave.security"):
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
            gate.poll()
            time.sleep(0.02)
        gate.poll()
    assert isinstance(outcome["good"], int) and list(gate.admitted) == [outcome["good"]]
    assert gate.admitted[outcome["good"]]["name"] == "a"
    assert "does not verify with this device's key" in str(outcome["wrong key"])
    assert "requires the cluster key" in str(outcome["no key"])
    assert "not a device of the cluster file" in str(outcome["unlisted"])
    reasons = sorted(r.reason for r in gate.refused)
    assert gate.refusals == 3 and len(reasons) == 3
    assert any("no key" in r for r in reasons) and any("does not verify" in r for r in reasons)
    logged = [r.getMessage() for r in caplog.records if "refused follower" in r.getMessage()]
    assert len(logged) == 3 and all("claims host" in m for m in logged)
    # an unkeyed leader admits an unkeyed follower, and a keyed follower will not join it
    open_gate = rv.Gate(store, auth.Control(None, writer="leader", session="s"))
    open_gate._seen = int(store.add(rv.ROOT + "tickets", 0))
    for label, key in (("open", None), ("keyed", KEY)):
        t = threading.Thread(target=follower, args=(label, "d", key))
        t.start()
        while t.is_alive():
            open_gate.poll()
            time.sleep(0.02)
    open_gate.poll()
    assert isinstance(outcome["open"], int) and outcome["open"] in open_gate.admitted
    assert "runs without a cluster key" in str(outcome["keyed"])


# ---- real followers ---------------------------------------------------------------------------

def _worker(port: int, name: str, key_file: Path | None) -> subprocess.Popen:
    args = EW + ["worker", "--leader", f"127.0.0.1:{port}", "--name", name, "--connect-timeout", "120"]
    if key_file is not None:
        args += ["--key", str(key_file)]
    return subprocess.Popen(args, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_followers_without_the_key_or_not_listed_are_refused_and_the_listed_ones_run_exactly(tmp_path, caplog):
    key_file = auth.write_key(tmp_path / "cluster.key", KEY)
    wrong = auth.write_key(tmp_path / "wrong.key")
    cluster = Cluster([DeviceProfile(name="gl"), DeviceProfile(name="a"), DeviceProfile(name="b")])
    port = free_port()
    held: dict[str, object] = {}

    def lead() -> None:
        try:
            held["cl"] = RemoteCluster(cluster, f"127.0.0.1:{port}", key=KEY, timeout_s=30, start_timeout_s=300)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            held["error"] = e

    procs: list[subprocess.Popen] = []
    caplog.set_level(logging.WARNING, logger="edgeweave.security")
    leader = threading.Thread(target=lead)
    leader.start()
    try:
        # the rogues come first: one under a listed name with a wrong key, one with no key,
        # one with the right key under a name the cluster file does not list
        rogues = {"wrong key": _worker(port, "b", wrong), "no key": _worker(port, "a", None),
                  "unlisted": _worker(port, "intruder", key_file)}
        procs += rogues.values()
        errs = {}
        for why, p in rogues.items():
            _, errs[why] = p.communicate(timeout=200)
            assert p.returncode == 2, (why, errs[why][-2000:])
            assert "admitted" not in errs[why]  # never given a rank: no generation, no model bytes
        assert "does not verify with this device's key" in errs["wrong key"]
        assert "requires the cluster key" in errs["no key"]
        assert "not a device of the cluster file" in errs["unlisted"]
        procs += [_worker(port, "b", key_file), _worker(port, "a", key_file)]
        leader.join(300)
        assert "error" not in held, held.get("error")
        with held["cl"] as cl:
            assert cl.names == ["gl", "a", "b"]
            sec = cl.security()
            assert sec["keyed"] and sec["members_refused"] == 3
            refused = {r["name"]: r for r in sec["refusals"]}
            assert set(refused) == {"a", "b", "intruder"}
            assert "wrong key" in refused["b"]["reason"] or "does not verify" in refused["b"]["reason"]
            assert "no key" in refused["a"]["reason"] and "cluster file" in refused["intruder"]["reason"]
            assert {f.ticket for f in cl.followers}.isdisjoint(r["ticket"] for r in sec["refusals"])
            logged = [r.getMessage() for r in caplog.records if "refused follower" in r.getMessage()]
            assert len(logged) == 3 and all("pid" in m for m in logged)
            check(cl, "small_cnn", 28, 2)  # the listed followers: an exact inference
        for p in procs[3:]:
            assert p.wait(timeout=30) == 0
    finally:
        leader.join(5)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _forged(body: object) -> str:
    """What a rogue that knows the format but not the key writes."""
    return "0" * 64 + "\n" + json.dumps(["leader", 10**6, body])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_forged_and_replayed_control_values_change_nothing(caplog):
    caplog.set_level(logging.WARNING, logger="edgeweave.security")
    with LocalCluster(2, timeout_s=20) as cl:
        assert cl.ctl.keyed and cl.key_file is not None  # a local cluster is keyed too
        check(cl, "small_cnn", 28, 2)
        rogue = _client(cl.port)
        g = cl.gen
        # a forged command, written where the leader's next one goes
        rogue.set(f"ew/g{g}//cmd/{cl.seq}", _forged({"op": "end"}))  # PrefixStore adds a "/"
        time.sleep(1.0)
        check(cl, "small_cnn", 28, 2)
        # a real command copied to the next command's place (a replay)
        s = cl._command({"op": "ping"})
        old = rogue.get(f"ew/g{g}//cmd/{s}")
        cl._await_acks(s, "answer a ping")
        rogue.set(f"ew/g{g}//cmd/{cl.seq}", old)
        time.sleep(1.0)
        check(cl, "small_cnn", 28, 2)
        # a forged failure report and abort: the leader's health probe ignores them (in the
        # generation now current: on a loaded host a slow check may have regrouped)
        g = cl.gen
        rogue.set(f"ew/g{g}//err/1", "worker1 is broken")
        rogue.set(f"ew/g{g}//abort", "stop")
        assert cl._probe() is None
        assert cl.security()["control_forged"] == 1
        check(cl, "small_cnn", 28, 2)
        # a forged shutdown where the next generation goes, then the current generation replayed
        # there; the followers wait between two generations (as after a failure) and read them first
        rogue.set(f"ew/gen/{g + 1}", json.dumps({"shutdown": True}))
        cl._command({"op": "end"})
        time.sleep(1.0)
        cl.regroup()
        assert cl.gen == g + 1 and cl.names == ["leader", "worker1", "worker2"]
        check(cl, "small_cnn", 28, 2)
        rogue.set(f"ew/gen/{g + 2}", rogue.get(f"ew/gen/{g}"))
        cl._command({"op": "end"})
        time.sleep(1.0)
        cl.regroup()
        assert cl.gen == g + 2 and cl.names == ["leader", "worker1", "worker2"]
        check(cl, "small_cnn", 28, 2)
        assert all(f.process.poll() is None for f in cl.followers)  # nobody left
        logs = {f.name: (cl.log_dir / f"{f.name}.log").read_text() for f in cl.followers}
        for name, log in logs.items():
            ignored = re.findall(r"ignored the control value at (\S+):", log)
            assert f"ew/g{g}/cmd/{s + 1}" in ignored, (name, log[-3000:])  # the replay
            assert f"ew/gen/{g + 1}" in ignored and f"ew/gen/{g + 2}" in ignored, (name, log[-3000:])
            assert len([i for i in ignored if i.startswith(f"ew/g{g}/cmd/")]) == 2, (name, ignored)
        logged = [r.getMessage() for r in caplog.records]
        assert any(f"ew/g{g}/err/1" in m for m in logged)
        pids = cl.pids
    assert all(not Path(f"/proc/{p}").exists() or "Z" in Path(f"/proc/{p}/stat").read_text().split()[2]
               for p in pids)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_model_hash_never_reaches_the_store(tmp_path: Path):
    """What anyone who reaches the store could read: no value holds the weights' hash, not
    even the registration of a follower that loaded the weights itself."""
    model, spec = load_for_run("small_cnn", 28)
    ckpt = save_checkpoint(tmp_path / "m.safetensors", model, spec)
    with LocalCluster(1, timeout_s=20, extra_args={"worker1": ["--model", str(ckpt)]}) as cl:
        sealed: list[str] = []
        seal = cl.ctl.seal
        cl.ctl.seal = lambda name, obj: sealed.append(seal(name, obj)) or sealed[-1]  # type: ignore[method-assign]
        cl.load_model(model, spec)
        cl._test_model_key, cl._test_model = "small_cnn", model  # check() runs these weights
        check(cl, "small_cnn", 28, 1)
        h = cl.model_hash
        seen = sealed + [cl.store.get(k).decode() for k in ("ew/worker/1", "ew/challenge/1", "ew/proof/1", "ew/gen/0")]
        assert len(sealed) >= 3  # the generation, the model and plan commands, the inference
        assert not [v for v in seen if h in v or h[:12] in v]
        assert cl.followers[0].info["model_tag"] == cl.ctl.tag("model", h) != h  # pinned: nothing shipped


# ---- the HTTP API -----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(300)
def test_serve_with_a_token_file_answers_401_without_it_and_counts_them(tmp_path: Path):
    token = "t0ken-" + "x" * 26
    tf = tmp_path / "token"
    tf.write_text(token + "\n")
    tf.chmod(0o600)
    stats_file = tmp_path / "stats.json"
    good = {"Authorization": f"Bearer {token}"}
    with serve_command(["--model", "small_cnn", "--input-size", "28", "--workers", "1", "--token-file", str(tf),
                        "--json", str(stats_file)]) as (url, end):
        assert httpx.get(f"{url}/healthz").status_code == 200  # open: a load balancer's probe
        assert "/v1/infer" in httpx.get(f"{url}/docs").text  # open: a static page, nothing of the model
        refused = 0
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}, {"Authorization": "Basic x"}):
            for method, path in (("GET", "/v1/stats"), ("GET", "/v1/model"), ("GET", "/metrics"),
                                 ("GET", "/openapi.json"), ("POST", "/v1/infer")):
                r = httpx.request(method, f"{url}{path}", headers={**headers, "content-type": "image/png"},
                                  content=b"x" if method == "POST" else None)
                assert r.status_code == 401, (headers, path, r.status_code)
                assert "bearer token" in r.json()["detail"] and r.headers["www-authenticate"] == "Bearer"
                refused += 1
        with httpx.Client(base_url=url, headers=good) as client:
            s = client.get("/v1/stats").json()
            assert s["unauthorized"] == refused and s["cluster_keyed"] and s["members_refused"] == 0
            assert scrape(client)["edgeweave_unauthorized_total"][()] == refused
            r = client.post("/v1/infer", content=b"\0" * (3 * 28 * 28 * 4),
                            headers={"content-type": "application/octet-stream"})
            assert r.status_code == 200, r.text
    assert end["returncode"] == 0, end["stderr"][-3000:]
    assert f"{refused} unauthorized" in end["stderr"]
    assert json.loads(stats_file.read_text())["unauthorized"] == refused


def test_serve_refuses_a_token_file_without_a_token_and_half_a_tls_pair(tmp_path: Path):
    short = tmp_path / "short"
    short.write_text("abc\n")
    for extra, needle in ((["--token-file", str(short)], "no usable token"),
                          (["--ssl-certfile", str(short)], "--ssl-keyfile")):
        out = subprocess.run(EW + ["serve", "--model", "small_cnn", "--workers", "1", "--port", str(free_port()),
                                   *extra], capture_output=True, text=True, timeout=120, env=_env())
        lines = _error_lines(out.stderr)
        assert out.returncode == 2 and len(lines) == 1 and needle in lines[0], out.stderr[-2000:]
