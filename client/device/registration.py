"""Registration of the ``hypatia`` device with PyTorch: the PrivateUse1 backend renamed, its
device module ``torch.hypatia``, and one fallback kernel for the ops that reach the backend
without a hypatia tensor argument (factories), plus ``_to_copy``'s own kernel: ``torch.tensor(data,
device="hypatia")`` copies with the Python dispatch key turned off, where only a kernel
registered for the op itself is called (torch asserts on a fallback there)."""

from __future__ import annotations

import threading

import torch

from hypatia.client import torch_internals

NAME = "hypatia"
_registered = threading.Lock()
_library: torch.library.Library | None = None
_aten_library: torch.library.Library | None = None


class RegistrationError(RuntimeError):
    """PyTorch's PrivateUse1 backend is taken by another device in this process."""


def _factory(op: torch._ops.OpOverload, *args, **kwargs):
    """The PrivateUse1 kernel of every op without a hypatia tensor argument (factories such as
    ``torch.zeros(..., device="hypatia")``, and ``empty_strided`` for ``x.to("hypatia")``)."""
    from hypatia.device.tensor import record_op

    return record_op(op, args, kwargs)


def _to_copy(x, *, dtype=None, layout=None, device=None, pin_memory=None, non_blocking=False, memory_format=None):
    """``x.to("hypatia")`` as torch's own composite kernel does it (a fresh tensor, then a copy:
    a CPU tensor so moved is an upload, its weights shared by digest), recorded directly since
    the Python dispatch key may be off here."""
    from hypatia.device.tensor import HypatiaTensor, record_op

    if isinstance(x, HypatiaTensor):
        return record_op(torch.ops.aten._to_copy.default, (x,), {"dtype": dtype, "memory_format": memory_format})
    like = torch.empty_like(x, device="meta", dtype=dtype, memory_format=memory_format or torch.preserve_format)
    out = record_op(torch.ops.aten.empty_strided.default, (like.shape, like.stride()),
                    {"dtype": like.dtype, "device": torch.device(NAME, 0)})
    record_op(torch.ops.aten.copy_.default, (out, x), {})
    return out


def register() -> None:
    """Make ``device="hypatia"`` work in this process (idempotent)."""
    global _library, _aten_library
    with _registered:
        if _library is not None:
            return
        current = torch._C._get_privateuse1_backend_name()
        if current not in ("privateuseone", NAME):
            raise RegistrationError(f"PyTorch's PrivateUse1 backend is already {current!r} in this process; the "
                                    "hypatia device needs it (use one of the two per process)")
        if current != NAME:
            from hypatia.device import module

            torch_internals.setup_python_backend(NAME, module)
        lib = torch.library.Library("_", "IMPL")
        lib.fallback(_factory, dispatch_key="PrivateUse1")
        aten = torch.library.Library("aten", "IMPL")
        aten.impl("_to_copy", _to_copy, "PrivateUse1")
        _library, _aten_library = lib, aten
