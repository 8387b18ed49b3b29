"""The environment sniffer: the hardware and software a plan is valid for, never an index or rank.

:func:`describe` is what keys an environment (GPU name, compute capability, memory, driver and
CUDA versions, CPU model, torch / cupy / triton / hypatia versions). The device's measured
ceilings (copy bandwidth, matrix rate, launch and dispatch costs) are not part of the key: they
are measured once per environment by the tuner (:func:`hypatia.planner.measure.ceilings`) and
kept in the store's ``environments`` row.
"""

from __future__ import annotations

import functools
import os
import platform
from importlib import metadata

import torch

from hypatia import __version__
from hypatia.canonical import environment_key


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def describe(device_type: str, device_index: int = 0) -> tuple[str, dict]:
    """(environment key, details) for the device a graph runs on; cached per process."""
    env = {
        "device_type": device_type,
        "torch": torch.__version__,
        "hypatia": __version__,
        "cupy": _version("cupy-cuda12x") or _version("cupy-cuda13x") or _version("cupy"),
        "triton": _version("triton"),
        "machine": platform.machine(),
        "cpu": cpu_model(),
    }
    if device_type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device_index)
        get_driver = getattr(torch._C, "_cuda_getDriverVersion", None)
        env.update(
            device_name=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_bytes=int(props.total_memory),
            cuda=torch.version.cuda,
            driver=get_driver() if get_driver else None,
        )
    else:
        env["device_name"] = env["cpu"]
        env["cpu_count"] = os.cpu_count()
    return environment_key(env)[0], env
