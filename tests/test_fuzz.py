"""Hostile input against a real hypatiad: fuzzed, truncated, oversized, deeply nested and
unknown-method messages (hypothesis). Every one gets an error reply or is dropped; the daemon
stays up and keeps serving."""

from __future__ import annotations

import msgpack
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypatia.protocol import PROTOCOL_VERSION, MAX_DEPTH, decode_reply, encode_request

INTS = st.integers(min_value=-2**63, max_value=2**64 - 1)  # what msgpack can carry
LEAVES = st.one_of(st.none(), st.booleans(), INTS, st.floats(allow_nan=True),
                   st.text(max_size=40), st.binary(max_size=40))
VALUES = st.recursive(LEAVES, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                      st.dictionaries(st.one_of(st.text(max_size=10), INTS), inner, max_size=5)),
                      max_leaves=25)
METHODS = st.sampled_from(["hello", "ping", "get_plan", "make_plan", "report", "stats", "tune", "tune_status", "flush", "run",
                           "get_compiled", "put_compiled", "compile_heartbeat", "compile_release", "warm_start",
                           "", "shutdown", "__class__", "x" * 300])


def _framed(version, rid, method, body) -> bytes:
    return msgpack.packb([version, rid, method, body], use_bin_type=True)


def _nested(depth: int):
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


MESSAGES = st.one_of(
    st.binary(max_size=200),  # not msgpack at all, or truncated msgpack
    st.builds(lambda b, cut: b[:cut], st.builds(_framed, st.just(PROTOCOL_VERSION), st.integers(0, 99), METHODS, VALUES),
              st.integers(0, 60)),  # truncated
    st.builds(_framed, st.one_of(st.just(PROTOCOL_VERSION), VALUES), VALUES, st.one_of(METHODS, VALUES), VALUES),
    st.builds(_framed, st.just(PROTOCOL_VERSION), st.integers(0, 99), METHODS,
              st.builds(lambda d: {"x": _nested(d)}, st.integers(MAX_DEPTH - 2, MAX_DEPTH + 200))),  # deep
)


class Peer:
    def __init__(self, config):
        self.config = config
        self.ctx = zmq.Context()
        self.sock = self._open()

    def _open(self):
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.config.endpoint)
        sock.send(encode_request(0, "hello", {"protocol": PROTOCOL_VERSION}))
        assert sock.poll(5000), "no answer to hello"
        sock.recv()
        return sock

    def send_raw(self, frames: list[bytes]) -> bytes | None:
        self.sock.send_multipart(frames)
        return self.sock.recv() if self.sock.poll(2000) else None

    def ping(self) -> dict:
        self.sock.send(encode_request(7, "ping"))
        assert self.sock.poll(5000), "the daemon stopped answering"
        return decode_reply(self.sock.recv(), 1 << 20).result()

    def close(self):
        self.sock.close(0)
        self.ctx.term()


def test_fuzzed_messages_never_take_the_daemon_down(daemon):
    peer = Peer(daemon.config)
    answered = []

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(message=MESSAGES, extra_frames=st.integers(0, 2))
    def check(message, extra_frames):
        answer = peer.send_raw([message] + [b"extra"] * extra_frames)
        if answer is not None:  # whatever came back is a well-formed reply of our protocol
            reply = msgpack.unpackb(answer, raw=False, strict_map_key=False)
            assert isinstance(reply, list) and len(reply) == 4 and reply[0] == PROTOCOL_VERSION
            assert reply[2] in ("ok", "error")
            answered.append(reply[2])
        assert peer.ping()["pid"] == daemon.daemon_pid()

    try:
        check()
    finally:
        peer.close()
    assert "error" in answered  # the daemon saw the bad messages and said what was wrong
    stats = daemon.stats()
    assert stats["pid"] == daemon.daemon_pid() and stats["error_total"] > 0


def test_oversized_message_is_dropped_and_the_daemon_keeps_serving(daemon):
    peer = Peer(daemon.config)
    try:
        big = _framed(PROTOCOL_VERSION, 1, "ping", {"pad": b"x" * (daemon.config.max_message_bytes + 1)})
        peer.sock.send(big)
        peer.sock.poll(1000)
        peer.close()
        peer = Peer(daemon.config)  # libzmq drops a peer that sends more than ZMQ_MAXMSGSIZE
        assert peer.ping()["pid"] == daemon.daemon_pid()
    finally:
        peer.close()
    assert daemon.stats()["pid"] == daemon.daemon_pid()
