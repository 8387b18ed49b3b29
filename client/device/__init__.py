"""The ``hypatia`` device: tensors that live in hypatiad and compute on its GPU, from any process.

``import hypatia.device`` renames PyTorch's PrivateUse1 backend ``hypatia`` and installs
``torch.hypatia``; then ``x.to("hypatia")``, ``model.to("hypatia")``, training loops and
``.cpu()``/``.item()`` work as on any device. Ops are recorded on the client
(:mod:`~hypatia.device.trace`), or a compiled model's graph as one step
(:mod:`~hypatia.device.compiled`), and flushed to the daemon as whole graphs, which it plans
once per structure and keeps the weights of, once per content, for every process of the host.
"""

from __future__ import annotations

from hypatia.device.registration import register

register()  # before anything names torch.device("hypatia")

from hypatia.device import module  # noqa: E402
from hypatia.device.compiled import CompileWarning  # noqa: E402
from hypatia.device.link import DeviceError, DeviceFull, DeviceLost  # noqa: E402
from hypatia.device.ops import Unsupported  # noqa: E402
from hypatia.device.tensor import HypatiaTensor  # noqa: E402
from hypatia.device.trace import DeviceWarning  # noqa: E402

synchronize = module.synchronize
is_available = module.is_available
memory_stats = module.memory_stats
memory_allocated = module.memory_allocated

__all__ = ["CompileWarning", "DeviceError", "DeviceFull", "DeviceLost", "DeviceWarning", "HypatiaTensor", "Unsupported",
           "is_available", "memory_allocated", "memory_stats", "register", "synchronize"]
