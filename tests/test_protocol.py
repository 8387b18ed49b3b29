"""Unit tests of the wire protocol (hypatia.protocol): encoding, decoding and refusal of bad frames."""

from __future__ import annotations

import uuid

import msgpack
import pytest
import zmq

from hypatia.protocol import (
    MAX_DEPTH,
    METHODS,
    PROTOCOL_VERSION,
    BadFrame,
    BadRequest,
    ErrorCode,
    ProtocolError,
    RemoteError,
    Reply,
    Request,
    TooLarge,
    UnknownMethod,
    VersionMismatch,
    decode_reply,
    decode_request,
    encode_error,
    encode_pending,
    encode_reply,
    encode_request,
    pack,
    require,
    unpack,
)

LIMIT = 1 << 20


def nested(depth: int) -> list:
    """A list whose innermost list sits ``depth`` levels below the outermost one."""
    obj: list = []
    for _ in range(depth):
        obj = [obj]
    return obj


def refused(data: bytes, max_bytes: int = LIMIT) -> ProtocolError:
    """The ProtocolError that decode_request raises for ``data`` (fails if it accepts it)."""
    with pytest.raises(ProtocolError) as info:
        decode_request(data, max_bytes)
    return info.value


# -- round trips ------------------------------------------------------------------------------


def test_request_round_trip():
    """A request survives encode/decode with its id, method and body intact."""
    body = {"graph_key": "g1-abc", "n": 3, "nested": {"xs": [1, 2.5, None, True, b"\x00\xff"]}}
    data = encode_request(42, "get_plan", body)
    assert isinstance(data, bytes)
    assert msgpack.unpackb(data, raw=False)[0] == PROTOCOL_VERSION
    assert decode_request(data, LIMIT) == Request(42, "get_plan", body)


def test_request_without_body_decodes_to_empty_map():
    """encode_request with no body sends an empty map, not nil."""
    assert decode_request(encode_request(1, "ping"), LIMIT) == Request(1, "ping", {})


@pytest.mark.parametrize("method", METHODS)
def test_every_known_method_is_accepted(method):
    """Each method the daemon serves passes decode_request."""
    assert decode_request(encode_request(5, method, {}), LIMIT).method == method


def test_ok_reply_round_trip():
    """An ok reply decodes to Reply(ok=True) and result() returns its body."""
    body = {"plan": {"regions": [], "format": 1}}
    reply = decode_reply(encode_reply(9, body), LIMIT)
    assert reply == Reply(9, True, body)
    assert reply.result() == body


def test_pending_reply_is_interim_and_not_a_result():
    """A pending reply (work in progress) carries its request id and is neither ok nor an error."""
    reply = decode_reply(encode_pending(12, {"state": "planning"}), LIMIT)
    assert reply == Reply(12, False, {"state": "planning"}, pending=True)
    assert not decode_reply(encode_reply(12, {}), LIMIT).pending


def test_error_reply_round_trip_and_result_raises():
    """An error reply decodes to ok=False and result() raises RemoteError with its code."""
    reply = decode_reply(encode_error(11, ErrorCode.UNKNOWN_METHOD, "no such thing"), LIMIT)
    assert reply.request_id == 11
    assert reply.ok is False
    assert reply.body == {"code": int(ErrorCode.UNKNOWN_METHOD), "message": "no such thing"}
    with pytest.raises(RemoteError) as info:
        reply.result()
    assert info.value.code is ErrorCode.UNKNOWN_METHOD
    assert info.value.remote_message == "no such thing"
    assert "UNKNOWN_METHOD" in str(info.value)


def test_error_reply_may_carry_no_request_id():
    """An error answering an unparseable frame has request id None and still decodes."""
    reply = decode_reply(encode_error(None, ErrorCode.BAD_FRAME, "garbage"), LIMIT)
    assert reply.request_id is None and reply.ok is False
    with pytest.raises(RemoteError) as info:
        reply.result()
    assert info.value.code is ErrorCode.BAD_FRAME


def test_remote_error_with_unknown_code_keeps_the_number():
    """An error code this client does not know is kept as a plain int."""
    with pytest.raises(RemoteError) as info:
        Reply(1, False, {"code": 99, "message": "from the future"}).result()
    assert info.value.code == 99 and not isinstance(info.value.code, ErrorCode)
    assert "99" in str(info.value)


def test_error_reply_with_malformed_body_is_internal():
    """An error reply whose body is not a map raises RemoteError(INTERNAL)."""
    with pytest.raises(RemoteError) as info:
        Reply(1, False, "oops").result()
    assert info.value.code is ErrorCode.INTERNAL


# -- malformed requests -----------------------------------------------------------------------


def test_garbage_bytes_are_bad_frame():
    """Bytes that are not msgpack are refused as BadFrame with no request id."""
    exc = refused(b"\xc1\xc1 definitely not msgpack")
    assert type(exc) is BadFrame
    assert exc.code is ErrorCode.BAD_FRAME
    assert exc.request_id is None


def test_trailing_bytes_are_bad_frame():
    """A valid frame followed by extra bytes is refused."""
    assert type(refused(encode_request(1, "ping") + b"\x00")) is BadFrame


def test_empty_frame_is_bad_frame():
    """An empty message is refused as BadFrame."""
    assert type(refused(b"")) is BadFrame


@pytest.mark.parametrize("obj", [{"a": 1}, 7, "ping", None, b"raw"])
def test_non_list_is_bad_frame(obj):
    """A msgpack value that is not an array is refused."""
    assert type(refused(pack(obj))) is BadFrame


@pytest.mark.parametrize("obj", [[], [PROTOCOL_VERSION, 1, "ping"], [PROTOCOL_VERSION, 1, "ping", {}, "extra"]])
def test_wrong_arity_is_bad_frame(obj):
    """An array of other than four elements is refused."""
    assert type(refused(pack(obj))) is BadFrame


def test_wrong_version_is_version_mismatch_and_keeps_id():
    """Another protocol version is VersionMismatch, and the request id is carried for the reply."""
    exc = refused(pack([999, 17, "hello", {}]))
    assert type(exc) is VersionMismatch
    assert exc.code is ErrorCode.VERSION_MISMATCH
    assert exc.request_id == 17
    assert "999" in str(exc)


def test_wrong_version_with_bad_id_has_no_id():
    """VersionMismatch for a frame whose id is not an int carries no id."""
    exc = refused(pack([0, "seventeen", "hello", {}]))
    assert type(exc) is VersionMismatch
    assert exc.request_id is None


@pytest.mark.parametrize("rid", ["1", 1.5, None, True, [1]])
def test_non_int_id_is_bad_frame(rid):
    """A request id that is not an integer (bool included) is refused."""
    exc = refused(pack([PROTOCOL_VERSION, rid, "ping", {}]))
    assert type(exc) is BadFrame
    assert exc.request_id is None


def test_non_string_method_is_bad_frame():
    """A method that is not a string is BadFrame carrying the id."""
    exc = refused(pack([PROTOCOL_VERSION, 3, 12, {}]))
    assert type(exc) is BadFrame
    assert exc.request_id == 3


def test_unknown_method():
    """A method outside METHODS is UnknownMethod carrying the id and naming the method."""
    exc = refused(encode_request(4, "shutdown_everything"))
    assert type(exc) is UnknownMethod
    assert exc.code is ErrorCode.UNKNOWN_METHOD
    assert exc.request_id == 4
    assert "shutdown_everything" in str(exc)


def test_unknown_method_message_is_truncated():
    """A huge method name is not echoed back in full."""
    exc = refused(encode_request(4, "x" * 10_000))
    assert type(exc) is UnknownMethod
    assert len(str(exc)) < 500


@pytest.mark.parametrize("body", [[], "body", 3, None])
def test_body_not_a_map_is_bad_frame(body):
    """A body that is not a map is BadFrame carrying the id."""
    exc = refused(pack([PROTOCOL_VERSION, 6, "ping", body]))
    assert type(exc) is BadFrame
    assert exc.request_id == 6


def test_oversized_frame_is_too_large():
    """A frame longer than max_bytes is TooLarge before it is parsed."""
    data = encode_request(1, "ping", {"pad": "x" * 5000})
    exc = refused(data, max_bytes=4096)
    assert type(exc) is TooLarge
    assert exc.code is ErrorCode.TOO_LARGE
    # the same frame passes with a limit of exactly its length
    assert decode_request(data, len(data)).method == "ping"


def test_oversized_reply_is_too_large():
    """decode_reply applies the same size limit."""
    with pytest.raises(TooLarge):
        decode_reply(encode_reply(1, {"pad": "x" * 5000}), 4096)


def test_nesting_at_max_depth_is_accepted():
    """Nesting of exactly MAX_DEPTH levels is still accepted by unpack."""
    assert unpack(pack(nested(MAX_DEPTH)), LIMIT) == nested(MAX_DEPTH)


def test_nesting_deeper_than_max_depth_is_bad_frame():
    """A frame nesting deeper than MAX_DEPTH is BadFrame (our check, not msgpack's)."""
    with pytest.raises(BadFrame, match="deeper than"):
        unpack(pack(nested(MAX_DEPTH + 1)), LIMIT)
    exc = refused(pack([PROTOCOL_VERSION, 1, "ping", {"deep": nested(MAX_DEPTH)}]))
    assert type(exc) is BadFrame
    assert "deeper than" in str(exc)


def test_deep_nesting_through_maps_is_bad_frame():
    """Maps count toward the depth limit as lists do."""
    obj: dict = {}
    for _ in range(MAX_DEPTH + 1):
        obj = {"k": obj}
    with pytest.raises(BadFrame, match="deeper than"):
        unpack(pack(obj), LIMIT)


def test_non_string_map_keys_are_bad_frame():
    """Map keys other than str/bytes are refused (strict_map_key)."""
    assert type(refused(pack([PROTOCOL_VERSION, 1, "ping", {1: "a"}]))) is BadFrame


# -- malformed replies ------------------------------------------------------------------------


@pytest.mark.parametrize("obj", [{"ok": 1}, [PROTOCOL_VERSION, 1, "ok"], [PROTOCOL_VERSION, 1, "maybe", {}]])
def test_malformed_reply_is_bad_frame(obj):
    """A reply that is not [version, id, ok|error, body] is BadFrame."""
    with pytest.raises(BadFrame):
        decode_reply(pack(obj), LIMIT)


def test_reply_of_other_version_is_version_mismatch():
    """A reply in another protocol version is VersionMismatch."""
    with pytest.raises(VersionMismatch):
        decode_reply(pack([PROTOCOL_VERSION + 1, 1, "ok", {}]), LIMIT)


# -- require ----------------------------------------------------------------------------------


def test_require_returns_the_value():
    """require returns a present field of the right type."""
    assert require({"n": 3, "s": "x"}, "n", int) == 3
    assert require({"n": 3, "s": "x"}, "s", (str, bytes)) == "x"


def test_require_missing_field():
    """A missing field is BadRequest naming the field and carrying the id."""
    with pytest.raises(BadRequest, match="missing field 'graph_key'") as info:
        require({}, "graph_key", str, 12)
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert info.value.request_id == 12


def test_require_wrong_type():
    """A field of the wrong type is BadRequest naming the type it has."""
    with pytest.raises(BadRequest, match="has type int") as info:
        require({"graph_key": 5}, "graph_key", str, 13)
    assert info.value.request_id == 13


def test_require_bool_is_not_an_int():
    """bool is a subclass of int in Python but is not accepted where an int is required."""
    with pytest.raises(BadRequest, match="has type bool"):
        require({"n": True}, "n", int)


# -- over in-process ZeroMQ sockets -----------------------------------------------------------


@pytest.fixture
def router_dealer():
    """A ROUTER bound to a fresh inproc endpoint and a DEALER connected to it."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    dealer = ctx.socket(zmq.DEALER)
    try:
        endpoint = f"inproc://hypatia-test-{uuid.uuid4().hex}"
        router.bind(endpoint)
        dealer.connect(endpoint)
        yield router, dealer
    finally:
        router.close(linger=0)
        dealer.close(linger=0)
        ctx.term()


def recv_within(sock: zmq.Socket, timeout_ms: int = 2000) -> list[bytes]:
    assert sock.poll(timeout_ms, zmq.POLLIN), "no message arrived in time"
    return sock.recv_multipart()


def test_round_trip_over_zmq(router_dealer):
    """A request crosses DEALER->ROUTER as [identity, payload] and its reply comes back."""
    router, dealer = router_dealer
    dealer.send(encode_request(7, "get_plan", {"graph_key": "g1-x"}))
    frames = recv_within(router)
    assert len(frames) == 2
    identity, payload = frames
    request = decode_request(payload, LIMIT)
    assert request == Request(7, "get_plan", {"graph_key": "g1-x"})
    router.send_multipart([identity, encode_reply(request.request_id, {"plan": None})])
    reply = decode_reply(recv_within(dealer)[0], LIMIT)
    assert reply == Reply(7, True, {"plan": None})


def test_garbage_over_zmq_is_answered_with_bad_frame(router_dealer):
    """Garbage from a DEALER is BadFrame on the ROUTER side; an error reply reaches the peer."""
    router, dealer = router_dealer
    dealer.send(b"\xc1 not msgpack \xc1")
    identity, payload = recv_within(router)
    with pytest.raises(BadFrame) as info:
        decode_request(payload, LIMIT)
    router.send_multipart([identity, encode_error(info.value.request_id, info.value.code, str(info.value))])
    reply = decode_reply(recv_within(dealer)[0], LIMIT)
    assert reply.ok is False and reply.request_id is None
    assert reply.body["code"] == ErrorCode.BAD_FRAME


def test_version_must_be_the_integer_itself():
    """True and 1.0 compare equal to 1 in Python; on the wire they are other versions."""
    import pytest as _pytest

    from hypatia.protocol import VersionMismatch, decode_request, pack, require, BadRequest

    for version in (True, 1.0):
        with _pytest.raises(VersionMismatch):
            decode_request(pack([version, 1, "ping", {}]), 1000)
    with _pytest.raises(BadRequest):
        require({"n": True}, "n", (int,))
