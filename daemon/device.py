"""The ``hypatia`` device in hypatiad: tensors that live in the daemon, on its GPU (or its CPU
when it has none), and the graphs that clients flush to compute on them.

A client process (:mod:`hypatia.client.device`) holds *handles*: small integers it picks, one
namespace per client *session* (a random token it sends with every request). Each handle names
a buffer in :class:`DevicePool`. A buffer uploaded with a content digest (parameters and
buffers, by ``model.to("hypatia")``) is kept once per digest, however many sessions or handles
name it, and reference-counted; a buffer a graph computed is private to its handle.

Nothing here ever writes into a buffer: the graphs clients flush are functional (an in-place
update on the client becomes a new value), so an optimizer step on shared weights writes new,
private buffers and leaves the shared copy as every other session sees it. That is copy on
write, by construction. A session's buffers go when it releases them, closes, or dies: the
sweep drops the sessions of clients on this host whose process is gone, and sessions over TCP
that have been silent for ``HYPATIA_DEVICE_IDLE_S``.

Requests (method ``device``, body ``{"op", "session", ...}``):

- ``info``: the device (type, name), its environment key and details (what a ``make_plan``
  for it names), memory in use and the limit, the sessions and shared buffers.
- ``upload`` {tensors: [{handle, digest, dtype, shape, data}]}: ``data`` is a shared-memory
  descriptor (same host), ``{"bytes"}`` (any host) or None ("adopt the buffer of this digest if
  you have it"); the reply lists the handles still ``missing`` (digest unknown, no data).
- ``execute`` {keys, inputs, outputs, fetch, release}: run the stored graph of ``keys`` (a
  ``make_plan`` registers it: :class:`~hypatia.protocol.UnknownGraph` until then) on the
  buffers of ``inputs``, keep its outputs under ``outputs``, send back the values of the
  outputs listed in ``fetch``, and first release the handles of ``release``.
- ``fetch`` {handles}: the values of buffers. ``release`` {handles}. ``close``: the session.

A client on this host with the daemon's GPU (the same UUID, which ``info`` gives) sends a CUDA
tensor's data as a CUDA IPC description (``{"cuda_ipc": {...}}``, which the daemon opens and
copies from) instead of through host memory, and asks with ``"ipc": true`` for the values it
fetches to come back the same way.

Full is an error the client shows as it is (:class:`~hypatia.daemon.device_pool.DeviceFull`): what is in use, the limit
(``HYPATIA_DEVICE_MEMORY_MB``) and how to free memory; nothing is evicted behind a client's back.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter
from typing import Any, Callable

from hypatia import limits, shm
from hypatia.daemon.device_pool import DevicePool, Session, mib, nbytes_of
from hypatia.protocol import BadRequest, ErrorCode, ProtocolError, TooLarge, UnknownGraph, require

log = logging.getLogger("hypatia.daemon")

SESSION_RE = re.compile(r"[0-9a-f]{16,32}")
REQUEST_TAG = re.compile(r"[0-9a-z]{8,32}")
DIGEST_RE = re.compile(r"[0-9a-f]{64}")
MAX_HANDLES_PER_REQUEST = 1 << 16
MAX_INLINE_BYTES = 64 << 20  # one tensor sent inside a message (TCP clients)
SWEEP_EVERY_S = 2.0
MAX_CHOICES_SHOWN = 32


def _handles(body: dict, name: str, request_id: int) -> list[int]:
    value = body.get(name, [])
    if not isinstance(value, list) or len(value) > MAX_HANDLES_PER_REQUEST:
        raise BadRequest(f"{name} must be a list of at most {MAX_HANDLES_PER_REQUEST} handles", request_id)
    if not all(type(h) is int and 0 <= h < 2**62 for h in value):
        raise BadRequest(f"{name} must hold handles (integers in [0, 2**62))", request_id)
    return value


def check_ipc_fields(fields: Any, k: int) -> None:
    """A CUDA IPC description as :func:`hypatia.client.torch_internals.cuda_ipc_export` writes it,
    with the client's GPU's UUID."""
    from hypatia.client.torch_internals import IPC_FIELDS

    if not isinstance(fields, dict):
        raise BadRequest(f"tensor {k}: cuda_ipc must be a map")
    for name, kinds in ({"uuid": (str,)} | IPC_FIELDS).items():
        if type(fields.get(name)) not in kinds:
            raise BadRequest(f"tensor {k}: cuda_ipc.{name} must be a {' or '.join(t.__name__ for t in kinds)}")
    try:
        if len(shm.int_list(fields["size"], "size")) != len(shm.int_list(fields["stride"], "stride")):
            raise shm.BadDescriptor("size and stride differ in length")
    except shm.BadDescriptor as exc:
        raise BadRequest(f"tensor {k}: cuda_ipc: {exc}") from None
    if fields["dtype"] not in shm.ITEMSIZE:
        raise BadRequest(f"tensor {k}: cuda_ipc.dtype {fields['dtype']!r} is not one of {', '.join(shm.ITEMSIZE)}")


class DeviceService:
    """The ``device`` requests of one daemon. ``info``/``release``/``close`` are answered on the
    server thread; ``upload``/``execute``/``fetch`` move tensors or compute and run on the pool
    (:meth:`work`), returning an outcome that the server turns into the reply."""

    def __init__(self, config: Any, daemon: str, executables: Any, limit_bytes: int, idle_s: float,
                 record_executor: Callable[[Any, int, Any], Any] | None = None):
        self.config = config
        self.daemon = daemon  # the id in this daemon's shared-memory segment names
        self.executables = executables  # rebuilt graphs with their plans (daemon.executables.Executables)
        self.pool = DevicePool(limit_bytes)
        self.idle_s = idle_s
        self.counters: Counter = Counter()
        self._device = None
        self._uuid: str | None = None  # the GPU's, "" for none: made once, asked for at every IPC upload
        self._next_sweep = 0.0
        self._choosing_lock = threading.Lock()
        self.record_executor = record_executor  # stores a choice with its plan (server thread)
        self._decided: list[tuple[Any, int, Any]] = []  # choices made on the pool, to store
        self.choices: dict[str, dict] = {}  # the latest executor choices, by graph key (shown by stats)

    # -- the device ------------------------------------------------------------------------
    def device(self) -> Any:
        """torch's device for the buffers: this host's first GPU, or its CPU (imports torch)."""
        if self._device is None:
            import torch

            wanted = self.config.device_backend
            if wanted == "cuda" and not torch.cuda.is_available():
                raise BadRequest("HYPATIA_DEVICE_BACKEND=cuda, but torch sees no GPU in hypatiad")
            use_cuda = wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available())
            self._device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
            if use_cuda and not self.pool.limit:  # HYPATIA_DEVICE_MEMORY_MB=0: 90% of the GPU's memory
                self.pool.limit = int(torch.cuda.get_device_properties(0).total_memory * 0.9)
        return self._device

    def info(self) -> dict:
        from hypatia.planner import environment

        device = self.device()
        env_key, env = environment.describe(device.type, device.index or 0)
        return {"device_type": device.type, "device_name": env.get("device_name"), "env_key": env_key,
                "environment": env, "daemon": self.daemon, "device_uuid": self.device_uuid()} | self.pool.stats()

    def device_uuid(self) -> str | None:
        """The GPU's UUID (a client with the same GPU sends tensors by CUDA IPC handle), or None."""
        if self._uuid is None:
            device = self.device()
            if device.type == "cuda":
                import torch

                self._uuid = str(torch.cuda.get_device_properties(device).uuid)
            else:
                self._uuid = ""
        return self._uuid or None

    # -- parsing (server thread) -----------------------------------------------------------
    def parse(self, body: dict, request_id: int, over_tcp: bool) -> tuple[str, dict]:
        op = require(body, "op", str, request_id)
        if op not in ("info", "upload", "execute", "fetch", "release", "close"):
            raise BadRequest(f"device op {op[:40]!r} is not one of info, upload, execute, fetch, release, close",
                             request_id)
        job: dict[str, Any] = {"op": op, "tcp": over_tcp}
        if op == "info":
            return op, job
        token = require(body, "session", str, request_id)
        if not SESSION_RE.fullmatch(token):
            raise BadRequest("session must be 16 to 32 hexadecimal digits", request_id)
        pid = None if over_tcp else body.get("pid")
        if pid is not None and (type(pid) is not int or not 0 < pid < 2**31):
            raise BadRequest(f"pid {str(pid)[:20]} is not a process id", request_id)
        job |= {"session": token, "pid": pid}
        if op in ("release", "fetch"):
            job["handles"] = _handles(body, "handles", request_id)
        if op == "upload":
            tensors = require(body, "tensors", list, request_id)
            if len(tensors) > MAX_HANDLES_PER_REQUEST:
                raise BadRequest(f"at most {MAX_HANDLES_PER_REQUEST} tensors per upload", request_id)
            job["tensors"] = tensors
        if op == "execute":
            job["keys"] = tuple(limits.text(body, f, limits.MAX_KEY_CHARS, request_id, required=True)
                                for f in ("graph_key", "workload_key", "env_key"))
            for name in ("inputs", "outputs", "fetch", "release"):
                job[name] = _handles(body, name, request_id)
            if not set(job["fetch"]) <= set(job["outputs"]):
                raise BadRequest("fetch must name handles among the outputs", request_id)
            job["out_bytes"] = body.get("out_bytes", 0) if type(body.get("out_bytes", 0)) is int else 0
            job["tensors"] = body.get("uploads", [])  # uploads carried by the execute, made first
            if not isinstance(job["tensors"], list) or len(job["tensors"]) > MAX_HANDLES_PER_REQUEST:
                raise BadRequest(f"uploads must be a list of at most {MAX_HANDLES_PER_REQUEST} tensors", request_id)
        if op in ("upload", "execute", "fetch"):
            tag = body.get("tag", "")
            if not isinstance(tag, str) or not REQUEST_TAG.fullmatch(tag):
                raise BadRequest("tag must be 8 to 32 characters of [0-9a-z]", request_id)
            job["tag"] = tag
        if op in ("execute", "fetch"):  # values wanted on the client's GPU, which is this one
            job["ipc"] = body.get("ipc") is True and not over_tcp
        return op, job

    def answer_now(self, op: str, job: dict) -> dict:
        """The cheap ops, on the server thread."""
        if op == "release":
            session = self.pool.session(job["session"], job["pid"])
            return {"released": self.pool.release(session, job["handles"])}
        if op == "close":
            return {"released": self.pool.close(job["session"])}
        raise AssertionError(op)

    # -- the work (pool threads) -----------------------------------------------------------
    def work(self, job: dict) -> dict:
        """Run an upload, execute or fetch; an outcome dict, never an exception."""
        op = job["op"]
        try:
            if op == "info":
                return {"ok": True, "reply": self.info()}
            # an upload or an execute may open the session (a graph of factories reads no handle); a
            # handle a fresh session does not hold is UnknownHandle, which the client reads as lost
            session = self.pool.session(job["session"], job["pid"], create=op in ("upload", "execute"))
            if op == "upload":
                return {"ok": True, "reply": self._all_or_none(session, lambda stored: self._upload(session, job, stored))}
            if op == "fetch":
                return {"ok": True, "reply": {"values": self._export(session, job, job["handles"])}}
            return {"ok": True, "reply": self._execute(session, job)}
        except ProtocolError as exc:  # BadDescriptor is one too
            return {"ok": False, "code": int(exc.code), "message": str(exc)}
        except Exception as exc:  # noqa: BLE001 - the client gets the error, the daemon lives on
            log.error("device %s failed: %s: %s", op, type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))
            return {"ok": False, "code": int(ErrorCode.INTERNAL), "message": f"{type(exc).__name__}: {exc}"}

    def _all_or_none(self, session: Session, work: Callable[[list[int]], dict]) -> dict:
        """``work``'s reply; it lists in the list it is given each handle it stores, and if it
        fails, those are released: a refused upload or execute keeps nothing."""
        stored: list[int] = []
        try:
            return work(stored)
        except BaseException:
            self.pool.release(session, stored)
            raise

    def _upload(self, session: Session, job: dict, stored: list[int]) -> dict:
        """Store an upload's tensors, each handle in ``stored``; the handles still ``missing``
        (a digest the daemon does not hold, sent without data)."""
        device = self.device()
        missing = []
        for k, entry in enumerate(job["tensors"]):
            if not isinstance(entry, dict) or type(entry.get("handle")) is not int:
                raise BadRequest(f"tensor {k} of the upload has no integer handle")
            handle, digest, data = entry["handle"], entry.get("digest"), entry.get("data")
            if handle in session.handles:
                raise BadRequest(f"tensor {k}: handle {handle} is held already; release it first")
            if digest is not None and (not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest)):
                raise BadRequest(f"tensor {k}: digest must be 64 hexadecimal digits")
            if digest is not None and self.pool.adopt(session, handle, digest):
                stored.append(handle)
                continue
            if data is None:
                missing.append(handle)
                continue
            tensor = self._import(session, job, data, k)
            self.pool.reserve(nbytes_of(tensor), f"uploading a {tuple(tensor.shape)} tensor")
            self.counters["bytes_uploaded"] += tensor.numel() * tensor.element_size()
            self.pool.put(session, handle, tensor.to(device) if device.type != "cpu" else tensor, digest)
            stored.append(handle)
        return {"missing": missing}

    def _import(self, session: Session, job: dict, data: Any, k: int) -> Any:
        if not isinstance(data, dict):
            raise BadRequest(f"tensor {k}: data must be a descriptor or {{bytes, dtype, shape}}")
        if "bytes" in data:
            try:
                return shm.from_inline(data)
            except shm.BadDescriptor as exc:
                raise BadRequest(f"tensor {k}: {exc}") from None
        if job["tcp"] or session.pid is None:
            raise BadRequest("a client on another host sends tensors inline ({bytes, dtype, shape})")
        if "cuda_ipc" in data:
            return self._open_ipc(data["cuda_ipc"], k)
        desc = shm.Descriptor.parse(data, session.pid, job["tag"] + "u", self.daemon)
        return shm.read(desc)

    def _open_ipc(self, fields: Any, k: int) -> Any:
        """A private copy of a client's CUDA tensor sent by IPC handle (the client has this GPU)."""
        from hypatia.client.torch_internals import cuda_ipc_import

        check_ipc_fields(fields, k)
        if self.device_uuid() is None:
            raise BadRequest(f"tensor {k} came as a CUDA IPC handle, but hypatiad's device is its CPU; send it "
                             "through host memory")
        if fields["uuid"] != self.device_uuid():
            raise BadRequest(f"tensor {k} is on GPU {fields['uuid']}, not hypatiad's ({self.device_uuid()}); "
                             "send it through host memory")
        try:
            opened = cuda_ipc_import(fields, self.device().index or 0)
            self.pool.reserve(nbytes_of(opened), f"uploading a {tuple(opened.shape)} tensor")
            copy = opened.clone()  # the client may free or reuse its memory once this request returns
        except ProtocolError:
            raise
        except Exception as exc:  # noqa: BLE001 - a stale or foreign handle
            raise BadRequest(f"tensor {k}: its CUDA IPC handle could not be opened ({type(exc).__name__}: {exc})") from None
        self.counters["ipc_uploads"] += 1
        return copy

    def _export(self, session: Session, job: dict, handles: list[int]) -> list[dict]:
        """The values of ``handles`` for the client: segments it unlinks (same host) or inline,
        or CUDA IPC handles where it asked (it has this GPU); it copies from those before the
        value can go, since it holds the handle until then."""
        from hypatia.client.torch_internals import cuda_ipc_export

        values, written = [], []
        try:
            for k, h in enumerate(handles):
                tensor = self.pool.get(session, h).detach()
                if job.get("ipc") and tensor.is_cuda and tensor.numel() * tensor.element_size() > shm.INLINE_UP_TO:
                    values.append({"cuda_ipc": cuda_ipc_export(tensor.contiguous())})
                    self.counters["ipc_fetches"] += 1
                    continue
                tensor = tensor.to("cpu")
                if job["tcp"] or session.pid is None or tensor.numel() * tensor.element_size() <= shm.INLINE_UP_TO:
                    entry = shm.to_inline(tensor)
                    if len(entry["bytes"]) > MAX_INLINE_BYTES:
                        raise TooLarge(f"a {mib(len(entry['bytes']))} tensor is over the {mib(MAX_INLINE_BYTES)} a "
                                       "message carries to another host; fetch it in parts (slice it on the device first)")
                    values.append(entry)
                else:
                    desc = shm.put(tensor, shm.segment_name(self.daemon, session.pid, f"{job['tag']}o{k}"))
                    if desc.name:
                        written.append(desc.name)
                    values.append(desc.to_wire())
                self.counters["bytes_fetched"] += tensor.numel() * tensor.element_size()
            if written and not shm.pid_alive(session.pid):  # nobody will read them
                raise BadRequest(f"client {session.pid} exited before its values were sent")
        except BaseException:
            for name in written:
                shm.unlink(name)
            raise
        return values

    def _execute(self, session: Session, job: dict) -> dict:
        recipe = self.executables.stored(job["keys"])
        if recipe is None:  # before anything is released or uploaded: the client sends it all again
            raise UnknownGraph(f"no plan is stored for graph {job['keys'][0][:24]}; send make_plan first")
        self.pool.release(session, job["release"])
        held = [h for h in job["outputs"] if h in session.handles]
        if held:
            raise BadRequest(f"output handles {held[:8]} are held already; release them first")
        return self._all_or_none(session, lambda stored: self._run(session, job, recipe, stored))

    def _run(self, session: Session, job: dict, recipe: dict, stored: list[int]) -> dict:
        import torch

        if job["tensors"] and self._upload(session, job, stored)["missing"]:
            raise BadRequest("the uploads an execute carries must carry their data")
        executable, built = self.executables.executable(job["keys"], recipe, device=self.device())
        self.counters["executables_built"] += int(built)
        inputs = [self.pool.get(session, h) for h in job["inputs"]]
        executable.check_tensors(inputs)
        size = executable.footprint  # what the graph allocates, sized on fake tensors; else the client's word
        if size is not None:
            nbytes, what = size.peak, f"graph {job['keys'][0][:16]} at {size.peak_at}"
        else:
            self.counters["unsized_executes"] += 1
            nbytes, what = job["out_bytes"], "this graph's outputs"
        give_back = self.pool.hold(nbytes, what)  # while it runs: executes on other threads see it taken
        try:
            failures = executable.plan_failures
            with torch.inference_mode():
                result = self._runner(job["keys"], recipe, executable)(*inputs)
            plan_failed = executable.plan_failures > failures
        finally:
            give_back()
        results = list(result) if isinstance(result, (tuple, list)) else [result]
        if len(results) != len(job["outputs"]):
            raise BadRequest(f"the graph has {len(results)} outputs, the request names {len(job['outputs'])}")
        # what the outputs really take, now that they exist
        self.pool.reserve(sum(nbytes_of(r) for r in results if isinstance(r, torch.Tensor)), "this graph's outputs")
        for h, value in zip(job["outputs"], results):
            self.pool.put(session, h, value)
            stored.append(h)
        self.counters["executes"] += 1
        self.counters["plan_failures"] += int(plan_failed)
        fetched = self._export(session, job, job["fetch"]) if job["fetch"] else []
        return {"values": fetched}

    def _runner(self, keys: Any, recipe: dict, executable: Any) -> Any:
        """What runs ``executable``: itself where only ``aten`` is a candidate; the executor its
        plan already names (a choice made before, by this daemon or an earlier one); else its
        measured choice, made once per executable for every session (see :mod:`.device_executors`)."""
        from hypatia.daemon import device_executors

        names = device_executors.candidates(self.config.device_executors, self.device().type)
        if len(names) == 1:
            return executable.forward
        with self._choosing_lock:
            runner = getattr(executable, "device_choice", None)
            if runner is None:
                stored = recipe.get("executor") or {}
                if stored.get("chosen") in names:
                    self.counters["executor_choices_reused"] += 1
                    runner = device_executors.Chosen(executable, stored["chosen"], self.pool.hold_for_executor)
                else:
                    revision = recipe.get("revision", 0)
                    runner = device_executors.Choosing(
                        executable, names, self.device().type == "cuda",
                        lambda best, measured: self._chosen(keys, revision, best, measured), self.pool.hold_for_executor)
                executable.device_choice = runner
        return runner

    def _chosen(self, keys: Any, revision: int, best: str, measured: dict) -> None:
        from hypatia.planner.plan import ExecutorDecision, ExecutorTime

        self.counters["executor_choices"] += 1
        self.counters[f"chose_{best}"] += 1
        times = [m.to_wire(n) for n, m in measured.items()]
        self.choices[keys[0][:16]] = {"chosen": best, "measured": times}
        while len(self.choices) > MAX_CHOICES_SHOWN:
            self.choices.pop(next(iter(self.choices)))
        decision = ExecutorDecision(best, False, tuple(ExecutorTime.from_dict(t) for t in times))
        with self._choosing_lock:
            self._decided.append((keys, revision, decision))
        log.info("device graph %s runs under %s (%s)", keys[0][:16], best,
                 ", ".join(f"{n} {m.median_s * 1e6:.0f} us" if not m.error else f"{n} failed" for n, m in measured.items()))

    # -- server thread -----------------------------------------------------------------------
    def tick(self, now: float) -> None:
        if self._decided:  # choices made on the pool go into the store here, on the server thread
            with self._choosing_lock:
                decided, self._decided = self._decided, []
            for keys, revision, decision in decided:
                if self.record_executor is not None:
                    try:
                        self.record_executor(keys, revision, decision)
                    except Exception as exc:  # noqa: BLE001 - a choice not stored is measured again later
                        log.warning("the executor chosen for device graph %s was not stored: %s", keys[0][:16], exc)
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_EVERY_S
        dead = self.pool.sweep(shm.pid_alive, self.idle_s)
        if dead:
            log.info("released the hypatia-device tensors of %d client session(s) that exited or went silent",
                     len(dead))
        self.sweep_segments()

    def sweep_segments(self) -> None:
        """Unlink the shared-memory segments named for this daemon of clients that exited (a
        reply nobody read, an upload of a client killed mid-request); never another daemon's."""
        try:
            removed = shm.sweep(self.daemon)
        except OSError as exc:  # /dev/shm unreadable: nothing to sweep, say so once in a while
            log.warning("shared-memory sweep failed: %s", exc)
            return
        if removed:
            log.info("swept %d shared-memory segment(s) of clients that exited: %s", len(removed), ", ".join(removed[:8]))
        self.counters["segments_swept"] += len(removed)

    def stats(self) -> dict:
        return {"device": self.pool.stats() | dict(self.counters) | {
            "executor_choices_made": dict(self.choices), "executables_cached": len(self.executables)}}

