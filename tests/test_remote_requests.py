"""Run requests built by hand against a real hypatiad: a good one, the reply segments of a
client that died (swept), hostile descriptors (another uid, path traversal, sizes beyond the
segment, unknown dtypes, negative strides and shapes, overlapping strides, segments of another
process or request), each answered BAD_REQUEST while the daemon keeps serving, and graphs whose
outputs or intermediates pass HYPATIA_REMOTE_MAX_OUTPUT_MB (1 here), answered TOO_LARGE."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from typing import Iterator

import pytest
import torch

from conftest import daemon_of_its_own_home, daemon_stats
from graphs import aten_graph
from hypatia import shm
from hypatia.canonical import workload_key
from hypatia.client import capture as cap
from hypatia.client.rpc import DaemonClient
from hypatia.config import Config
from hypatia.planner import environment
from hypatia.protocol import ErrorCode, RemoteError
from remote_helpers import UID, clean_shm, wait_for  # noqa: F401  (a fixture)

# every test fails if it leaves a segment of this user behind in /dev/shm
pytestmark = pytest.mark.usefixtures("clean_shm")


class Registered:
    """A graph made_plan'ed with the daemon, and run requests for it built by hand."""

    def __init__(self, config):
        torch.manual_seed(0)
        self.x, self.w = torch.randn(4, 8), torch.randn(8, 3)
        graph, _ = cap.capture(aten_graph(lambda x, w: (torch.relu(x @ w),), self.x, self.w))
        metas = cap.input_metas([self.x, self.w])
        ekey, env = environment.describe("cpu", 0)
        self.keys = (graph.key, workload_key(metas)[0], ekey)
        self.client = DaemonClient(config)
        body = {"graph_key": self.keys[0], "workload_key": self.keys[1], "env_key": self.keys[2], "policy": "HEURISTIC",
                "graph": graph.to_wire(), "workload": metas, "environment": env}
        self.client.call("make_plan", body, timeout_ms=60000)
        self.daemon = self.client.server["daemon"]  # every segment of a run names it
        self.made: list[str] = []

    def register(self, fn, *inputs) -> tuple[str, str, str]:
        """make_plan another graph (traced on fake tensors: its shapes may be huge); its keys."""
        graph, _ = cap.capture(aten_graph(fn, *inputs))
        metas = cap.input_metas(list(inputs))
        ekey, env = environment.describe("cpu", 0)
        keys = (graph.key, workload_key(metas)[0], ekey)
        self.client.call("make_plan", {"graph_key": keys[0], "workload_key": keys[1], "env_key": keys[2],
                                       "policy": "HEURISTIC", "graph": graph.to_wire(), "workload": metas,
                                       "environment": env}, timeout_ms=60000)
        return keys

    def inputs(self, pid: int, tag: str) -> list[dict]:
        descs = [shm.put(t, shm.segment_name(self.daemon, pid, f"{tag}i{k}")) for k, t in enumerate((self.x, self.w))]
        self.made += [d.name for d in descs]
        return [d.to_wire() for d in descs]

    def run(self, pid: int, tag: str, inputs: list, keys: tuple[str, str, str] | None = None) -> dict:
        keys = keys or self.keys
        body = {"graph_key": keys[0], "workload_key": keys[1], "env_key": keys[2],
                "pid": pid, "tag": tag, "inputs": inputs}
        return self.client.call("run", body, timeout_ms=60000, retries=0)

    def close_inputs(self) -> None:
        for name in self.made:
            shm.unlink(name)
        self.made.clear()

    def close(self) -> None:
        self.close_inputs()
        self.client.close()


@contextlib.contextmanager
def _daemon_of_its_own_home() -> Iterator[Config]:
    with daemon_of_its_own_home(HYPATIA_REMOTE_MAX_OUTPUT_MB="1") as config:
        yield config


@pytest.fixture(scope="module")
def neighbour() -> Iterator[Config]:
    """Another daemon of the same user for the whole module (as `make demo`'s beside `make
    test`'s): it sweeps every 2 s too, and must never touch the shared daemon's segments."""
    with _daemon_of_its_own_home() as config:
        yield config


@pytest.fixture(scope="module")
def shared(neighbour) -> Iterator[Registered]:
    """One daemon for this module, with one graph registered (make_plan) to send runs for."""
    with _daemon_of_its_own_home() as config:
        r = Registered(config)
        yield r
        r.close()


def test_a_good_run_by_hand(shared):
    pid = os.getpid()
    reply = shared.run(pid, "goodrun01", shared.inputs(pid, "goodrun01"))
    (out,) = reply["outputs"]
    assert out["name"] == shm.segment_name(shared.daemon, pid, "goodrun01o0")
    result = shm.read(shm.Descriptor.parse(out, pid, "goodrun01o"))
    shm.unlink(out["name"])
    shared.close_inputs()
    torch.testing.assert_close(result, torch.relu(shared.x @ shared.w))


def test_reply_segments_of_a_client_that_died_are_swept(shared, neighbour):
    """By the daemon they name only: the neighbour daemon sweeps its own dead client's segment,
    and neither touches the other's."""
    swept = daemon_stats(shared.client.config)["shm"]["segments_swept"]
    theirs = daemon_stats(neighbour)["shm"]["segments_swept"]
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        reply = shared.run(helper.pid, "orphan001", shared.inputs(helper.pid, "orphan001"))
        assert shm.exists(reply["outputs"][0]["name"])
        shm.put(torch.ones(2), shm.segment_name(shm.daemon_id(neighbour.socket_path), helper.pid, "orphan002i0"))
        assert len(shm.names_of(helper.pid)) == 4  # two inputs, the reply nobody will read, the neighbour's
    finally:
        helper.kill()
        helper.wait()
    wait_for(lambda: not shm.names_of(helper.pid), what="the sweeps")
    assert daemon_stats(shared.client.config)["shm"]["segments_swept"] == swept + 3
    assert daemon_stats(neighbour)["shm"]["segments_swept"] == theirs + 1
    shared.made.clear()  # swept: nothing of them left to unlink


def _hostile(reg: Registered, pid: int, case: str) -> tuple[dict, int, str]:
    """A run body for ``case``: (inputs or a whole-body override, pid, tag)."""
    tag = f"hostile{abs(hash(case)) % 10**6:06d}"
    good = reg.inputs(pid, tag)
    first = dict(good[0])
    if case == "other uid":
        first["name"] = f"hypatia-{UID + 1}-{reg.daemon}-{pid}-{tag}i0"
    elif case == "path traversal":
        first["name"] = "../../../etc/passwd"
    elif case == "traversal inside the tag":
        first["name"] = f"hypatia-{UID}-{reg.daemon}-{pid}-{tag}i0/../../x"
    elif case == "larger than the segment":
        first["nbytes"] = first["nbytes"] * 4
        first["shape"] = [16, 8]
    elif case == "layout beyond nbytes":
        first["shape"] = [40, 8]
    elif case == "unknown dtype":
        first["dtype"] = "float128"
    elif case == "negative stride":
        first["stride"] = [-8, 1]
    elif case == "negative shape":
        first["shape"] = [-4, 8]
    elif case == "another process's segment":
        first["name"] = shm.segment_name(reg.daemon, pid + 1, f"{tag}i0")
    elif case == "another daemon's segment":
        first["name"] = shm.segment_name("d1other0", pid, f"{tag}i0")
    elif case == "another request's segment":
        first["name"] = shm.segment_name(reg.daemon, pid, "otherreq1i0")
    elif case == "missing segment":
        first["name"] = shm.segment_name(reg.daemon, pid, f"{tag}i9")
    elif case == "descriptor not a map":
        first = ["name", first["name"]]
    elif case == "wrong dtype for the graph":
        reg.made.append(shm.segment_name(reg.daemon, pid, f"{tag}i7"))
        first = shm.put(reg.x.double(), reg.made[-1]).to_wire()
    elif case == "too few inputs":
        return {"inputs": good[:1]}, pid, tag
    elif case == "bad tag":
        return {"inputs": good}, pid, "../etc"
    elif case == "bad pid":
        return {"inputs": good}, -1, tag
    return {"inputs": [first, *good[1:]]}, pid, tag


HOSTILE = ["other uid", "path traversal", "traversal inside the tag", "larger than the segment", "layout beyond nbytes",
           "unknown dtype", "negative stride", "negative shape", "another process's segment", "another daemon's segment",
           "another request's segment",
           "missing segment", "descriptor not a map", "wrong dtype for the graph", "too few inputs", "bad tag", "bad pid"]


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_descriptor_is_bad_request_and_the_daemon_stays_up(shared, case):
    pid = os.getpid()
    before = daemon_stats(shared.client.config)
    override, req_pid, tag = _hostile(shared, pid, case)
    with pytest.raises(RemoteError) as info:
        shared.run(req_pid, tag, override["inputs"])
    assert info.value.code is ErrorCode.BAD_REQUEST, info.value
    reply = shared.run(pid, "afterward", shared.inputs(pid, "afterward"))  # still serving
    shm.unlink(reply["outputs"][0]["name"])
    shared.close_inputs()
    after = daemon_stats(shared.client.config)
    assert after["pid"] == before["pid"]
    assert after["errors"]["BAD_REQUEST"] == before["errors"].get("BAD_REQUEST", 0) + 1
    assert after["remote"]["runs"] == before["remote"]["runs"] + 1


def _still_serving(shared: Registered, pid: int) -> None:
    reply = shared.run(pid, "afterward", shared.inputs(pid, "afterward"))
    shm.unlink(reply["outputs"][0]["name"])
    shared.close_inputs()


def test_a_zero_stride_descriptor_over_a_4_byte_segment_is_refused(shared):
    """The segment holds one float; the descriptor makes it 2**28 of them (1 GiB for the daemon to
    compute on and write). Refused before the daemon reads a byte."""
    pid, tag = os.getpid(), "stride0x1"
    keys = shared.register(lambda x: (torch.relu(x),), torch.empty(1 << 28))  # traced on fake tensors
    name = shm.segment_name(shared.daemon, pid, f"{tag}i0")
    shared.made.append(name)
    assert shm.put(torch.ones(1), name).nbytes == 4
    before = daemon_stats(shared.client.config)
    with pytest.raises(RemoteError) as info:
        shared.run(pid, tag, [{"name": name, "dtype": "float32", "shape": [1 << 28], "stride": [0], "offset": 0,
                               "nbytes": 4}], keys)
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert ("inputs: shape [268435456] has 268435456 elements but its strides [0] reach only 1 stored ones: "
            "overlapping strides (such as 0) are refused") in info.value.remote_message
    shared.close_inputs()
    _still_serving(shared, pid)
    after = daemon_stats(shared.client.config)
    assert after["shm"]["bytes"] == before["shm"]["bytes"] + (32 + 24 + 12) * 4  # the good run's only


def test_an_expanded_input_travels_contiguous_and_runs(shared):
    pid, tag = os.getpid(), "expanded1"
    x = shared.x[:1].expand(4, 8)  # stride (0, 1): sent as 4 rows
    descs = [shm.put(t, shm.segment_name(shared.daemon, pid, f"{tag}i{k}")) for k, t in enumerate((x, shared.w))]
    shared.made += [d.name for d in descs]
    assert descs[0].stride == (8, 1)
    (out,) = shared.run(pid, tag, [d.to_wire() for d in descs])["outputs"]
    result = shm.read(shm.Descriptor.parse(out, pid, f"{tag}o"))
    shm.unlink(out["name"])
    shared.close_inputs()
    torch.testing.assert_close(result, torch.relu(x @ shared.w))


TOO_LARGE = {  # (graph, its input, what the refusal names); the daemon's limit is 1 MiB
    "4 GiB from 16 bytes": (lambda x: (x.expand(1 << 28, 4).clone(),), torch.ones(1, 4), "the outputs"),
    "just past the limit": (lambda x: (x.expand(520, 512).clone(),), torch.ones(1, 512), "the outputs"),
    "an intermediate past it": (lambda x: ((x.expand(1024, 512) + 1).sum(),), torch.ones(1, 512),
                                "the tensors alive at node"),
}


@pytest.mark.parametrize("case", TOO_LARGE)
def test_a_run_past_the_output_limit_is_refused_before_it_allocates(shared, case):
    fn, x, what = TOO_LARGE[case]
    pid, tag = os.getpid(), f"toolarge{list(TOO_LARGE).index(case)}"
    keys = shared.register(fn, x)
    before = daemon_stats(shared.client.config)
    name = shm.segment_name(shared.daemon, pid, f"{tag}i0")
    shared.made.append(name)
    with pytest.raises(RemoteError) as info:
        shared.run(pid, tag, [shm.put(x, name).to_wire()], keys)
    assert info.value.code is ErrorCode.TOO_LARGE, info.value
    message = info.value.remote_message
    assert message.startswith(what) and "above its HYPATIA_REMOTE_MAX_OUTPUT_MB=1; the client runs it" in message
    shared.close_inputs()
    after = daemon_stats(shared.client.config)
    assert after["pid"] == before["pid"] and after["remote"]["errors"] == before["remote"]["errors"] + 1
    assert after["errors"]["TOO_LARGE"] == before["errors"].get("TOO_LARGE", 0) + 1
    assert after["shm"]["segments_written"] == before["shm"]["segments_written"]
    _still_serving(shared, pid)


def test_a_run_just_under_the_output_limit_is_served(shared):
    pid, tag = os.getpid(), "undercap1"
    x = torch.randn(1, 512)
    keys = shared.register(lambda x: (x.expand(500, 512).clone(),), x)  # 1,024,000 bytes: under 1 MiB
    name = shm.segment_name(shared.daemon, pid, f"{tag}i0")
    shared.made.append(name)
    (out,) = shared.run(pid, tag, [shm.put(x, name).to_wire()], keys)["outputs"]
    result = shm.read(shm.Descriptor.parse(out, pid, f"{tag}o"))
    shm.unlink(out["name"])
    shared.close_inputs()
    torch.testing.assert_close(result, x.expand(500, 512))
