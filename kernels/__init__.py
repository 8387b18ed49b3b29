"""The kernel library: a registry keyed by (op, backend, signature) and its implementations."""

from hypatia.kernels import catalog  # noqa: F401  (registers the declared kernels)
from hypatia.kernels.registry import Backend, KernelSpec, UnknownKernel, all_kernels, by_id, load_kernel, lookup, transparent

__all__ = ["Backend", "KernelSpec", "UnknownKernel", "all_kernels", "by_id", "load_kernel", "lookup", "transparent"]
