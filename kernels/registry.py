"""The kernel library's registry: every implementation keyed by (op, backend, signature).

Entries are declared as data and name their function as ``"module:attribute"``; the function is
imported only when a process runs it, so the daemon can plan without importing torch or cupy.
All implementations of one op take the same inputs, so the planner can swap them freely.
"""

from __future__ import annotations

import enum
import importlib
from dataclasses import dataclass
from typing import Callable


class Backend(str, enum.Enum):
    CPU_TORCH = "cpu_torch"
    GPU_TORCH = "gpu_torch"
    GPU_CUPY = "gpu_cupy"
    GPU_TRITON = "gpu_triton"


# The backend a region runs on when the planner keeps it where its tensors already live.
DEVICE_BACKENDS = {"cpu": Backend.CPU_TORCH, "cuda": Backend.GPU_TORCH}


class UnknownKernel(LookupError):
    """A plan names a kernel id that this installation's registry does not have."""


@dataclass(frozen=True)
class KernelSpec:
    op: str
    backend: Backend
    signature: str
    target: str
    description: str
    launches: int = 1  # device kernel launches per call, for the cost model
    # What it places in a graph: "aten" (ATen's own fused operators, which Inductor lowers as it
    # lowers any graph) or "hypatia" (hypatia:: custom operators, opaque to Inductor)
    places: str = "hypatia"

    @property
    def id(self) -> str:
        return f"{self.op}/{self.backend.value}/{self.signature}"

    def load(self) -> Callable:
        module_name, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module_name), attr)


_BY_KEY: dict[tuple[str, Backend, str], KernelSpec] = {}
_BY_ID: dict[str, KernelSpec] = {}


def register(spec: KernelSpec) -> KernelSpec:
    key = (spec.op, spec.backend, spec.signature)
    if key in _BY_KEY and _BY_KEY[key] != spec:
        raise ValueError(f"kernel {spec.id} registered twice with different targets")
    _BY_KEY[key] = spec
    _BY_ID[spec.id] = spec
    return spec


def lookup(op: str, backend: Backend, signature: str) -> KernelSpec | None:
    return _BY_KEY.get((op, backend, signature))


def by_id(kernel_id: str) -> KernelSpec:
    try:
        return _BY_ID[kernel_id]
    except KeyError:
        raise UnknownKernel(
            f"kernel {kernel_id!r} is not in this installation's registry; the daemon and this "
            "process run different Hypatia versions (restart the daemon after upgrading)"
        ) from None


def load_kernel(kernel_id: str, placement: str = "device") -> Callable:
    """The callable a plan's region runs: the kernel itself, or on the host with copies."""
    kernel = by_id(kernel_id).load()
    if placement == "device":
        return kernel
    if placement == "host":
        from hypatia.kernels.host import on_host

        return on_host(kernel)
    raise UnknownKernel(f"placement {placement!r} is not known to this installation")


def transparent(kernel_id: str, placement: str = "device") -> bool:
    """Whether a region run by this kernel is ATen operators a code generator sees through (no
    ``hypatia::`` operator, no copies to the host)."""
    return placement == "device" and by_id(kernel_id).places == "aten"


def all_kernels() -> list[KernelSpec]:
    return sorted(_BY_ID.values(), key=lambda s: s.id)
