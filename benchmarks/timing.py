"""Timing with warm-up and a stable median: CUDA events on the GPU, perf_counter on the CPU."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from hypatia.planner.measure import quantile


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    spread_pct: float  # (p90 - p10) / median
    repeats: int

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(samples_ms: list[float]) -> Timing:
    s = sorted(samples_ms)
    med = statistics.median(s)
    p10, p90 = quantile(s, 0.1), quantile(s, 0.9)
    return Timing(round(med, 4), round(p10, 4), round(p90, 4), round(100 * (p90 - p10) / med, 2) if med else 0.0, len(s))


def measure(step: Callable[[], object], device: str, warmup: int = 3, min_repeats: int = 10,
            max_repeats: int = 200, min_time_s: float = 1.0) -> Timing:
    """Median time of ``step`` after ``warmup`` calls: at least ``min_repeats`` samples and
    ``min_time_s`` of measuring, at most ``max_repeats`` samples."""
    cuda = device == "cuda"
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    samples: list[float] = []
    started = time.perf_counter()
    while len(samples) < max_repeats and (len(samples) < min_repeats or time.perf_counter() - started < min_time_s):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            step()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            samples.append((time.perf_counter() - t0) * 1e3)
    return summarize(samples)


def per_call_us(fn: Callable[[], object], device: str, calls: int = 2000, rounds: int = 7) -> float:
    """Median over ``rounds`` of the mean time of one call in a batch of ``calls`` (overheads)."""
    cuda = device == "cuda"
    for _ in range(50):
        fn()
    results = []
    for _ in range(rounds):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize()
        results.append((time.perf_counter() - t0) / calls * 1e6)
    return round(statistics.median(results), 3)
