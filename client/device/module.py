"""``torch.hypatia``: the device module torch looks up for ``device="hypatia"`` (what
``torch.cuda`` is for CUDA), answered from the daemon."""

from __future__ import annotations

from typing import Any

import torch


def _recorder() -> Any:
    from hypatia.device.trace import recorder

    return recorder()


def is_available() -> bool:
    """True when hypatiad answers (starting it when ``HYPATIA_AUTOSTART`` allows)."""
    try:
        _recorder().link.info()
        return True
    except Exception:  # noqa: BLE001 - any failure means not available, as torch.cuda says
        return False


def device_count() -> int:
    return 1


def current_device() -> int:
    return 0


def set_device(device: Any) -> None:
    index = torch.device(device).index if not isinstance(device, int) else device
    if index not in (None, 0):
        raise ValueError(f"the hypatia device has one index, 0; got {index}")


def is_initialized() -> bool:
    return True


def _is_in_bad_fork() -> bool:
    return False


def manual_seed(seed: int) -> None:
    """A no-op: the daemon's generator, shared by every client, draws the device's random
    numbers (torch.manual_seed calls this for every registered device)."""


def manual_seed_all(seed: int) -> None:
    manual_seed(seed)


def get_rng_state(device: Any = None) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8)


def set_rng_state(state: torch.Tensor, device: Any = None) -> None:
    pass


def synchronize(device: Any = None) -> None:
    """Compute everything recorded so far (one flush): errors surface here, not later."""
    from hypatia.device.tensor import _lock

    with _lock:
        _recorder().flush()


def memory_stats(device: Any = None) -> dict[str, Any]:
    """The daemon's device memory: in use and limit (bytes), sessions, shared buffers, and this
    process's counters (ops recorded, flushes, bytes moved)."""
    rec = _recorder()
    info = dict(rec.link.stats())
    info.pop("environment", None)
    return info | {"client": dict(rec.counters) | {"bytes_up": rec.link.bytes_up, "bytes_down": rec.link.bytes_down,
                                                 "bytes_ipc_up": rec.link.bytes_ipc_up,
                                                 "bytes_ipc_down": rec.link.bytes_ipc_down}}


def memory_allocated(device: Any = None) -> int:
    """Bytes of device memory hypatiad's buffers take (every process's: shared weights count once)."""
    return int(memory_stats()["memory_used_bytes"])


def get_device_name(device: Any = None) -> str:
    return str(_recorder().link.info().get("device_name"))
