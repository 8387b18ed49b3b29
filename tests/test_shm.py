"""hypatia.shm: tensors through /dev/shm segments, descriptors checked as hostile input, and
the sweep of segments whose client is gone."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
import torch

from hypatia import shm

UID, PID = os.getuid(), os.getpid()
DAEMON = "d0test00"  # the id of the daemon these segments are for


@pytest.fixture
def names():
    """Segment names a test creates; whatever is left of them is removed afterwards."""
    made: list[str] = []
    counter = iter(range(10**6))

    def fresh(pid: int = PID, daemon: str = DAEMON) -> str:
        name = shm.segment_name(daemon, pid, f"t{next(counter)}x{os.urandom(3).hex()}")
        made.append(name)
        return name

    yield fresh
    for name in made:
        try:
            os.unlink(os.path.join(shm.SHM_DIR, name))
        except FileNotFoundError:
            pass


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64, torch.int8, torch.int32,
          torch.int64, torch.uint8, torch.bool]


def _layouts(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    base = (torch.randn(6, 8) * 50).to(dtype) if dtype != torch.complex64 else torch.randn(6, 8, dtype=dtype)
    return {
        "contiguous": base,
        "transposed": base.t(),
        "strided": base[:, ::3],
        "offset": base[2:5, 1:],
        "expanded": base[:1].expand(4, 8),  # travels contiguous: overlapping strides are refused
        "zero-size": base[:0],
        "zero-dim": base[1, 1].clone(),
        "4d channels-last": torch.zeros(2, 3, 4, 5).to(dtype).contiguous(memory_format=torch.channels_last),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_keeps_values_shape_strides_and_dtype(names, dtype):
    for layout, t in _layouts(dtype).items():
        desc = shm.put(t, names())
        wire = desc.to_wire()
        back = shm.read(shm.Descriptor.parse(wire))
        stride = t.contiguous().stride() if layout == "expanded" else t.stride()
        assert back.dtype == t.dtype and back.shape == t.shape and back.stride() == stride, layout
        assert torch.equal(back, t), layout
        if desc.name is not None:
            assert shm.unlink(desc.name)


def test_zero_size_tensor_needs_no_segment(names):
    desc = shm.put(torch.empty(0, 5), names())
    assert desc.name is None and desc.nbytes == 0
    assert shm.read(shm.Descriptor.parse(desc.to_wire())).shape == (0, 5)
    assert shm.names_of(PID) == []


def test_segment_is_private_named_for_its_client_and_sized_to_the_span(names):
    t = torch.arange(24, dtype=torch.float32).reshape(4, 6)[:, ::2]  # span 1 + 3*6 + 2*2 = 23 elements
    desc = shm.put(t, names())
    info = os.stat(os.path.join(shm.SHM_DIR, desc.name))
    assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == UID
    assert info.st_size == desc.nbytes == 23 * 4
    assert shm.parse_name(desc.name)[:3] == (UID, DAEMON, PID)
    assert desc.name in shm.names_of(PID)


def test_read_copies_out_so_the_segment_can_go_at_once(names):
    desc = shm.put(torch.ones(16), names())
    back = shm.read(desc)
    shm.unlink(desc.name)
    assert back.sum().item() == 16 and not shm.exists(desc.name)


def test_put_never_overwrites_an_existing_segment(names):
    name = names()
    shm.put(torch.ones(4), name)
    with pytest.raises(FileExistsError):
        shm.put(torch.zeros(4), name)
    assert torch.equal(shm.read(shm.Descriptor(name, "float32", (4,), (1,), 0, 16)), torch.ones(4))


@pytest.mark.parametrize("tensor", [
    torch.ones(2, 2).to_sparse(),
    torch.ones(3, device="meta"),
    torch.ones(3, dtype=torch.uint16),
], ids=["sparse", "meta", "uint16"])
def test_what_cannot_travel_is_not_shareable(names, tensor):
    with pytest.raises(shm.NotShareable):
        shm.put(tensor, names())
    assert shm.names_of(PID) == []


def _wire(segment, **changes):
    return {"name": segment, "dtype": "float32", "shape": [4], "stride": [1], "offset": 0, "nbytes": 16} | changes


@pytest.mark.parametrize("changes, message", [
    ({"name": f"hypatia-{UID + 1}-{DAEMON}-{PID}-abc"}, "belongs to uid"),
    ({"name": "../../etc/passwd"}, "is not of the form"),
    ({"name": f"hypatia-{UID}-{DAEMON}-{PID}-../../x"}, "is not of the form"),
    ({"name": f"hypatia-{UID}-{DAEMON}-{PID}-a/b"}, "is not of the form"),
    ({"name": f"hypatia-{UID}-{DAEMON}-0-abc"}, "names no process"),
    ({"name": 7}, "is not of the form"),
    ({"dtype": "float128"}, "is not one of"),
    ({"dtype": "object"}, "is not one of"),
    ({"dtype": None}, "is not one of"),
    ({"shape": [-4]}, "each entry"),
    ({"stride": [-1]}, "each entry"),
    ({"shape": [True]}, "each entry"),
    ({"shape": [2**60]}, "each entry"),
    ({"shape": [1] * 17, "stride": [1] * 17}, "at most"),
    ({"shape": "4"}, "list"),
    ({"stride": [1, 1]}, "entries for a shape"),
    ({"offset": -1}, "offset"),
    ({"nbytes": 8}, "layout reads 16 bytes"),
    ({"nbytes": 2**62}, "nbytes"),
    ({"shape": [4, 4], "stride": [4, 1]}, "layout reads 64 bytes"),
    ({"name": None}, "without elements"),
    ({"shape": [2**28], "stride": [0], "nbytes": 4}, "268435456 elements but its strides .* reach only 1"),
    ({"shape": [4, 4], "stride": [1, 1], "nbytes": 28}, "overlapping strides"),
], ids=lambda v: str(v)[:40].replace(str(PID), "PID"))  # the same ids in every worker process
def test_hostile_descriptor_is_refused_before_any_segment_is_touched(changes, message):
    with pytest.raises(shm.BadDescriptor, match=message):
        shm.Descriptor.parse(_wire(shm.segment_name(DAEMON, PID, "abc"), **changes))


def test_descriptor_must_belong_to_the_requesting_client_and_request():
    with pytest.raises(shm.BadDescriptor, match="not to the requesting process"):
        shm.Descriptor.parse(_wire(shm.segment_name(DAEMON, PID + 1, "abci0")), pid=PID)
    with pytest.raises(shm.BadDescriptor, match="not part of request"):
        shm.Descriptor.parse(_wire(shm.segment_name(DAEMON, PID, "zzzi0")), pid=PID, tag_prefix="abci")


def test_descriptor_must_name_the_daemon_it_is_sent_to():
    with pytest.raises(shm.BadDescriptor, match="named for daemon d0test00, not for this one"):
        shm.Descriptor.parse(_wire(shm.segment_name(DAEMON, PID, "abci0")), pid=PID, daemon="d1other0")
    assert shm.Descriptor.parse(_wire(shm.segment_name(DAEMON, PID, "abci0")), pid=PID, daemon=DAEMON).name


def test_daemon_ids_are_stable_per_socket_and_differ_between_sockets():
    first = shm.daemon_id("/tmp/hy-a/run/hypatiad.sock")
    assert shm.DAEMON_RE.fullmatch(first) and first == shm.daemon_id("/tmp/hy-a/run/hypatiad.sock")
    assert first != shm.daemon_id("/tmp/hy-b/run/hypatiad.sock")
    with pytest.raises(ValueError, match="daemon id"):
        shm.segment_name("../x", PID, "abc")


def test_descriptor_must_match_the_segment_it_names(names):
    name = names()
    shm.put(torch.ones(4), name)
    with pytest.raises(shm.BadDescriptor, match="holds 16 bytes, not the 64"):
        shm.check(shm.Descriptor.parse(_wire(name, nbytes=64, shape=[16])))
    with pytest.raises(shm.BadDescriptor, match="does not exist"):
        shm.check(shm.Descriptor.parse(_wire(names())))


def test_segment_of_loose_mode_or_a_symlink_is_refused(names, tmp_path):
    loose = names()
    shm.put(torch.ones(4), loose)
    os.chmod(os.path.join(shm.SHM_DIR, loose), 0o644)
    with pytest.raises(shm.BadDescriptor, match="not private"):
        shm.read(shm.Descriptor.parse(_wire(loose)))
    target = tmp_path / "secret"
    target.write_bytes(b"x" * 16)
    link = names()
    os.symlink(target, os.path.join(shm.SHM_DIR, link))
    with pytest.raises(shm.BadDescriptor, match="cannot be opened"):
        shm.read(shm.Descriptor.parse(_wire(link)))


def test_truncated_segment_is_a_clean_error_not_a_crash(names):
    name = names()
    shm.put(torch.ones(4), name)
    desc = shm.Descriptor.parse(_wire(name))
    fd = shm.open_checked(desc)
    os.truncate(os.path.join(shm.SHM_DIR, name), 4)  # a peer shrinks it after the checks
    os.close(fd)
    with pytest.raises(shm.BadDescriptor):
        shm.read(desc)


def test_request_bounds():
    one = _wire(shm.segment_name(DAEMON, PID, "a"))
    with pytest.raises(shm.BadDescriptor, match="at most"):
        shm.parse_all([one] * (shm.MAX_TENSORS + 1))
    with pytest.raises(shm.BadDescriptor, match="named twice"):
        shm.parse_all([one, one])
    big = [_wire(shm.segment_name(DAEMON, PID, f"a{k}"), shape=[shm.MAX_SEGMENT_BYTES // 4], nbytes=shm.MAX_SEGMENT_BYTES)
           for k in range(2)]
    with pytest.raises(shm.BadDescriptor, match="above the limit"):
        shm.parse_all(big)
    assert shm.parse_all([None, one])[0] is None


def test_unlink_touches_only_this_users_segment_names():
    with pytest.raises(shm.BadDescriptor):
        shm.unlink("../../tmp/x")
    assert shm.unlink(shm.segment_name(DAEMON, PID, "neverthere")) is False


def test_sweep_removes_the_segments_of_dead_clients_only(names):
    dead = _dead_pid()
    gone = [names(dead) for _ in range(3)]
    kept = names()
    for name in [*gone, kept]:
        shm.put(torch.ones(8), name)
    other = os.path.join(shm.SHM_DIR, f"hypatia-{UID}-{DAEMON}-{dead}-NOT_A_TAG")
    open(other, "w").close()
    try:
        removed = shm.sweep(DAEMON)
        assert set(gone) <= set(removed) and kept not in removed
        assert shm.exists(kept) and os.path.exists(other)
        assert shm.names_of(dead) == []
    finally:
        os.unlink(other)


def test_sweep_touches_only_its_own_daemons_segments(names):
    """Two daemons of one user: each sweeps the dead clients' segments named for it, never the
    other's (which may be in use by that daemon, or be that daemon's to count)."""
    dead = _dead_pid()
    mine = [names(dead) for _ in range(2)]
    theirs = [names(dead, daemon="d1other0") for _ in range(2)]
    for name in [*mine, *theirs]:
        shm.put(torch.ones(4), name)
    assert sorted(shm.sweep(DAEMON)) == sorted(mine)
    assert all(shm.exists(n) for n in theirs) and sorted(shm.names_of(dead)) == sorted(theirs)
    assert sorted(shm.sweep("d1other0")) == sorted(theirs)


def test_sweep_asks_about_each_pid_once(names):
    for _ in range(4):
        shm.put(torch.ones(2), names(pid=2**22 + 17))
    asked: list[int] = []
    shm.sweep(DAEMON, alive=lambda pid: asked.append(pid) or (pid != 2**22 + 17 and shm.pid_alive(pid)))
    assert asked.count(2**22 + 17) == 1


def test_an_expanded_tensor_travels_contiguous_in_a_segment_of_its_elements(names):
    t = torch.arange(8, dtype=torch.float32)[None].expand(1000, 8)  # 32 bytes of storage, 8000 elements
    desc = shm.put(t, names())
    assert desc.stride == (8, 1) and desc.nbytes == 8000 * 4
    assert torch.equal(shm.read(shm.Descriptor.parse(desc.to_wire())), t)


def test_a_sparse_segment_is_refused_before_it_is_read(names):
    """A segment truncated to a size but never written costs its maker nothing; reading it would
    cost the reader all of it."""
    name = names()
    fd = os.open(os.path.join(shm.SHM_DIR, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.ftruncate(fd, 1 << 20)
    os.close(fd)
    desc = shm.Descriptor.parse(_wire(name, shape=[1 << 18], nbytes=1 << 20))
    with pytest.raises(shm.BadDescriptor, match="is sparse"):
        shm.read(desc)
