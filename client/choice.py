"""The choice among executors, measured as the model runs them.

A graph's first calls run its first candidate (the default executor, ready at once). After those
warm-up calls, each other candidate is built in turn, warmed up (CUDA graphs record here) and
timed on the model's own calls; then the fastest is kept for good and the others are dropped.
A sample is the whole step of this graph: its forward call and, in training, its backward, from
the moment autograd reaches its outputs to the moment it has finished with its inputs. On a GPU
samples are CUDA events, recorded without synchronizing, so they include whatever host cost
leaves the device idle; on a CPU they are wall time. Eager is always a candidate, so nothing
slower than eager is ever kept.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

log = logging.getLogger("hypatia.client")

WARMUP_CALLS = 3
TIMED_CALLS = 10


@dataclass
class Sample:
    """One timed call: forward start and end, and backward start and end where it ran."""

    cuda: bool
    marks: dict[str, Any] = field(default_factory=dict)
    hooks: list = field(default_factory=list)  # removed once the choice is made

    def mark(self, name: str) -> None:
        if name in self.marks:
            return
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks[name] = event
        else:
            self.marks[name] = time.perf_counter()

    def _between(self, a: str, b: str) -> float:
        if self.cuda:
            return self.marks[a].elapsed_time(self.marks[b]) / 1e3
        return self.marks[b] - self.marks[a]

    def seconds(self) -> tuple[float, bool]:
        """(this call's time, whether its backward is included)."""
        total = self._between("start", "forward")
        backward = "backward_start" in self.marks and "backward_end" in self.marks
        if backward:
            total += self._between("backward_start", "backward_end")
        return total, backward


def _watch_backward(sample: Sample, args: tuple, out: Any) -> None:
    """Mark ``sample`` when autograd reaches the outputs and when it is done with the inputs."""
    outputs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
    inputs = [t for t in args if isinstance(t, torch.Tensor) and t.requires_grad]
    if not outputs or not inputs:
        return
    for t in outputs:
        t.register_hook(lambda grad: sample.mark("backward_start"))
    # the inputs (parameters among them) outlive the call: this hook is removed after the choice
    sample.hooks.append(torch.autograd.graph.register_multi_grad_hook(
        inputs, lambda grads: sample.mark("backward_end"), mode="all"))


@dataclass
class Measured:
    median_s: float = 0.0
    spread_s: float = 0.0
    samples: int = 0
    with_backward: int = 0
    error: str = ""

    def to_wire(self, name: str) -> dict:
        return {"name": name, "median_us": round(self.median_s * 1e6, 3), "spread_us": round(self.spread_s * 1e6, 3),
                "samples": self.samples, "with_backward": self.with_backward, "error": self.error[:300]}


class ExecutorChoice:
    """Runs ``candidates[0]`` (``first``, already built) at once, then builds and times the
    others on the model's calls with ``build(name, args)``, keeps the fastest and calls
    ``report(chosen, {name: Measured})`` once."""

    def __init__(self, candidates: list[str], first: Callable[..., Any], build: Callable[[str, list], Callable[..., Any]],
                 *, cuda: bool, report: Callable[[str, dict[str, Measured]], None],
                 warmup: int = WARMUP_CALLS, timed: int = TIMED_CALLS):
        self.names = list(candidates)
        self.built: dict[str, Callable[..., Any]] = {candidates[0]: first}
        self.build = build
        self.cuda = cuda
        self.report = report
        self.warmup, self.timed = warmup, timed
        self.results: dict[str, Measured] = {}
        self.samples: dict[str, list[Sample]] = {name: [] for name in candidates}
        self.position = 0  # the candidate being measured
        self.calls = 0  # calls of that candidate so far
        self.chosen: Callable[..., Any] | None = None
        self.chosen_name: str | None = None

    def __call__(self, *args: Any) -> Any:
        if self.chosen is None and self.position >= len(self.names):
            self._choose()  # now: the last timed call's backward has run
        if self.chosen is not None:
            return self.chosen(*args)
        name = self.names[self.position]
        fn = self.built.get(name)
        if fn is None:
            try:
                fn = self.built[name] = self.build(name, list(args))
            except Exception as exc:  # noqa: BLE001 - a candidate that cannot be built is not chosen
                self._failed(name, exc)
                return self(*args)
        timed = self.calls >= self.warmup
        sample = Sample(self.cuda)
        if timed:
            sample.mark("start")
        try:
            out = fn(*args)
        except Exception as exc:  # noqa: BLE001 - the first candidate runs this call instead
            if name == self.names[0]:
                raise
            self._failed(name, exc)
            return self.built[self.names[0]](*args)
        if timed:
            sample.mark("forward")
            _watch_backward(sample, args, out)
            self.samples[name].append(sample)
        self.calls += 1
        if self.calls >= self.warmup + self.timed:
            self._next()
        return out

    def _failed(self, name: str, exc: BaseException) -> None:
        log.info("executor candidate %s failed and is not measured: %s: %s", name, type(exc).__name__, exc)
        self.results[name] = Measured(error=f"{type(exc).__name__}: {exc}")
        self.samples.pop(name, None)
        self.built.pop(name, None)
        self._next()

    def _next(self) -> None:
        self.position += 1
        self.calls = 0

    def _choose(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        for sample in (s for samples in self.samples.values() for s in samples):
            for hook in sample.hooks:
                hook.remove()
        for name, samples in self.samples.items():
            times = [s.seconds() for s in samples if len(s.marks) >= 2]
            if any(backward for _, backward in times):  # in training, whole steps only
                times = [(t, backward) for t, backward in times if backward]
            if not times:
                self.results.setdefault(name, Measured(error="no timed call"))
                continue
            seconds = sorted(t for t, _ in times)
            spread = seconds[int(0.9 * (len(seconds) - 1))] - seconds[int(0.1 * (len(seconds) - 1))]
            self.results[name] = Measured(statistics.median(seconds), spread, len(seconds), sum(b for _, b in times))
        timed = {n: m for n, m in self.results.items() if not m.error}
        best = min(timed, key=lambda n: timed[n].median_s) if timed else self.names[0]
        self.chosen_name, self.chosen = best, self.built[best]
        self.built = {best: self.chosen}  # the other candidates and their code can go
        self.samples = {}
        log.info("executors measured %s; keeping %s",
                 {n: (f"{m.median_s * 1e6:.1f} us" if not m.error else m.error[:60]) for n, m in self.results.items()}, best)
        report, self.report, self.build = self.report, None, None  # their graphs and inputs can go
        report(best, dict(self.results))
