"""Measuring: a region's time on its device, and a device's ceilings.

Timing warms up, then takes samples until a time budget is spent (within a minimum and a
maximum count) and reports the median and the spread (p90 - p10). On CUDA each sample first
flushes the L2 cache by writing a buffer twice its size, then waits for the device to go idle,
so the CUDA events around the call also see the host's cost of launching it: a region of tiny
kernels is limited by launches, and a device-only time would hide exactly that.
"""

from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class Timing:
    median_s: float
    spread_s: float  # p90 - p10
    repeats: int


def quantile(sorted_values: list[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@functools.lru_cache(maxsize=None)
def _l2_flush_buffer(index: int) -> torch.Tensor:
    props = torch.cuda.get_device_properties(index)
    size = 2 * int(getattr(props, "L2_cache_size", 0) or 64 * 2**20)
    return torch.empty(size, dtype=torch.uint8, device=f"cuda:{index}")


def time_call(fn: Callable[..., Any], args: tuple | list, device: str, *, budget_s: float = 0.25,
              warmup: int = 3, min_repeats: int = 5, max_repeats: int = 200) -> Timing:
    """Median and spread of ``fn(*args)`` on ``device`` ("cuda" or "cpu")."""
    cuda = device == "cuda"
    with torch.no_grad():
        for _ in range(warmup):
            fn(*args)
        if cuda:
            torch.cuda.synchronize()
            flush = _l2_flush_buffer(torch.cuda.current_device())
        samples: list[float] = []
        started = time.perf_counter()
        while len(samples) < max_repeats and (len(samples) < min_repeats or time.perf_counter() - started < budget_s):
            if cuda:
                flush.zero_()
                torch.cuda.synchronize()
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                fn(*args)
                end.record()
                end.synchronize()
                samples.append(begin.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn(*args)
                samples.append(time.perf_counter() - t0)
    s = sorted(samples)
    return Timing(statistics.median(s), quantile(s, 0.9) - quantile(s, 0.1), len(s))


def _best(fn: Callable[[], Any], device: str, rounds: int = 5) -> float:
    """The fastest of ``rounds`` timed calls of ``fn`` (ceilings are peaks, not medians)."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def _op_costs(device: str, calls: int = 200) -> tuple[float, float]:
    """Seconds per tiny ATen op: (host dispatch alone, until the device has finished it)."""
    x = torch.zeros(8, device=device)
    host = done = float("inf")
    for _ in range(6):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            x.add_(1.0)
        t1 = time.perf_counter()
        if device == "cuda":
            torch.cuda.synchronize()
        host, done = min(host, t1 - t0), min(done, time.perf_counter() - t0)
    return host / calls, done / calls


def device_ceilings(device: str) -> dict[str, float]:
    """Measured peaks of ``device``: copy bandwidth, fp32 and 16-bit matrix rates, per-op
    launch and host dispatch costs. Takes about a second."""
    cuda = device == "cuda"
    copy_n = (64 if cuda else 32) * 2**20  # float32 elements, well past any cache: 256 / 128 MiB
    src = torch.ones(copy_n, device=device)
    dst = torch.empty_like(src)
    copy_s = _best(lambda: dst.copy_(src), device)
    n = 4096 if cuda else 512
    rates = {}
    for name, dtype in (("flops_per_s", torch.float32), ("half_flops_per_s", torch.bfloat16)):
        a = torch.randn(n, n, device=device).to(dtype)
        rates[name] = 2.0 * n**3 / _best(lambda: a @ a, device)
    dispatch, done = _op_costs(device)
    launch = max(done - dispatch, 0.0) if cuda else 0.0
    del src, dst
    return {"bytes_per_s": 2.0 * copy_n * 4 / copy_s, **rates, "launch_s": launch, "dispatch_s": max(dispatch, 1e-7)}


def ceilings(device_type: str) -> dict[str, Any]:
    """The ceilings stored with an environment: per device type, plus the host <-> device
    copy bandwidth where there is a GPU."""
    measured: dict[str, Any] = {"cpu": device_ceilings("cpu")}
    if device_type == "cuda":
        measured["cuda"] = device_ceilings("cuda")
        host = torch.ones(16 * 2**20)
        measured["transfer_bytes_per_s"] = host.numel() * 4 / _best(lambda: host.to("cuda"), "cuda")
        tiny = torch.ones(1, device="cuda")
        measured["transfer_latency_s"] = _best(lambda: tiny.to("cpu"), "cuda", rounds=20)
        torch.cuda.empty_cache()
    measured["measured_with"] = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    return measured
