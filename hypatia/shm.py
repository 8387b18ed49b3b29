"""CPU tensors through POSIX shared memory: the payload path of remote mode.

A tensor travels as a segment under ``/dev/shm`` and a small descriptor in the msgpack message:
``{"name", "dtype", "shape", "stride", "offset", "nbytes"}``. The segment holds the tensor's
storage span (every element its strides reach, gaps included), so a transposed or sliced
tensor arrives with the strides it left with. Overlapping strides (an expanded dimension's 0)
are refused: a 4-byte segment would otherwise stand for a tensor of any size, and whoever
computes on it would allocate accordingly; such a tensor travels contiguous. A tensor without
elements has no segment (``name`` is None).

Ownership. A segment is named ``hypatia-<uid>-<daemon>-<pid>-<tag>``, where ``daemon`` is the id
of the daemon the call goes to (it gives it out in its ``hello`` reply; see :func:`daemon_id`) and
``pid`` the *client* process it belongs to, whoever created it: the client's request segments and
the daemon's reply segments for that client both carry the client's pid. The client unlinks all
of them as soon as it has read the reply, or given up on it; if the client dies first, its
daemon's :func:`sweep` removes every segment of that daemon whose pid is no longer alive. Several
daemons of one user (a ``HYPATIA_HOME`` each) never touch each other's segments. The daemon
unlinks nothing else but outputs that nobody will read (its run failed, or the client gave up or
died while it ran).

Reading copies out, with read(2) into a fresh buffer, rather than mapping: the tensor owns its
memory, so the segment can be unlinked at once whatever the caller keeps; and a segment that a
peer truncates underneath is a short read, a clean :class:`BadDescriptor`, never the SIGBUS an
mmap would raise in the daemon. Writing creates the segment ``O_EXCL`` with mode 0600 and fills
it with write(2), so a full ``/dev/shm`` is ENOSPC here, not a SIGBUS on first touch.

Every descriptor read from the wire goes through :meth:`Descriptor.parse` and, when opened,
is checked against the segment itself (owner, mode, size). torch is imported only by the
functions that handle tensors: the daemon validates and sweeps without loading it.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

from hypatia.protocol import BadRequest

if TYPE_CHECKING:
    import torch

SHM_DIR = "/dev/shm"
PREFIX = "hypatia"
# uid, daemon, pid, tag; the tag alphabet keeps names free of '/', '.', and anything a shell would expand
NAME_RE = re.compile(r"hypatia-([0-9]{1,10})-([0-9a-z]{8})-([0-9]{1,10})-([0-9a-z]{1,64})")
TAG_RE = re.compile(r"[0-9a-z]{1,48}")
DAEMON_RE = re.compile(r"[0-9a-z]{8}")

# Element sizes of the dtypes that may travel; a name outside this table is refused.
ITEMSIZE = {
    "float32": 4, "float64": 8, "float16": 2, "bfloat16": 2, "complex64": 8, "complex128": 16,
    "int8": 1, "int16": 2, "int32": 4, "int64": 8, "uint8": 1, "bool": 1,
}
MAX_DIMS = 16
MAX_DIM_SIZE = 1 << 48
MAX_SEGMENT_BYTES = 1 << 36  # one tensor
MAX_TRANSFER_BYTES = 1 << 36  # all tensors of one request or reply
INLINE_UP_TO = 64 << 10  # a tensor this small rides inside the message: a segment's system calls cost more
MAX_TENSORS = 4096  # per request or reply
_WRITE_CHUNK = 1 << 30  # write(2) moves at most ~2 GiB per call on Linux


class BadDescriptor(BadRequest):
    """A tensor descriptor that is malformed, names a segment that is not this user's, or does
    not match the segment it names; answered as BAD_REQUEST."""


class NotShareable(Exception):
    """A tensor that cannot travel through shared memory (not a dense CPU tensor, or of a dtype
    outside :data:`ITEMSIZE`); the caller runs it locally."""


def daemon_id(socket_path: str | os.PathLike) -> str:
    """The id a daemon names its segments with: 8 characters derived from its socket path, so
    that it is the same across restarts of one daemon (which then sweeps what its predecessor's
    dead clients left) and differs between the daemons of one user."""
    return hashlib.sha256(os.fsencode(socket_path)).hexdigest()[:8]


def segment_name(daemon: str, pid: int, tag: str) -> str:
    """The segment name for a call to ``daemon`` by client ``pid``, with a ``tag`` unique within
    that client."""
    if not DAEMON_RE.fullmatch(daemon):
        raise ValueError(f"daemon id {daemon!r} must be 8 characters of [0-9a-z]")
    if not TAG_RE.fullmatch(tag):
        raise ValueError(f"segment tag {tag!r} must be 1-48 characters of [0-9a-z]")
    return f"{PREFIX}-{os.getuid()}-{daemon}-{pid}-{tag}"


def parse_name(name: Any) -> tuple[int, str, int, str]:
    """``(uid, daemon, pid, tag)`` of a segment name of this user, else :class:`BadDescriptor`."""
    match = NAME_RE.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise BadDescriptor(f"segment name {str(name)[:80]!r} is not of the form hypatia-<uid>-<daemon>-<pid>-<tag>")
    uid, daemon, pid, tag = int(match[1]), match[2], int(match[3]), match[4]
    if uid != os.getuid():
        raise BadDescriptor(f"segment {name} belongs to uid {uid}, not to this user (uid {os.getuid()})")
    if pid <= 0:
        raise BadDescriptor(f"segment {name} names no process")
    return uid, daemon, pid, tag


def span(shape: Iterable[int], stride: Iterable[int]) -> int:
    """Elements of storage a strided layout reaches (0 for a tensor without elements)."""
    shape, stride = list(shape), list(stride)
    if any(s == 0 for s in shape):
        return 0
    return 1 + sum((s - 1) * st for s, st in zip(shape, stride))


def numel(shape: Iterable[int]) -> int:
    """Elements of a tensor of ``shape``."""
    n = 1
    for s in shape:
        n *= s
    return n


def int_list(value: Any, what: str) -> list[int]:
    """``value`` if it is a shape or strides as a descriptor may carry them; BadDescriptor if not."""
    if not isinstance(value, list) or len(value) > MAX_DIMS:
        raise BadDescriptor(f"{what} must be a list of at most {MAX_DIMS} integers")
    for v in value:
        if type(v) is not int or not 0 <= v <= MAX_DIM_SIZE:
            raise BadDescriptor(f"{what} holds {str(v)[:40]!r}; each entry must be an integer in [0, 2**48]")
    return value


@dataclass(frozen=True)
class Descriptor:
    """One tensor in shared memory: segment ``name`` (None for no elements), element type,
    layout, and the segment's exact size in bytes."""

    name: str | None
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def needed(self) -> int:
        """Bytes of segment the layout reads."""
        elements = span(self.shape, self.stride)
        return (self.offset + elements) * ITEMSIZE[self.dtype] if elements else 0

    def to_wire(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "stride": list(self.stride),
                "offset": self.offset, "nbytes": self.nbytes}

    @classmethod
    def parse(cls, obj: Any, pid: int | None = None, tag_prefix: str | None = None,
              daemon: str | None = None) -> "Descriptor":
        """A descriptor received from a peer, checked without touching the segment: the name is
        this user's (and ``daemon``'s, client ``pid``'s, its tag starting with ``tag_prefix``,
        when given), the
        dtype allow-listed, the layout non-negative and within :data:`MAX_SEGMENT_BYTES`, and
        ``nbytes`` covers what the layout reads."""
        if not isinstance(obj, dict):
            raise BadDescriptor("a tensor descriptor must be a map")
        dtype = obj.get("dtype")
        if not isinstance(dtype, str) or dtype not in ITEMSIZE:
            raise BadDescriptor(f"dtype {str(dtype)[:40]!r} is not one of {', '.join(ITEMSIZE)}")
        shape = int_list(obj.get("shape"), "shape")
        stride = int_list(obj.get("stride"), "stride")
        if len(stride) != len(shape):
            raise BadDescriptor(f"stride has {len(stride)} entries for a shape of {len(shape)}")
        offset, nbytes = obj.get("offset"), obj.get("nbytes")
        if type(offset) is not int or not 0 <= offset <= MAX_SEGMENT_BYTES:
            raise BadDescriptor("offset must be a non-negative integer")
        if type(nbytes) is not int or not 0 <= nbytes <= MAX_SEGMENT_BYTES:
            raise BadDescriptor(f"nbytes must be an integer in [0, {MAX_SEGMENT_BYTES}]")
        name = obj.get("name")
        desc = cls(None, dtype, tuple(shape), tuple(stride), offset, nbytes)
        needed = desc.needed
        if needed > nbytes:
            raise BadDescriptor(f"layout reads {needed} bytes but the segment is said to hold {nbytes}")
        elements, spanned = numel(shape), span(shape, stride)
        if elements > spanned:  # strides that overlap (such as 0) would make many elements of each stored one
            raise BadDescriptor(f"shape {shape[:4]}{'...' if len(shape) > 4 else ''} has {elements} elements but its "
                                f"strides {stride[:4]}{'...' if len(stride) > 4 else ''} reach only {spanned} stored "
                                "ones: overlapping strides (such as 0) are refused; send the tensor contiguous")
        if name is None:
            if needed or nbytes:
                raise BadDescriptor("only a tensor without elements may come without a segment")
            return desc
        _, named, owner, tag = parse_name(name)
        if daemon is not None and named != daemon:
            raise BadDescriptor(f"segment {name} is named for daemon {named}, not for this one ({daemon})")
        if pid is not None and owner != pid:
            raise BadDescriptor(f"segment {name} belongs to process {owner}, not to the requesting process {pid}")
        if tag_prefix is not None and not tag.startswith(tag_prefix):
            raise BadDescriptor(f"segment {name} is not part of request {tag_prefix}")
        if nbytes == 0:
            raise BadDescriptor(f"segment {name} is empty")
        return cls(name, dtype, tuple(shape), tuple(stride), offset, nbytes)


def parse_all(objs: Any, pid: int | None = None, tag_prefix: str | None = None,
              daemon: str | None = None) -> list[Descriptor | None]:
    """Descriptors of one request or reply; ``None`` entries stand for non-tensor values. The
    list and the bytes it names are bounded."""
    if not isinstance(objs, list) or len(objs) > MAX_TENSORS:
        raise BadDescriptor(f"tensors must be a list of at most {MAX_TENSORS} descriptors")
    descs = [None if o is None else Descriptor.parse(o, pid, tag_prefix, daemon) for o in objs]
    total = sum(d.nbytes for d in descs if d is not None)
    if total > MAX_TRANSFER_BYTES:
        raise BadDescriptor(f"the tensors name {total} bytes, above the limit of {MAX_TRANSFER_BYTES}")
    names = [d.name for d in descs if d is not None and d.name is not None]
    if len(set(names)) != len(names):
        raise BadDescriptor("a segment is named twice")
    return descs


# -- segments ------------------------------------------------------------------------------
def _path(name: str) -> str:
    return os.path.join(SHM_DIR, name)


def open_checked(desc: Descriptor) -> int:
    """An fd open for reading on ``desc``'s segment, after checking that it is a regular file of
    this user, of mode 0600 or stricter, exactly ``desc.nbytes`` long. The caller closes it."""
    assert desc.name is not None
    try:
        fd = os.open(_path(desc.name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise BadDescriptor(f"segment {desc.name} does not exist (removed, or never created)") from None
    except OSError as exc:  # ELOOP for a symlink, EACCES, ...
        raise BadDescriptor(f"segment {desc.name} cannot be opened: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BadDescriptor(f"segment {desc.name} is not a regular file")
        if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
            raise BadDescriptor(f"segment {desc.name} is not private to this user (owner {info.st_uid}, "
                                f"mode {stat.S_IMODE(info.st_mode):o})")
        if info.st_size != desc.nbytes:
            raise BadDescriptor(f"segment {desc.name} holds {info.st_size} bytes, not the {desc.nbytes} described")
        if info.st_blocks * 512 < info.st_size:  # truncated to its size, never written: reading it would allocate
            raise BadDescriptor(f"segment {desc.name} is sparse: {info.st_size} bytes long, {info.st_blocks * 512} "
                                "of them written")
    except BaseException:
        os.close(fd)
        raise
    return fd


def check(desc: Descriptor) -> None:
    """Check ``desc`` against its segment without reading it (see :func:`open_checked`)."""
    if desc.name is not None:
        os.close(open_checked(desc))


def create(name: str, data: memoryview) -> None:
    """A new segment ``name`` (mode 0600, never an existing file) holding ``data``; nothing is
    left behind when it fails."""
    fd = os.open(_path(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        view = data.cast("B")
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:done + _WRITE_CHUNK])
    except BaseException:
        os.close(fd)
        unlink(name)
        raise
    os.close(fd)


def unlink(name: str) -> bool:
    """Remove segment ``name`` (one of this user's names only); whether it existed."""
    parse_name(name)
    try:
        os.unlink(_path(name))
        return True
    except FileNotFoundError:
        return False


def exists(name: str) -> bool:
    """Whether segment ``name`` is still there (its client unlinks its inputs when it gives up)."""
    return os.path.lexists(_path(name))


def names_of(pid: int) -> list[str]:
    """This user's segments that belong to client ``pid`` (whichever daemon they name)."""
    prefix = f"{PREFIX}-{os.getuid()}-"
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in entries if n.startswith(prefix) and (m := NAME_RE.fullmatch(n)) and int(m[3]) == pid)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a zombie counts until it is reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: not ours to judge dead
        return True
    return True


def sweep(daemon: str, alive: Callable[[int], bool] = pid_alive) -> list[str]:
    """Unlink the segments of ``daemon`` whose client process is gone; returns their names. Only
    regular files owned by this user and named by :data:`NAME_RE` for that daemon are touched:
    another daemon's segments are its own business, even those of its dead clients."""
    prefix = f"{PREFIX}-{os.getuid()}-{daemon}-"
    removed: list[str] = []
    verdicts: dict[int, bool] = {}
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return removed
    for name in entries:
        if not name.startswith(prefix):
            continue
        match = NAME_RE.fullmatch(name)
        if match is None:
            continue
        pid = int(match[3])
        if pid not in verdicts:
            verdicts[pid] = pid > 0 and alive(pid)
        if verdicts[pid]:
            continue
        try:
            info = os.lstat(_path(name))
            if stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid():
                os.unlink(_path(name))
                removed.append(name)
        except FileNotFoundError:  # its client or another sweep got there first
            pass
    return removed


# -- tensors -------------------------------------------------------------------------------
def put(tensor: "torch.Tensor", name: str) -> Descriptor:
    """Copy ``tensor`` (a dense CPU tensor) into a new segment ``name``; its descriptor."""
    import torch

    if type(tensor) not in (torch.Tensor, torch.nn.Parameter):  # fake, functional and other subclasses
        raise NotShareable(f"a {type(tensor).__name__} cannot travel through shared memory")
    dtype = str(tensor.dtype).removeprefix("torch.")
    if tensor.layout != torch.strided or tensor.device.type != "cpu" or dtype not in ITEMSIZE or tensor.is_quantized:
        raise NotShareable(f"a tensor of dtype {dtype} on {tensor.device} ({tensor.layout}) cannot travel "
                           "through shared memory")
    shape, stride = tuple(tensor.shape), tuple(tensor.stride())
    elements = span(shape, stride)
    if elements == 0:
        return Descriptor(None, dtype, shape, stride, 0, 0)
    # The storage span as a flat run of bytes, so that gaps (a slice, a transpose) travel as they are.
    flat = tensor.detach().resolve_conj().resolve_neg()
    if tensor.numel() > elements:  # overlapping strides (expanded dims) are refused by Descriptor.parse
        flat = flat.contiguous()
        stride, elements = flat.stride(), flat.numel()
    elif flat.stride() != stride:  # resolving copied: lay it out as the original was
        flat = torch.empty_strided(shape, stride, dtype=flat.dtype).copy_(flat)
    raw = flat.as_strided((elements,), (1,), flat.storage_offset()).view(torch.uint8)
    create(name, memoryview(raw.numpy()))
    return Descriptor(name, dtype, shape, stride, 0, elements * ITEMSIZE[dtype])


def read(desc: Descriptor) -> "torch.Tensor":
    """A new tensor holding a copy of what ``desc`` describes (checked against the segment). The
    segment is left in place: its owner unlinks it."""
    import torch

    dtype = getattr(torch, desc.dtype)
    if desc.name is None:
        return torch.empty_strided(desc.shape, desc.stride, dtype=dtype)
    fd = open_checked(desc)
    try:
        buf = torch.empty(desc.needed, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], done)
            if got == 0:
                raise BadDescriptor(f"segment {desc.name} ended after {done} of {len(view)} bytes (truncated while read)")
            done += got
    finally:
        os.close(fd)
    return buf.view(dtype).as_strided(desc.shape, desc.stride, desc.offset)


def to_inline(tensor: "torch.Tensor") -> dict:
    """A CPU tensor carried inside a message (to or from a host that shares no memory with
    this one): ``{"bytes", "dtype", "shape"}``, contiguous."""
    import torch

    dense = tensor.detach().contiguous()
    raw = dense.reshape(-1).view(torch.uint8).numpy().tobytes() if dense.numel() else b""
    return {"bytes": raw, "dtype": str(dense.dtype).removeprefix("torch."), "shape": list(dense.shape)}


def from_inline(data: Any) -> "torch.Tensor":
    """The tensor of a :func:`to_inline` entry read from the wire, checked; :class:`BadDescriptor`."""
    import torch

    raw, dtype, shape = data.get("bytes"), data.get("dtype"), data.get("shape")
    if not isinstance(raw, bytes) or dtype not in ITEMSIZE:
        raise BadDescriptor("inline tensor data needs bytes and a dtype of " + ", ".join(ITEMSIZE))
    shape = int_list(shape, "shape")
    if len(raw) != numel(shape) * ITEMSIZE[dtype]:
        raise BadDescriptor(f"{len(raw)} bytes do not make a {dtype}{shape}")
    if not raw:
        return torch.empty(shape, dtype=getattr(torch, dtype))
    return torch.frombuffer(bytearray(raw), dtype=getattr(torch, dtype)).reshape(shape)
