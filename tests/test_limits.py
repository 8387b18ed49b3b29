"""Every field hypatiad keeps from a request has a size limit (hypatia/limits.py): requests built
by hand against a real daemon, over its ipc socket and over CURVE TCP. A field over its limit is
refused with BAD_REQUEST naming the field and the limit, nothing of it is kept, and the daemon
keeps serving; free text is cut instead."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import torch
import zmq

from conftest import daemon_of_its_own_home, daemon_stats
from graphs import canonical
from hypatia.canonical import workload_key
from hypatia.client import capture as cap
from hypatia.config import Config, load, read_daemon_pid
from hypatia.keys import load_client_keys
from hypatia.limits import MAX_HOST_CHARS, MAX_REASON_CHARS
from hypatia.planner import environment
from hypatia.protocol import PROTOCOL_VERSION, ErrorCode, RemoteError, Reply, decode_reply, encode_request
from test_curve import listener, remote_host  # noqa: F401  (a fixture)

MiB = 1 << 20


class Peer:
    """A DEALER socket sending requests built by hand (CURVE when ``config`` names a remote daemon)."""

    def __init__(self, config: Config):
        self.config = config
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if config.remote:
            keys = load_client_keys(config.client_keys)
            self.sock.curve_serverkey, self.sock.curve_publickey, self.sock.curve_secretkey = (
                keys.server_public, keys.public, keys.secret)
        self.sock.connect(config.client_endpoint)
        self.ids = itertools.count(1)

    def call(self, method: str, body: dict) -> Reply:
        rid = next(self.ids)
        self.sock.send(encode_request(rid, method, body))
        while True:  # a make_plan being planned is acknowledged first ("pending"), then answered
            assert self.sock.poll(60_000), f"no reply to {method}"
            reply = decode_reply(self.sock.recv(), self.config.max_message_bytes)
            assert reply.request_id == rid
            if not reply.pending:
                return reply

    def refused(self, method: str, body: dict) -> RemoteError:
        with pytest.raises(RemoteError) as info:
            self.call(method, body).result()
        return info.value

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


def hello(**fields) -> dict:
    return {"protocol": PROTOCOL_VERSION, "version": "0.1.0", "pid": os.getpid(), "host": "here", "program": "t"} | fields


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def daemon_config():
    """One daemon for this module (its requests are cheap and leave nothing behind)."""
    with daemon_of_its_own_home() as config:
        yield config


@pytest.fixture
def peer(daemon_config):
    p = Peer(daemon_config)
    p.call("hello", hello()).result()
    yield p
    p.close()


def test_a_50_mib_host_is_refused_and_nothing_of_it_is_kept(daemon_config):
    pid = read_daemon_pid(daemon_config)
    before = daemon_stats(daemon_config)
    rss = rss_bytes(pid)
    peer = Peer(daemon_config)
    try:
        for k in range(4):  # as many clients (pids) as hellos: kept, each would hold its host twice
            err = peer.refused("hello", hello(host="h" * (50 * MiB), pid=100_000 + k))
            assert err.code is ErrorCode.BAD_REQUEST
            assert err.remote_message == f"field 'host' has {50 * MiB} characters; the limit is {MAX_HOST_CHARS}"
        # a refused hello admits nobody: the connection must still say hello first
        assert peer.refused("ping", {}).code is ErrorCode.NOT_HANDSHAKEN
        peer.call("hello", hello()).result()
        assert peer.call("ping", {}).result()["pid"] == pid
    finally:
        peer.close()
    after = daemon_stats(daemon_config)
    assert after["errors"]["BAD_REQUEST"] == before["errors"].get("BAD_REQUEST", 0) + 4
    assert after["clients"]["chars"] <= before["clients"]["chars"] + 64  # at most this test's good hello
    assert after["clients"]["kept"] <= before["clients"]["kept"] + 1
    assert rss_bytes(pid) - rss < 64 * MiB  # 4 hosts kept twice would be 400 MiB


def _make_plan_body(**changes) -> dict:
    x = torch.randn(2, 3)
    graph = canonical(lambda x: (x + 1,), x)
    metas = cap.input_metas([x])
    ekey, env = environment.describe("cpu", 0)
    body = {"graph_key": graph.key, "workload_key": workload_key(metas)[0], "env_key": ekey, "policy": "HEURISTIC",
            "graph": graph.to_wire(), "workload": metas, "environment": env}
    return body | changes


KEYS = {"graph_key": "g1-x", "workload_key": "w1-x", "env_key": "e1-x"}
VERDICT = {"region": 3, "rule": "gelu", "kernel": "gelu_cpu", "ok": True}
OVER_LIMIT = {
    "hello version": ("hello", hello(version="v" * 65), "field 'version' has 65 characters; the limit is 64"),
    "hello program": ("hello", hello(program="p" * 1025), "field 'program' has 1025 characters; the limit is 1024"),
    "hello pid a string": ("hello", hello(pid="1" * 1000), "field 'pid' must be an integer in [0, 2147483647], not str"),
    "hello pid huge": ("hello", hello(pid=2**40), "field 'pid' must be an integer in [0, 2147483647], not 1099511627776"),
    "hello host a list": ("hello", hello(host=["h"] * 1000), "field 'host' must be a string, not list"),
    "get_plan key": ("get_plan", KEYS | {"graph_key": "g" * 129}, "field 'graph_key' has 129 characters; the limit is 128"),
    "report pid": ("report", {"fallbacks": 1, "pid": "p" * 10_000}, "field 'pid' must be an integer"),
    "report fallbacks": ("report", {"fallbacks": 10**7}, "field 'fallbacks' must be an integer in [0, 1000000]"),
    "verdict rule": ("report", KEYS | {"verdicts": [VERDICT | {"rule": "r" * 201}]},
                     "verdict 0: field 'rule' has 201 characters; the limit is 200"),
    "verdict implementation": ("report", KEYS | {"verdicts": [VERDICT | {"region_key": "r1-a", "implementation": "i" * 201}]},
                               "verdict 0: field 'implementation' has 201 characters; the limit is 200"),
    "verdict error not a number": ("report", KEYS | {"verdicts": [VERDICT | {"max_abs_err": "big"}]},
                                   "verdict 0: field 'max_abs_err' must be a number, not str"),
    "verdicts too many": ("report", KEYS | {"verdicts": [VERDICT] * 10_001}, "verdicts must be a list of at most 10000"),
    "make_plan workload": ("make_plan", None, "field 'workload' takes"),
    "make_plan environment": ("make_plan", None, "field 'environment' takes"),
    "tune prefix": ("tune", {"graph_key": "g" * 129}, "field 'graph_key' has 129 characters; the limit is 128"),
    "tune_status batch a list": ("tune_status", {"batch": [1]}, "field 'batch' must be an integer"),
}


@pytest.mark.parametrize("case", OVER_LIMIT)
def test_a_field_over_its_limit_is_refused_naming_field_and_limit(daemon_config, peer, case):
    method, body, message = OVER_LIMIT[case]
    if case == "make_plan workload":
        body = _make_plan_body(workload=[["T", [1] * 16, [1] * 16, "float32", "cpu"]] * 100_000)
    elif case == "make_plan environment":
        body = _make_plan_body(environment={f"k{i}": "v" * 100 for i in range(1000)})
    before = daemon_stats(daemon_config)
    err = peer.refused(method, body)
    assert err.code is ErrorCode.BAD_REQUEST, err
    assert message in err.remote_message
    assert len(err.remote_message) < 200  # the value itself is never echoed
    after = daemon_stats(daemon_config)
    assert after["errors"]["BAD_REQUEST"] == before["errors"].get("BAD_REQUEST", 0) + 1
    assert after["clients"] == before["clients"] and after["graphs"] == before["graphs"]
    assert after["workloads"] == before["workloads"] and after["environments"] == before["environments"]


def test_a_policy_of_any_size_is_not_echoed(peer):
    err = peer.refused("get_plan", KEYS | {"policy": "P" * MiB})
    assert err.code is ErrorCode.BAD_REQUEST and len(err.remote_message) < 200


def test_free_text_is_cut_not_refused(daemon_config, peer):
    assert peer.call("report", {"fallbacks": 1, "reason": "why" + "r" * 100_000, "pid": 7}).result() == {}
    log = daemon_config.log_path.read_text()
    line = next(line for line in log.splitlines() if "client 7 reported 1 fallback(s)" in line)
    assert line.endswith("why" + "r" * (MAX_REASON_CHARS - 3))


def test_a_good_make_plan_is_still_served(daemon_config, peer):
    body = _make_plan_body()
    plan = peer.call("make_plan", body).result()["plan"]
    assert plan["graph_key"] == body["graph_key"]
    assert daemon_stats(daemon_config)["plans"] >= 1


def test_a_20_mib_host_over_curve_is_refused_and_not_kept(home, listener):  # noqa: F811
    endpoint, bundle = listener
    remote = load(home.env | remote_host(bundle, endpoint))
    before = daemon_stats(home.config)  # this process, listed from now on
    peer = Peer(remote)
    try:
        for k in range(3):
            err = peer.refused("hello", hello(host="h" * (20 * MiB), pid=200_000 + k))
            assert err.code is ErrorCode.BAD_REQUEST and "field 'host'" in err.remote_message
        peer.call("hello", hello(host="remote-host")).result()
        assert peer.call("ping", {}).result()["pid"] == home.daemon_pid()
    finally:
        peer.close()
    after = daemon_stats(home.config)
    assert after["peers"]["curve_accepted"] >= 1
    assert after["clients"]["kept"] == before["clients"]["kept"] + 1
    assert after["clients"]["chars"] < before["clients"]["chars"] + 100


def test_the_ceilings_cached_per_environment_named_in_requests_are_bounded(tmp_path):
    from hypatia.daemon.service import MAX_CACHED_CEILINGS, PlanService
    from hypatia.planner.store import Store

    store = Store(tmp_path / "s.sqlite")
    try:
        service = PlanService(load({"HYPATIA_HOME": str(tmp_path)}), store)
        for k in range(MAX_CACHED_CEILINGS + 50):
            assert service.ceilings(f"e1-{k:064x}") is None  # never measured: nothing stored
        assert len(service._ceilings) <= MAX_CACHED_CEILINGS
    finally:
        store.close()
