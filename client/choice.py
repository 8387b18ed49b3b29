"""The whole graph's last alternative: a planned graph against Dynamo's own graph, measured in
the process that runs them.

Region by region the tuner keeps only implementations that beat eager ATen, but a planned
graph also pays for AOTAutograd's runtime wrappers, which no region measurement sees; on a
small graph that cost can exceed every saving. So, under the measuring policies, the first
calls of a compiled graph alternate between the planned graph and the pass-through graph,
timing each (CUDA events on a GPU, recorded without synchronizing, so they measure the steady
state; wall time on a CPU), and then the faster one is kept for good.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any, Callable

import torch

log = logging.getLogger("hypatia.client")

WARMUP_ROUNDS = 2
TIMED_ROUNDS = 7


class MeasuredChoice:
    """Calls each of ``alternatives`` in turn, timing them, then keeps the fastest; ``report`` is
    called once with the chosen name and each alternative's median seconds."""

    def __init__(self, alternatives: dict[str, Callable], device: str, report: Callable[[str, dict], None]):
        self.names = list(alternatives)
        self.alternatives = alternatives
        self.cuda = device == "cuda" and torch.cuda.is_available()
        self.report = report
        self.calls = 0
        self.samples: dict[str, list] = {name: [] for name in self.names}
        self.chosen: Callable | None = None

    def __call__(self, *args: Any) -> Any:
        if self.chosen is not None:
            return self.chosen(*args)
        name = self.names[self.calls % len(self.names)]
        timed = self.calls >= WARMUP_ROUNDS * len(self.names)
        self.calls += 1
        fn = self.alternatives[name]
        if not timed:
            return fn(*args)
        if self.cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            out = fn(*args)
            end.record()
            self.samples[name].append((begin, end))
        else:
            t0 = time.perf_counter()
            out = fn(*args)
            self.samples[name].append(time.perf_counter() - t0)
        if all(len(s) >= TIMED_ROUNDS for s in self.samples.values()):
            self._choose()
        return out

    def _choose(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            medians = {n: statistics.median(b.elapsed_time(e) / 1e3 for b, e in s) for n, s in self.samples.items()}
        else:
            medians = {n: statistics.median(s) for n, s in self.samples.items()}
        best = min(self.names, key=medians.__getitem__)  # ties go to the first listed
        self.chosen = self.alternatives[best]
        self.samples = {}
        self.alternatives = {best: self.chosen}  # the other graph and its kernels can go
        log.info("graph alternatives measured %s; keeping %s", {n: f"{m * 1e6:.1f} us" for n, m in medians.items()}, best)
        self.report(best, medians)
