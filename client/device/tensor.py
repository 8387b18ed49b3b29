"""``HypatiaTensor``: a tensor on ``device="hypatia"``, a Python wrapper subclass with no data
of its own, and the dispatch that turns every ATen op on it into a recorded op.

An op reaches :meth:`HypatiaTensor.__torch_dispatch__` (ops on hypatia tensors) or the device's
fallback kernel (factory ops such as ``torch.zeros(..., device="hypatia")``), and goes one of
four ways:

- a *view* (``view``, ``t``, ``slice``...) makes a tensor on the same :class:`Storage`, with
  the view op appended to its chain: its value is derived from the storage's when needed;
- an op that *writes* (``add_``, ``copy_``, ``out=``) records its functional twin and makes the
  result the written tensor's value (through a view: scattered back into the storage);
- an op whose result the client needs (``.item()``, ``.cpu()``, ``bool(t)``, an op without a
  meta kernel or with data-dependent output sizes) flushes, computes on CPU copies and, for
  tensor results, uploads them;
- anything else is recorded, its outputs' metadata inferred on meta tensors.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch

from hypatia.device import ops, trace
from hypatia.device.values import Storage, Value, device_as, leaves, map_leaves, meta_like, names_device, upload_value

log = logging.getLogger("hypatia.client")

from hypatia.device.registration import NAME, register

register()
DEVICE = torch.device(NAME, 0)
_lock = threading.RLock()  # one recorder per process: ops from threads record one at a time


class _Inner:
    """``HypatiaTensor._inner``, the tensor it flattens to: a traced instance's own, or a meta
    tensor naming it (:func:`hypatia.device.compiled.name_inner`), made on first use and then a
    plain attribute of the instance (Dynamo's guards and AOTAutograd read it for every parameter
    at every compiled call)."""

    def __get__(self, t: Any, owner: Any = None) -> Any:
        if t is None:
            return self
        from hypatia.device.compiled import name_inner

        inner = t.__dict__["_inner"] = name_inner(t, torch.empty(t.shape, dtype=t.dtype, device="meta"))
        return inner


class HypatiaTensor(torch.Tensor):
    """A tensor whose data lives in hypatiad; see the module docstring.

    For ``torch.compile`` it is a traceable wrapper subclass (:mod:`hypatia.device.compiled`):
    flattened, it is one *inner* tensor, a meta tensor of its metadata, which names it while a
    compiled graph runs; Dynamo and AOTAutograd trace *traced* instances, whose inner tensor is
    theirs (fake, functional) and whose ops run on it, recording nothing."""

    _hstorage: Storage | None
    _chain: tuple
    _cached: tuple | None
    _traced: torch.Tensor | None

    @staticmethod
    def __new__(cls, meta: torch.Tensor, storage: Storage | None, chain: tuple = (), requires_grad: bool = False,
                traced: torch.Tensor | None = None):
        t = torch.Tensor._make_wrapper_subclass(cls, meta.shape, strides=meta.stride(), storage_offset=meta.storage_offset(),
                                                dtype=meta.dtype, device=DEVICE, requires_grad=requires_grad)
        t._hstorage, t._chain, t._cached, t._traced = storage, chain, None, traced
        if traced is not None:
            t.__dict__["_inner"] = traced
        return t

    _inner = _Inner()

    def __tensor_flatten__(self) -> tuple[list[str], None]:
        return ["_inner"], None

    @staticmethod
    def __tensor_unflatten__(inner: dict, ctx: Any, outer_size: Any, outer_stride: Any) -> "HypatiaTensor":
        from hypatia.device.compiled import unflatten

        return unflatten(inner["_inner"])

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        if self._traced is not None:  # while torch.compile traces: metadata only
            return f"HypatiaTensor(traced, shape={tuple(self.shape)}, dtype={self.dtype}, device='{DEVICE}')"
        text = repr(self.detach().cpu())
        suffix = f", device='{DEVICE}'"
        return text[:-1] + suffix + ")" if text.endswith(")") else text

    def __deepcopy__(self, memo: dict) -> "HypatiaTensor":
        """A copy on the device (a recorded clone), not a copy of the Python state that names
        the daemon's buffers; a parameter stays a parameter."""
        if id(self) in memo:
            return memo[id(self)]
        with torch.no_grad():
            new = self.clone()
        if isinstance(self, torch.nn.Parameter):
            new = torch.nn.Parameter(new, requires_grad=self.requires_grad)
        else:
            new.requires_grad_(self.requires_grad)
        memo[id(self)] = new
        return new

    def numpy(self, *, force: bool = False) -> Any:
        """The values as a NumPy array (fetched from the device)."""
        return self.detach().cpu().numpy()

    def tolist(self) -> Any:
        return self.detach().cpu().tolist()

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        found = [x for x in args if type(x) is HypatiaTensor]
        if not found:  # in a list (cat) or a keyword
            found = [x for x in leaves((args, kwargs)) if type(x) is HypatiaTensor]
        if any(x._traced is not None for x in found):  # Dynamo or AOTAutograd tracing a compiled graph
            from hypatia.device.compiled import traced_op

            return traced_op(func, args, kwargs or {})
        if torch.compiler.is_compiling():  # Dynamo tracing into the recorder: it runs it instead
            return _record_outside_dynamo(func, args, kwargs or {})
        return record_op(func, args, kwargs or {})


def record_op(func: Any, args: tuple, kwargs: dict) -> Any:
    """Record (or run, see :func:`dispatch`) one op on the device; flush if enough are waiting."""
    with _lock:
        rec = trace.recorder()
        out = dispatch(rec, func, args, kwargs)
        if rec._recorded >= rec.max_ops:
            rec.maybe_flush()
        return out


# Recording is not model code: under torch.compile it runs as it is, never traced (a graph break).
_record_outside_dynamo = torch.compiler.disable(record_op)


def new_tensor(meta: torch.Tensor, value: Value, recorder: Any) -> HypatiaTensor:
    """A tensor of its own storage holding ``value``."""
    storage = Storage(value)
    recorder.dirty(storage)
    return HypatiaTensor(meta, storage)


def value_of(t: HypatiaTensor, recorder: Any) -> Value:
    """``t``'s current value: its storage's, through its chain of views."""
    storage = t._hstorage
    if not t._chain:
        return storage.value
    key = (storage.version, recorder.epoch)
    if t._cached is not None and t._cached[0] == key:
        return t._cached[1]
    v = storage.value
    for step in t._chain:
        v = recorder.apply_view(step, v)
    t._cached = (key, v)
    return v


def write(t: HypatiaTensor, new: Value, recorder: Any) -> None:
    """Make ``new`` the value of ``t``, and so of the memory it shares with its views."""
    storage = t._hstorage
    if t._chain:
        bases = [storage.value]
        for step in t._chain[:-1]:
            bases.append(recorder.apply_view(step, bases[-1]))
        for step, base in zip(reversed(t._chain), reversed(bases)):
            new = ops.scatter_back(step, base, new, recorder.record)
    storage.value = new
    storage.version += 1
    recorder.dirty(storage)


_CPU = torch.device("cpu")
_PLAIN = (int, float, bool, type(None))  # op arguments that are what they are


def _to_values(args: Any, recorder: Any) -> Any:
    """Arguments with hypatia tensors as their values and CPU tensors as uploads."""
    def one(x: Any) -> Any:
        if isinstance(x, HypatiaTensor):
            return value_of(x, recorder)
        if isinstance(x, torch.Tensor):
            if x.device.type != "cpu":
                raise ops.Unsupported(f"an op mixes a hypatia tensor with a tensor on {x.device}; move it with "
                                      ".to('hypatia') or .cpu() first")
            return upload_value(x)
        return x
    if type(args) is tuple:  # the hot path: a flat tuple of tensors and plain values
        return tuple([value_of(x, recorder) if type(x) is HypatiaTensor else x if type(x) in _PLAIN else map_leaves(one, x)
                      for x in args])
    return map_leaves(one, args)


_aten = torch.ops.aten
_KINDS: dict[int, str] = {}  # id(op) -> what dispatch does with it (ops are never freed)


def _kind(func: Any) -> str:
    kind = _KINDS.get(id(func))
    if kind is None:
        if func is _aten._to_copy.default:
            kind = "to_copy"
        elif func is _aten.copy_.default:
            kind = "copy_"
        elif func.overloadpacket in (_aten.lift_fresh, _aten.alias) or func is _aten.detach.default:
            kind = "alias"
        elif ops.mutated_args(func):
            kind = "write"
        elif ops.is_view(func):
            kind = "view"
        else:
            kind = "compute"
        _KINDS[id(func)] = kind
    return kind


def dispatch(recorder: Any, func: Any, args: tuple, kwargs: dict) -> Any:
    recorder.intercepted += 1
    kind = _kind(func)
    if kind == "compute":
        return compute(recorder, func, args, kwargs)
    if kind == "view":
        if isinstance(args[0], HypatiaTensor) and not any(isinstance(x, torch.Tensor) for x in leaves((args[1:], kwargs))):
            return view_op(recorder, func, args, kwargs)
        return compute(recorder, func, args, kwargs)
    if kind == "to_copy":
        target = kwargs.get("device")
        if target is not None and not names_device(target):  # off the device: the copy is the client's
            return on_client(recorder, func, args, kwargs, keep_on_client=True)
        return compute(recorder, func, args, kwargs)
    if kind == "alias":
        src = args[0]
        return HypatiaTensor(meta_like(src), src._hstorage, src._chain) if isinstance(src, HypatiaTensor) else src
    if kind == "copy_":
        if not isinstance(args[0], HypatiaTensor):
            return on_client(recorder, func, args, kwargs, keep_on_client=True)  # into a CPU tensor
        src = args[1]
        if isinstance(src, torch.Tensor) and not isinstance(src, HypatiaTensor) and src.device.type != "cpu":
            if _fills_fresh(args[0], src) and recorder.link.cuda_ipc(src.device):
                recorder.count("ipc_copies")  # the daemon's GPU: it goes up by CUDA IPC handle
            else:  # another GPU, the daemon on another host, or a partial copy: through host memory
                recorder.count("host_copies")
                args = (args[0], src.cpu(), *args[2:])
        if _fills_fresh(args[0], args[1]):
            # x.to("hypatia"), model.to("hypatia"): the upload itself becomes the tensor's value, so
            # that the daemon keeps it by content (shared between processes), not a private copy
            write(args[0], upload_value(args[1]), recorder)
            return args[0]
    return write_op(recorder, func, args, kwargs, ops.mutated_args(func))


_EMPTY = (torch.ops.aten.empty_strided.default, torch.ops.aten.empty.memory_format)


def _fills_fresh(dst: Any, src: Any) -> bool:
    """True for a copy of a client's tensor (on the CPU, or on the daemon's GPU) into a whole,
    freshly made hypatia tensor of its shape and dtype."""
    return (isinstance(dst, HypatiaTensor) and not dst._chain and dst._hstorage.value.op in _EMPTY
            and type(src) in (torch.Tensor, torch.nn.Parameter) and src.device.type in ("cpu", "cuda")
            and src.shape == dst.shape and src.dtype == dst.dtype)


def compute(recorder: Any, func: Any, args: tuple, kwargs: dict) -> Any:
    vargs = _to_values(args, recorder)
    vkwargs = _to_values(kwargs, recorder) if kwargs else kwargs
    try:
        out_meta = recorder.infer(func, vargs, vkwargs)
    except recorder.needs_data as exc:
        return on_client(recorder, func, args, kwargs, why=str(exc))
    if not (isinstance(out_meta, torch.Tensor) or isinstance(out_meta, (list, tuple)) and all(
            m is None or isinstance(m, torch.Tensor) for m in out_meta)):  # a number or a bool the client needs
        return on_client(recorder, func, args, kwargs)
    value = recorder.record_inferred(func, vargs, vkwargs, out_meta)
    if isinstance(value, Value):
        return new_tensor(value.meta, value, recorder)
    # None where an optional output is not computed (a backward op's output_mask)
    return type(value)(None if v is None else new_tensor(v.meta, v, recorder) for v in value)


def view_op(recorder: Any, func: Any, args: tuple, kwargs: dict) -> Any:
    src = args[0]
    out_meta = recorder.infer_view(func, src, args[1:], kwargs)
    if isinstance(out_meta, torch.Tensor):
        return HypatiaTensor(out_meta, src._hstorage, src._chain + ((func, args[1:], kwargs, None),))
    return [HypatiaTensor(m, src._hstorage, src._chain + ((func, args[1:], kwargs, i),)) for i, m in enumerate(out_meta)]


def write_op(recorder: Any, func: Any, args: tuple, kwargs: dict, mutated: list[str]) -> Any:
    """An op that writes into arguments: its functional twin, recorded, becomes their value."""
    names = [a.name for a in func._schema.arguments]
    bound = dict(zip(names, args)) | kwargs
    targets = [bound[n] for n in mutated]
    flat_targets = [t for group in targets for t in (group if isinstance(group, (list, tuple)) else [group])]
    if not all(isinstance(t, HypatiaTensor) for t in flat_targets if t is not None):
        return on_client(recorder, func, args, kwargs, keep_on_client=True)
    # torch's own checks (shapes that do not broadcast into the target, a cast it refuses) on meta
    meta_bound = map_leaves(lambda x: meta_like(x) if isinstance(x, torch.Tensor) else x, bound)
    _check_on_meta(func, names, meta_bound)
    twin = ops.functional(func)
    twin_args = {a.name for a in twin._schema.arguments}
    vbound = _to_values({k: v for k, v in bound.items() if k in twin_args}, recorder)
    positional = [vbound[a.name] for a in twin._schema.arguments if not a.kwarg_only and a.name in vbound]
    keywords = {a.name: vbound[a.name] for a in twin._schema.arguments if a.kwarg_only and a.name in vbound}
    if "device" in twin_args and "device" not in vbound:  # a factory's out= form (``arange(..., out=t)``)
        keywords["device"] = DEVICE
        if "dtype" in twin_args and "dtype" not in vbound and len(flat_targets) == 1:
            keywords["dtype"] = flat_targets[0].dtype
    out = recorder.record(twin, *positional, **keywords)
    results = out if len(mutated) > 1 else [out]
    for group, result in zip(targets, results):
        if isinstance(group, (list, tuple)):
            for t, r in zip(group, result):
                write(t, recorder.cast(r, t.dtype), recorder)
        else:
            write(group, recorder.cast(result, group.dtype), recorder)
    returns = func._schema.returns
    if not returns:
        return None
    return targets[0] if len(returns) == 1 else tuple(targets)


def _check_on_meta(func: Any, names: list[str], meta_bound: dict) -> None:
    positional = [meta_bound[n] for n in names if n in meta_bound and not _kwarg_only(func, n)]
    keywords = {n: meta_bound[n] for n in names if n in meta_bound and _kwarg_only(func, n)}
    func(*positional, **keywords)


def _kwarg_only(func: Any, name: str) -> bool:
    return any(a.name == name and a.kwarg_only for a in func._schema.arguments)


def _gpu_target(func: Any, args: tuple, kwargs: dict) -> torch.device | None:
    """The GPU of this process that ``func`` moves a hypatia tensor to (``.to("cuda")``,
    ``cuda_tensor.copy_(t)``), or None: where the fetched values had best arrive."""
    if func is _aten._to_copy.default:
        target = kwargs.get("device")
    elif func is _aten.copy_.default and isinstance(args[0], torch.Tensor):
        target = args[0].device
    else:
        return None
    target = torch.device(target) if target is not None else None
    return target if target is not None and target.type == "cuda" else None


def on_client(recorder: Any, func: Any, args: tuple, kwargs: dict, keep_on_client: bool = False,
              why: str | None = None) -> Any:
    """Compute ``func`` here on CPU copies of its hypatia tensors (fetched, which flushes);
    tensor results go back to the device unless ``keep_on_client``."""
    hyp = [x for x in leaves((args, kwargs)) if isinstance(x, HypatiaTensor)]
    into = _gpu_target(func, args, kwargs) if keep_on_client else None
    fetched = dict(zip(map(id, hyp), recorder.fetch([value_of(x, recorder) for x in hyp], into)))
    if why is not None or not keep_on_client and func is not torch.ops.aten._local_scalar_dense.default:
        recorder.ran_on_client(func, why)

    def local(x: Any) -> Any:
        return fetched[id(x)] if isinstance(x, HypatiaTensor) else device_as(x, _CPU)
    cargs, ckwargs = map_leaves(local, (args, kwargs))
    result = func(*cargs, **ckwargs)
    if keep_on_client:
        return result
    return map_leaves(lambda r: new_tensor(meta_like(r), upload_value(r), recorder) if isinstance(r, torch.Tensor) else r,
                      result)
