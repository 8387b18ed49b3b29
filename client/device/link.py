"""The client's side of the ``device`` requests: one session per process, its handles, and the
tensors that go up and come down.

Same host: tensors travel through private shared memory (:mod:`hypatia.shm`), or as CUDA IPC
handles where this process has the daemon's GPU (a CUDA tensor moved to the device, a value
moved to that GPU); another host (``HYPATIA_CONNECT``, over the CURVE TCP listener): inside the
message. A daemon that is gone,
or that no longer knows this session (it restarted), makes every later use raise
:class:`DeviceLost`: tensors on a lost device cannot be recomputed behind the user's back.
"""

from __future__ import annotations

import atexit
import hashlib
import itertools
import os
import secrets
import threading
from collections import Counter, OrderedDict
from typing import Any, Callable

import torch

from hypatia import shm
from hypatia.canonical import workload_key
from hypatia.client.capture import capture, encode_meta
from hypatia.device.values import Value
from hypatia.client.rpc import DaemonClient, DaemonGone, DaemonUnavailable
from hypatia.config import Config
from hypatia.protocol import ErrorCode, RemoteError

SHARE_ABOVE = 16 << 20  # uploads this large (and parameters) are named by digest, to be shared
STRUCTURES = 512  # flushed structures whose keys a link remembers
RELEASE_BATCH = 4096  # released handles that make a request of their own


class DeviceError(RuntimeError):
    """The hypatia device could not do what was asked; the message says why and what to do."""


class DeviceLost(DeviceError):
    """hypatiad went away (or restarted) while it held this process's tensors: they are gone.
    ``unresponsive``: it runs, but did not answer in time."""

    def __init__(self, message: str, unresponsive: bool = False):
        super().__init__(message)
        self.unresponsive = unresponsive


class DeviceFull(DeviceError, torch.OutOfMemoryError if hasattr(torch, "OutOfMemoryError") else RuntimeError):
    """The daemon's device memory limit would be passed."""


def content_digest(t: torch.Tensor) -> str:
    """What names a tensor's content in the daemon (dtype, shape and bytes)."""
    data = t.detach().contiguous().cpu()
    h = hashlib.blake2b(digest_size=32)
    h.update(f"{data.dtype}|{tuple(data.shape)}|".encode())
    if data.numel():
        h.update(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


class Link:
    # read through the instance: a value collected at interpreter exit, after the module's
    # globals are cleared, still finds it
    release_batch = RELEASE_BATCH

    def __init__(self, config: Config):
        self.config = config
        self.client = DaemonClient(config, timeout_ms=config.run_timeout_ms)
        self.session = secrets.token_hex(16)
        self.pid = os.getpid()
        self._handles = itertools.count(1)
        self._released: list[int] = []
        self._info: dict | None = None
        self._structures: OrderedDict[tuple, tuple] = OrderedDict()  # a flush's structure -> keys, registration
        self.lost: str | None = None
        self.held_any = False
        self.bytes_up = self.bytes_down = 0  # through host memory (shared memory, messages)
        self.bytes_ipc_up = self.bytes_ipc_down = 0  # GPU to GPU (CUDA IPC)
        self._same_gpu: dict[int, bool] = {}
        self.late: set[str] = set()  # tags of requests not answered in time: their reply segments may come
        self.counters: Counter = Counter()
        self._lock = threading.Lock()
        atexit.register(self.close)

    # -- requests ----------------------------------------------------------------------------
    def _call(self, op: str, body: dict | None = None, **kwargs: Any) -> Any:
        if self.lost is not None:
            raise DeviceLost(self.lost)
        body = {"op": op, "session": self.session, "pid": self.pid} | (body or {})
        try:
            return self.client.call("device", body, retries=0 if op == "execute" else None, **kwargs)
        except DaemonGone as exc:
            if not self.held_any and self.config.autostart and not self.config.remote:
                from hypatia.client.autostart import ensure_daemon

                ensure_daemon(self.config)
                return self.client.call("device", body, retries=0 if op == "execute" else None, **kwargs)
            raise self._lose(f"hypatiad is not running ({exc})") from None
        except DaemonUnavailable as exc:
            if "tag" in body:
                self.late.add(body["tag"])
            raise self._lose(f"hypatiad did not answer ({exc})", unresponsive=True) from None
        except RemoteError as exc:
            if exc.code == ErrorCode.TOO_LARGE:
                raise DeviceFull(exc.remote_message) from None
            if "session is unknown" in exc.remote_message or "is not held by this session" in exc.remote_message:
                raise self._lose("hypatiad restarted since this process put tensors on the device") from None
            raise DeviceError(f"the hypatia device refused {op}: {exc.remote_message}") from None

    def _lose(self, why: str, unresponsive: bool = False) -> DeviceLost:
        if self.held_any:
            self.lost = (f"the hypatia device is lost: {why}. Its tensors (parameters, optimizer state, activations) "
                         "cannot be recomputed; start hypatiad and move the model there again (keep a copy with "
                         "model.to('cpu') before risky steps)")
            return DeviceLost(self.lost, unresponsive)
        return DeviceLost(f"the hypatia device is unavailable: {why}; start it with `hypatiad start`", unresponsive)

    def info(self) -> dict:
        if self._info is None:
            self._info = self._call("info")
        return self._info

    def stats(self) -> dict:
        """The daemon's device figures now (``info`` is kept for keys; this is asked afresh)."""
        return self._call("info")

    def device_type(self) -> str:
        return self.info()["device_type"]

    def _daemon(self) -> str:
        self.info()
        return (self.client.server or {}).get("daemon") or self._info["daemon"]

    def forget(self, handle: int) -> None:
        """A value naming ``handle`` was collected: release it with the next request."""
        self._released.append(handle)
        if len(self._released) >= self.release_batch and self.lost is None:
            self.release_now()

    def release_now(self) -> None:
        with self._lock:
            handles, self._released = self._released, []
        if handles:
            try:
                self._call("release", {"handles": handles})
            except DeviceError:
                pass

    # -- tensors up and down -----------------------------------------------------------------
    def cuda_ipc(self, device: torch.device) -> bool:
        """Whether tensors on ``device`` (this process's) travel to and from the daemon by CUDA IPC
        handle: a daemon on this host whose GPU is that one (by UUID)."""
        if device.type != "cuda" or self.config.remote or self.info().get("device_uuid") is None:
            return False
        index = device.index if device.index is not None else torch.cuda.current_device()
        same = self._same_gpu.get(index)
        if same is None:
            same = self._same_gpu[index] = str(torch.cuda.get_device_properties(index).uuid) == self.info()["device_uuid"]
        return same

    def _pack(self, t: torch.Tensor, tag: str, k: int, made: list[str]) -> dict:
        t = t.detach().contiguous()
        nbytes = t.numel() * t.element_size()
        if t.device.type != "cpu":
            if nbytes > shm.INLINE_UP_TO and self.cuda_ipc(t.device):
                from hypatia.client.torch_internals import cuda_ipc_export

                self.bytes_ipc_up += nbytes
                return {"cuda_ipc": cuda_ipc_export(t) | {"uuid": self.info()["device_uuid"]}}
            t = t.cpu()
        self.bytes_up += nbytes
        if self.config.remote or nbytes <= shm.INLINE_UP_TO:
            return shm.to_inline(t)
        desc = shm.put(t, shm.segment_name(self._daemon(), self.pid, f"{tag}u{k}"))
        if desc.name:
            made.append(desc.name)
        return desc.to_wire()

    def _unpack(self, entry: dict, tag: str, into: torch.device | None = None) -> torch.Tensor:
        if "cuda_ipc" in entry:  # asked for on this GPU: copied now, while this process holds the value
            from hypatia.client.torch_internals import cuda_ipc_import

            if into is None or into.type != "cuda":
                raise DeviceError("hypatiad sent a CUDA IPC handle that was not asked for")
            index = into.index if into.index is not None else torch.cuda.current_device()
            with torch.cuda.device(index):
                out = cuda_ipc_import(entry["cuda_ipc"], index).clone()
            self.bytes_ipc_down += out.numel() * out.element_size()
            return out
        if "bytes" in entry:
            out = shm.from_inline(entry)
        else:
            desc = shm.Descriptor.parse(entry, self.pid, tag + "o", self._daemon())
            try:
                out = shm.read(desc)
            finally:
                if desc.name:
                    shm.unlink(desc.name)
        self.bytes_down += out.numel() * out.element_size()
        return out

    def upload(self, values: list[Value], defer: bool = False) -> list[tuple[int, Value]]:
        """Send the CPU tensors of ``values``: parameters and those of at least :data:`SHARE_ABOVE`
        bytes by digest first (another process may have sent the same weights), the others with
        their data and no digest (a batch is new every step: hashing it would only cost). With
        ``defer`` the others are returned instead, as (handle, value), for the execute that
        follows to carry (one round trip for a step's batch)."""
        entries = []
        for v in values:
            if v.version != v.cpu._version:
                raise DeviceError(f"a {tuple(v.cpu.shape)} CPU tensor was written in place after it was moved to the "
                                  "hypatia device and before the device needed it; move a copy (t.clone().to('hypatia')) "
                                  "or call torch.hypatia.synchronize() after moving it")
            # a large CUDA tensor that is not a parameter (a batch, an activation) is not hashed:
            # that would bring it to the host, which is what sending it by IPC handle avoids
            if v.digest is None and (v.ask or v.cpu.is_cpu and v.cpu.numel() * v.cpu.element_size() >= SHARE_ABOVE):
                v.digest = content_digest(v.cpu)
            entries.append((next(self._handles), v))
        large = [(h, v) for h, v in entries if v.digest is not None]
        small = [(h, v) for h, v in entries if v.digest is None]
        missing = {h for h, _ in small} if not defer else set()
        if large:
            reply = self._call("upload", {"tag": secrets.token_hex(6), "tensors": [
                {"handle": h, "digest": v.digest, "data": None} for h, v in large]})
            missing |= set(reply["missing"])
        send = [(h, v) for h, v in entries if h in missing]
        if send:
            tag, made = secrets.token_hex(6), []
            try:
                self._call("upload", {"tag": tag, "tensors": self._entries(send, tag, made)})
            finally:
                for name in made:
                    shm.unlink(name)
        if large or send:  # deferred ones are held once the execute carrying them is answered
            self.held_any = True
        deferred = small if defer else []
        carried = {h for h, _ in deferred}
        for h, v in entries:
            if h not in carried:
                v.held(h, self.forget)
        return deferred

    def _entries(self, pairs: list[tuple[int, Value]], tag: str, made: list[str]) -> list[dict]:
        """Upload entries; a content sent once in the request is named by digest after that (the
        daemon takes them in order: a zero bias and a zero running mean go up once)."""
        entries, sent = [], set()
        for k, (h, v) in enumerate(pairs):
            again = v.digest is not None and v.digest in sent
            entries.append({"handle": h, "digest": v.digest, "data": None if again else self._pack(v.cpu, tag, k, made)})
            sent.add(v.digest)
        return entries

    def execute(self, structure: tuple | None, graph: Callable[[], Any], inputs: list[Value], outputs: list[Value],
                wanted: list[Value], carried: list[tuple[int, Value]] = (), into: torch.device | None = None
                ) -> list[torch.Tensor]:
        """Run the graph ``graph()`` makes in the daemon on ``inputs``; ``outputs`` become held
        values, and the CPU copies of ``wanted`` (some of the outputs) come back. ``carried``:
        uploads (see :meth:`upload`) sent in the same request. ``structure`` determines the
        graph (see :func:`hypatia.device.trace._structure`): its keys are computed once per
        structure, and ``graph`` is not called again. ``into``: where the client wants ``wanted``
        (a GPU it shares with the daemon: by CUDA IPC; otherwise CPU tensors come back)."""
        found = self._structures.get(structure) if structure is not None else None
        if found is None:
            found = self._keys(graph())
            if structure is not None:
                self._structures[structure] = found
                if len(self._structures) > STRUCTURES:
                    self._structures.popitem(last=False)
            self.counters["structures_keyed"] += 1
        else:
            self._structures.move_to_end(structure)
            self.counters["structures_reused"] += 1
        keys, registration = found
        out_handles = [next(self._handles) for _ in outputs]
        by_id = dict(zip(map(id, outputs), out_handles))
        carried_ids = {id(v): h for h, v in carried}
        with self._lock:
            released, self._released = self._released, []
        tag, made = secrets.token_hex(6), []
        try:
            body = {"graph_key": keys[0], "workload_key": keys[1], "env_key": keys[2], "tag": tag,
                    "inputs": [carried_ids.get(id(v), v.handle) for v in inputs], "outputs": out_handles,
                    "fetch": [by_id[id(v)] for v in wanted], "release": released,
                    "out_bytes": sum(_nbytes(v.meta) for v in outputs),
                    "uploads": self._entries(list(carried), tag, made), "ipc": self._ipc_into(into)}
            try:
                reply = self._call("execute", body)
            except DeviceError as exc:
                if "send make_plan first" not in str(exc):
                    raise
                self.counters["plans_resent"] += 1  # the daemon lost it (a flushed store, a restart)
                self._call_plan(registration)
                reply = self._call("execute", body)  # the daemon took nothing of the first
        finally:
            for name in made:
                shm.unlink(name)
        self.held_any = True
        for h, v in carried:
            v.held(h, self.forget)
        for v, h in zip(outputs, out_handles):
            v.held(h, self.forget)
        return [self._unpack(e, tag, into) for e in reply["values"]]

    def _call_plan(self, registration: dict) -> None:
        if self.lost is not None:
            raise DeviceLost(self.lost)
        try:
            self.client.call("make_plan", registration, wait_s=self.config.plan_wait_s)
        except (DaemonUnavailable, RemoteError) as exc:
            raise DeviceError(f"hypatiad could not take this graph: {exc}") from None

    def _keys(self, gm: torch.fx.GraphModule) -> tuple[tuple[str, str, str], dict]:
        info = self.info()
        graph, _ = capture(gm, info["device_type"])
        metas = [encode_meta(n.meta["val"], info["device_type"]) for n in gm.graph.nodes if n.op == "placeholder"]
        metas.append(["phase", "inference", []])
        wkey = workload_key(metas)[0]
        keys = (graph.key, wkey, info["env_key"])
        registration = {"graph_key": keys[0], "workload_key": keys[1], "env_key": keys[2],
                        "policy": self.config.policy, "graph": graph.to_wire(), "workload": metas,
                        "environment": info["environment"], "model": "hypatia device"}
        return keys, registration

    def fetch(self, values: list[Value], into: torch.device | None = None) -> list[torch.Tensor]:
        tag = secrets.token_hex(6)
        reply = self._call("fetch", {"tag": tag, "handles": [v.handle for v in values], "ipc": self._ipc_into(into)})
        return [self._unpack(e, tag, into) for e in reply["values"]]

    def _ipc_into(self, into: torch.device | None) -> bool:
        return into is not None and self.cuda_ipc(into)

    def reclaim(self) -> int:
        """Unlink the reply segments of requests that were not answered in time (the daemon may
        have written them after this process gave up); how many."""
        late = tuple(t + "o" for t in self.late)
        removed = 0
        for name in shm.names_of(self.pid) if late and os.getpid() == self.pid else ():
            if name.split("-", 4)[4].startswith(late):
                removed += shm.unlink(name)
        self.counters["late_segments_reclaimed"] += removed
        return removed

    def abandon(self) -> None:
        """Give up this session (lost, or its daemon silent): ask the daemon to release it, briefly
        (one that does not answer drops it when this process exits), and remove the segments of
        late replies."""
        self._end(release=True, timeout_ms=500)
        self.lost = self.lost or "this session was given up"

    def close(self) -> None:
        """Release everything this process holds on the device (at exit), and remove the segments
        of late replies."""
        self._end(release=self.lost is None, timeout_ms=2000)

    def _end(self, release: bool, timeout_ms: int) -> None:
        self.reclaim()
        if release and self.held_any and os.getpid() == self.pid:
            try:
                self.client.call("device", {"op": "close", "session": self.session, "pid": self.pid}, retries=0,
                                 timeout_ms=timeout_ms)
            except Exception:  # noqa: BLE001 - the daemon's sweep releases them when this process is gone
                pass
            self.held_any = False
        if os.getpid() == self.pid:
            self.client.close()  # its socket; a later request opens another


def _nbytes(meta: Any) -> int:
    if isinstance(meta, torch.Tensor):
        return meta.numel() * meta.element_size()
    return sum(_nbytes(m) for m in meta)
