"""Hypatia-device requests built by hand against a real hypatiad: a good upload, execute and
fetch through shared memory; the reply segments of a client that died (swept by that daemon
alone); hostile descriptors (another uid, path traversal, sizes beyond the segment, unknown
dtypes, negative strides and shapes, overlapping strides, segments of another process, daemon or
request) and executes that do not fit their graph, each answered BAD_REQUEST while the daemon
keeps serving and keeps nothing of them; and graphs whose peak passes the device's memory
(HYPATIA_DEVICE_MEMORY_MB=1 here), answered TOO_LARGE before they allocate."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
from typing import Any, Callable, Iterator, NamedTuple

import pytest
import torch

from conftest import daemon_of_its_own_home, daemon_stats
from graphs import aten_graph
from hypatia import shm
from hypatia.canonical import workload_key
from hypatia.client.capture import capture, encode_meta
from hypatia.client.rpc import DaemonClient
from hypatia.config import Config
from hypatia.protocol import ErrorCode, RemoteError
from remote_helpers import UID, clean_shm, wait_for

# every test fails if it leaves a segment of this user behind in /dev/shm (the name used: pyflakes)
pytestmark = pytest.mark.usefixtures(clean_shm.__name__)

Keys = tuple[str, str, str]
X, W = (128, 256), (256, 160)  # 128 KiB, 160 KiB and an 80 KiB output: each over shm.INLINE_UP_TO
assert min(4 * X[0] * X[1], 4 * W[0] * W[1], 4 * X[0] * W[1]) > shm.INLINE_UP_TO


class Session(NamedTuple):
    """A device session: its token, and the client process its segments are named for."""
    token: str
    pid: int


class Device:
    """The device of one daemon driven by hand: graphs registered (make_plan) for its environment,
    tensors uploaded through segments this process makes, values read from the daemon's."""

    def __init__(self, config: Config):
        self.config = config
        self.client = DaemonClient(config)
        self.info: dict = self.client.call("device", {"op": "info"})
        self.daemon: str = self.client.server["daemon"]  # every segment of a transfer names it
        torch.manual_seed(0)
        self.x, self.w = torch.randn(*X), torch.randn(*W)
        self.keys = self.register(lambda x, w: (torch.relu(x @ w),), self.x, self.w)

    def register(self, fn: Callable[..., tuple], *inputs: torch.Tensor) -> Keys:
        """make_plan the ATen graph of ``fn`` as a device client does (client/device/link.py
        ``Link._keys``; traced on fake tensors, so its shapes may be huge); its keys."""
        gm, kind = aten_graph(fn, *inputs), self.info["device_type"]
        graph, _ = capture(gm, kind)
        metas = [encode_meta(n.meta["val"], kind) for n in gm.graph.nodes if n.op == "placeholder"]
        metas.append(["phase", "inference", []])
        keys = (graph.key, workload_key(metas)[0], self.info["env_key"])
        self.client.call("make_plan", {"graph_key": keys[0], "workload_key": keys[1], "env_key": keys[2],
                                       "policy": "HEURISTIC", "graph": graph.to_wire(), "workload": metas,
                                       "environment": self.info["environment"]}, timeout_ms=60000)
        return keys

    def call(self, s: Session, op: str, **body: Any) -> dict:
        """One device request of session ``s`` (never retried: an execute is not served twice)."""
        return self.client.call("device", {"op": op, "session": s.token, "pid": s.pid} | body,
                                timeout_ms=60000, retries=0)

    def execute(self, s: Session, keys: Keys | None = None, **body: Any) -> dict:
        """An execute request of ``keys`` (the module's relu(x @ w) by default), answered as is."""
        keys = keys or self.keys
        return self.call(s, "execute", graph_key=keys[0], workload_key=keys[1], env_key=keys[2], **body)

    def put(self, pid: int, tag: str, tensors: list[torch.Tensor], first: int = 1) -> list[dict]:
        """Upload entries for ``tensors`` as handles ``first``, ``first + 1``...: segments named
        ``<tag>u<k>`` for client ``pid``, which the caller unlinks (:meth:`unlink`)."""
        return [{"handle": first + k, "digest": None,
                 "data": shm.put(t, shm.segment_name(self.daemon, pid, f"{tag}u{k}")).to_wire()}
                for k, t in enumerate(tensors)]

    @staticmethod
    def unlink(entries: list[dict]) -> None:
        """What a client does once its request is answered: remove its upload segments."""
        for name in (e["data"]["name"] for e in entries):
            shm.unlink(name)

    def run(self, s: Session, tag: str, keys: Keys | None = None,
            tensors: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Run ``keys`` (the module's relu(x @ w) by default) on ``tensors`` (x and w), uploaded
        with the execute; its one output, fetched and read as the client reads it: a segment
        ``<tag>o0`` named for ``s.pid`` (read, then unlinked) or inline. Nothing stays held."""
        uploads = self.put(s.pid, tag, [self.x, self.w] if tensors is None else tensors)
        try:  # ``release`` is done before the uploads it carries: they are released afterwards
            reply = self.execute(s, keys, tag=tag, inputs=[e["handle"] for e in uploads], outputs=[100], fetch=[100],
                                 uploads=uploads)
        finally:
            self.unlink(uploads)
        values = [self.read(v, s.pid, tag) for v in reply["values"]]
        self.call(s, "release", handles=[*(e["handle"] for e in uploads), 100])
        return values

    def read(self, value: dict, pid: int, tag: str) -> torch.Tensor:
        if "bytes" in value:
            return shm.from_inline(value)
        assert value["name"] == shm.segment_name(self.daemon, pid, f"{tag}o0")
        try:
            return shm.read(shm.Descriptor.parse(value, pid, tag + "o", self.daemon))
        finally:
            shm.unlink(value["name"])

    def stats(self) -> dict:
        return daemon_stats(self.config)


def _daemon_of_its_own_home() -> contextlib.AbstractContextManager[Config]:
    # aten alone runs the graphs (no executor measured); the device's memory is 1 MiB
    return daemon_of_its_own_home(HYPATIA_DEVICE_MEMORY_MB="1", HYPATIA_DEVICE_BACKEND="cpu",
                                  HYPATIA_DEVICE_EXECUTORS="aten")


@pytest.fixture(scope="module")
def neighbour() -> Iterator[Config]:
    """Another daemon of the same user for the whole module (as `make demo`'s beside `make
    test`'s): it sweeps every 2 s too, and must never touch the shared daemon's segments."""
    with _daemon_of_its_own_home() as config:
        yield config


@pytest.fixture(scope="module")
def dev(neighbour) -> Iterator[Device]:
    """One daemon for this module, with relu(x @ w) registered."""
    with _daemon_of_its_own_home() as config:
        device = Device(config)
        yield device
        device.client.close()


@pytest.fixture
def me(dev) -> Iterator[Session]:
    """A fresh session of this process, closed afterwards: the device is empty between tests."""
    s = Session(secrets.token_hex(16), os.getpid())
    yield s
    dev.call(s, "close")
    assert dev.stats()["device"]["memory_used_bytes"] == 0


def test_a_good_upload_execute_and_fetch_by_hand(dev, me):
    before = dev.stats()["device"]
    uploads = dev.put(me.pid, "goodrun01", [dev.x, dev.w])
    try:
        assert dev.call(me, "upload", tag="goodrun01", tensors=uploads) == {"missing": []}
    finally:
        dev.unlink(uploads)
    reply = dev.execute(me, tag="goodrun02", inputs=[1, 2], outputs=[3], fetch=[3])
    (out,) = reply["values"]
    assert "bytes" not in out  # 80 KiB: a segment the daemon wrote for this process
    torch.testing.assert_close(dev.read(out, me.pid, "goodrun02"), torch.relu(dev.x @ dev.w))
    assert dev.call(me, "release", handles=[1, 2, 7]) == {"released": 2}  # 7: never made
    after = dev.stats()["device"]
    assert after["executes"] == before.get("executes", 0) + 1
    assert after["bytes_uploaded"] == before.get("bytes_uploaded", 0) + 4 * (X[0] * X[1] + W[0] * W[1])
    assert after["bytes_fetched"] == before.get("bytes_fetched", 0) + 4 * X[0] * W[1]
    assert after["memory_used_bytes"] == 4 * X[0] * W[1]  # the output alone: its inputs were released


def test_reply_segments_of_a_client_that_died_are_swept(dev, neighbour):
    """By the daemon they name only: the neighbour daemon sweeps its own dead client's segment,
    and neither touches the other's. The dead client's session goes with them."""
    before, theirs = dev.stats()["device"], daemon_stats(neighbour)["device"].get("segments_swept", 0)
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        s = Session(secrets.token_hex(16), helper.pid)
        dev.call(s, "upload", tag="orphan001", tensors=dev.put(helper.pid, "orphan001", [dev.x, dev.w]))
        (out,) = dev.execute(s, tag="orphan002", inputs=[1, 2], outputs=[3], fetch=[3])["values"]
        assert shm.exists(out["name"])
        shm.put(torch.ones(2), shm.segment_name(shm.daemon_id(neighbour.socket_path), helper.pid, "orphan003u0"))
        assert len(shm.names_of(helper.pid)) == 4  # two uploads and the reply nobody will read, the neighbour's
        assert dev.stats()["device"]["sessions"] == before["sessions"] + 1
    finally:
        helper.kill()
        helper.wait()
    wait_for(lambda: not shm.names_of(helper.pid), what="the sweeps")
    after = dev.stats()["device"]
    assert after["segments_swept"] == before.get("segments_swept", 0) + 3
    assert daemon_stats(neighbour)["device"]["segments_swept"] == theirs + 1
    # the session was dropped in the same sweep, just before the segments
    assert (after["sessions"], after["memory_used_bytes"]) == (before["sessions"], before["memory_used_bytes"])


HOSTILE = {  # case: what its refusal says (the daemon's own words, so that nothing else refused it)
    "other uid": "belongs to uid", "path traversal": "is not of the form",
    "traversal inside the tag": "is not of the form",
    "larger than the segment": "holds 131072 bytes, not the 524288 described",
    "layout beyond nbytes": "layout reads 655360 bytes", "unknown dtype": "dtype 'float128' is not one of",
    "negative stride": "stride holds '-256'", "negative shape": "shape holds '-128'",
    "another process's segment": "not to the requesting process",
    "another daemon's segment": "named for daemon d1other0",
    "another request's segment": "is not part of request", "missing segment": "does not exist",
    "descriptor not a map": "must be a descriptor", "bad tag": "tag must be", "bad pid": "pid -1 is not a process id",
    "wrong dtype for the graph": "input 0 is torch.float64[128, 256]; the graph takes float32[128, 256]",
    "too few inputs": "the graph takes 2 inputs, the request names 1",
}
EXECUTES = ("wrong dtype for the graph", "too few inputs")  # about the graph: executes alone


def _hostile(dev: Device, s: Session, case: str, via: str, tag: str) -> tuple[Callable[[], Any], list[dict]]:
    """The refused request of ``case`` (an upload, or an execute carrying the upload when ``via``
    is "execute"), ready to send, and the upload entries whose segments to unlink afterwards."""
    if case == "too few inputs":
        dev.call(s, "upload", tag=tag, tensors=(good := dev.put(s.pid, tag, [dev.x, dev.w])))
        return lambda: dev.execute(s, tag=tag, inputs=[1], outputs=[3], fetch=[3]), good
    good = dev.put(s.pid, tag, [dev.x.double() if case == "wrong dtype for the graph" else dev.x, dev.w])
    desc, named = good[0]["data"], f"{tag}u0"
    first: Any = desc | {  # what the case changes in the first tensor's descriptor
        "other uid": {"name": f"hypatia-{UID + 1}-{dev.daemon}-{s.pid}-{named}"},
        "path traversal": {"name": "../../../etc/passwd"},
        "traversal inside the tag": {"name": f"hypatia-{UID}-{dev.daemon}-{s.pid}-{named}/../../x"},
        "larger than the segment": {"nbytes": desc["nbytes"] * 4, "shape": [X[0] * 4, X[1]]},
        "layout beyond nbytes": {"shape": [X[0] * 5, X[1]]},
        "unknown dtype": {"dtype": "float128"},
        "negative stride": {"stride": [-X[1], 1]},
        "negative shape": {"shape": [-X[0], X[1]]},
        "another process's segment": {"name": shm.segment_name(dev.daemon, s.pid + 1, named)},
        "another daemon's segment": {"name": shm.segment_name("d1other0", s.pid, named)},
        "another request's segment": {"name": shm.segment_name(dev.daemon, s.pid, "otherreq1u0")},
        "missing segment": {"name": shm.segment_name(dev.daemon, s.pid, f"{tag}u9")},
    }.get(case, {})
    if case == "descriptor not a map":
        first = ["name", desc["name"]]
    pid, tag = -1 if case == "bad pid" else s.pid, "../etc" if case == "bad tag" else tag
    tensors = [good[0] | {"data": first}, *good[1:]]
    s = Session(s.token, pid)
    if via == "upload":
        return lambda: dev.call(s, "upload", tag=tag, tensors=tensors), good
    return lambda: dev.execute(s, tag=tag, inputs=[1, 2], outputs=[3], fetch=[3], uploads=tensors), good


@pytest.mark.parametrize("case,via", [(c, v) for c in HOSTILE for v in ("upload", "execute")
                                      if v == "execute" or c not in EXECUTES])
def test_a_hostile_request_is_bad_request_keeps_nothing_and_the_daemon_stays_up(dev, me, case, via):
    tag = f"hostile{list(HOSTILE).index(case):02d}{via[0]}"
    send, made = _hostile(dev, me, case, via, tag)
    before = dev.stats()
    try:
        with pytest.raises(RemoteError) as info:
            send()
    finally:
        dev.unlink(made)
    assert info.value.code is ErrorCode.BAD_REQUEST and HOSTILE[case] in info.value.remote_message, info.value
    after = dev.stats()
    assert after["pid"] == before["pid"]
    assert after["errors"]["BAD_REQUEST"] == before["errors"].get("BAD_REQUEST", 0) + 1
    for figure in ("memory_used_bytes", "handles", "bytes_fetched"):  # nothing of it kept, nothing sent back
        assert after["device"].get(figure) == before["device"].get(figure), figure
    if case == "too few inputs":  # the case's own good upload: still held, as it should be
        assert dev.call(me, "release", handles=[1, 2])["released"] == 2
    (out,) = dev.run(me, "afterward")  # still serving
    torch.testing.assert_close(out, torch.relu(dev.x @ dev.w))
    assert dev.stats()["device"]["executes"] == before["device"].get("executes", 0) + 1


def test_a_request_naming_a_held_handle_is_refused_and_the_held_value_kept(dev, me):
    """An upload or an execute output may not replace what a handle holds (a client always picks
    fresh ones): refused, and what was held stays, unchanged."""
    uploads = dev.put(me.pid, "heldonce1", [dev.x, dev.w])
    try:
        dev.call(me, "upload", tag="heldonce1", tensors=uploads)
        with pytest.raises(RemoteError, match=r"tensor 0: handle 1 is held already; release it first"):
            dev.call(me, "upload", tag="heldonce1", tensors=uploads)
    finally:
        dev.unlink(uploads)
    with pytest.raises(RemoteError, match=r"output handles \[2\] are held already; release them first"):
        dev.execute(me, tag="heldonce2", inputs=[1, 2], outputs=[2], fetch=[2])
    values = dev.call(me, "fetch", tag="heldonce3", handles=[1, 2])["values"]
    got = [_read_any(dev, v, me.pid, "heldonce3") for v in values]
    torch.testing.assert_close(got[0], dev.x)
    torch.testing.assert_close(got[1], dev.w)


def _read_any(dev: Device, value: dict, pid: int, tag: str) -> torch.Tensor:
    """A fetched value in a segment of any index (``Device.read`` expects the first)."""
    if "bytes" in value:
        return shm.from_inline(value)
    try:
        return shm.read(shm.Descriptor.parse(value, pid, tag + "o", dev.daemon))
    finally:
        shm.unlink(value["name"])


def test_an_upload_refused_at_its_second_tensor_keeps_the_first_neither(dev, me):
    """As a failed execute keeps nothing: the client holds no handle of a refused upload, so a
    tensor kept of it (or a DeviceFull at the second tensor) would stay until the session ends."""
    before = dev.stats()["device"]
    good = dev.put(me.pid, "partial01", [dev.x, dev.w])
    try:
        with pytest.raises(RemoteError):
            bad = good[1] | {"data": good[1]["data"] | {"dtype": "float128"}}
            dev.call(me, "upload", tag="partial01", tensors=[good[0], bad])
    finally:
        dev.unlink(good)
    assert dev.stats()["device"]["memory_used_bytes"] == before["memory_used_bytes"]


def test_a_zero_stride_descriptor_over_a_4_byte_segment_is_refused(dev, me):
    """The segment holds one float; the descriptor makes it 2**28 of them (1 GiB for the daemon to
    hold and compute on). Refused before the daemon reads a byte."""
    tag = "stride0x1"
    keys = dev.register(lambda x: (torch.relu(x),), torch.empty(1 << 28))  # traced on fake tensors
    name = shm.segment_name(dev.daemon, me.pid, f"{tag}u0")
    assert shm.put(torch.ones(1), name).nbytes == 4
    before = dev.stats()
    try:
        with pytest.raises(RemoteError) as info:
            data = {"name": name, "dtype": "float32", "shape": [1 << 28], "stride": [0], "offset": 0, "nbytes": 4}
            dev.execute(me, keys, tag=tag, inputs=[1], outputs=[2],
                        uploads=[{"handle": 1, "digest": None, "data": data}])
    finally:
        shm.unlink(name)
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert ("shape [268435456] has 268435456 elements but its strides [0] reach only 1 stored ones: "
            "overlapping strides (such as 0) are refused") in info.value.remote_message
    after = dev.stats()
    assert after["device"]["bytes_uploaded"] == before["device"]["bytes_uploaded"]
    assert after["device"]["memory_used_bytes"] == before["device"]["memory_used_bytes"]
    assert after["errors"]["BAD_REQUEST"] == before["errors"].get("BAD_REQUEST", 0) + 1
    (out,) = dev.run(me, "afterward")  # still serving
    torch.testing.assert_close(out, torch.relu(dev.x @ dev.w))


def test_an_expanded_input_travels_contiguous_and_runs(dev, me):
    x = dev.x[:1].expand(*X)  # stride (0, 1): sent as its rows
    name = shm.segment_name(dev.daemon, me.pid, "expanded0u0")
    assert shm.put(x, name).stride == (X[1], 1)
    shm.unlink(name)
    (out,) = dev.run(me, "expanded1", tensors=[x, dev.w])
    torch.testing.assert_close(out, torch.relu(x @ dev.w))


TOO_LARGE = {  # (graph, its input, the node the refusal names: where the most is alive); the device holds 1 MiB
    "4 GiB from 16 bytes": (lambda x: (x.expand(1 << 28, 4).clone(),), torch.ones(1, 4), "(aten.clone.default)"),
    "just past the limit": (lambda x: (x.expand(520, 512).clone(),), torch.ones(1, 512), "(aten.clone.default)"),
    "an intermediate past it": (lambda x: ((x.expand(1024, 512) + 1).sum(),), torch.ones(1, 512), "(aten.sum.default)"),
}


@pytest.mark.parametrize("case", TOO_LARGE)
def test_an_execute_past_the_device_s_memory_is_refused_before_it_allocates(dev, me, case):
    fn, x, node = TOO_LARGE[case]
    tag = f"toolarge{list(TOO_LARGE).index(case)}"
    keys = dev.register(fn, x)
    before = dev.stats()
    with pytest.raises(RemoteError) as info:  # the input is carried: the refusal must release it
        dev.run(me, tag, keys, [x])
    assert info.value.code is ErrorCode.TOO_LARGE, info.value
    message = info.value.remote_message
    # sized on fake tensors before the run (not "this graph's outputs", measured after it)
    assert message.startswith(f"the hypatia device is full: graph {keys[0][:16]} at node "), message
    assert node in message and "(HYPATIA_DEVICE_MEMORY_MB)" in message, message
    after = dev.stats()
    assert after["pid"] == before["pid"]
    assert after["errors"]["TOO_LARGE"] == before["errors"].get("TOO_LARGE", 0) + 1
    assert after["device"]["full"] == before["device"].get("full", 0) + 1
    for figure in ("memory_used_bytes", "handles", "executes", "bytes_fetched"):  # the carried input released
        assert after["device"].get(figure) == before["device"].get(figure), figure
    assert after["device"]["bytes_uploaded"] == before["device"]["bytes_uploaded"] + x.numel() * 4  # once stored
    (out,) = dev.run(me, "afterward")  # still serving
    torch.testing.assert_close(out, torch.relu(dev.x @ dev.w))


def test_an_execute_just_under_the_device_s_memory_is_served(dev, me):
    x = torch.randn(1, 512)
    keys = dev.register(lambda x: (x.expand(500, 512).clone(),), x)  # 1,024,000 bytes and the input's 2,048
    (out,) = dev.run(me, "undercap1", keys, [x])
    torch.testing.assert_close(out, x.expand(500, 512))
