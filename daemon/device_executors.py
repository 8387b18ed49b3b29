"""The executors of the hypatia device's graphs in hypatiad, chosen by measuring.

A flushed structure's executable (its stored graph rebuilt, its plan applied) runs at once as
it is: ATen op by op, ``aten``. A structure that clients keep flushing (each training or
inference step is one) is worth more. On a GPU its other candidates are built in turn and timed
on the clients' own executes, with the backend's measured choice
(:class:`hypatia.client.choice.ExecutorChoice`), and the fastest is kept for every client of
the daemon, and stored with the graph's plan, so that a restarted daemon builds it at once:

- ``aten+cudagraphs``: the same graph captured once as a CUDA graph and replayed, which removes
  the host's cost of launching its kernels one by one;
- ``inductor``: Inductor's code for the graph (Triton on a GPU, C++ on a CPU);
- ``inductor+cudagraphs``: that code, captured.

``HYPATIA_DEVICE_EXECUTORS`` names the candidates (``auto``: all four on a GPU, ``aten`` alone
on a CPU, where Inductor's C++ compiles take long and rarely win on a graph this small).

A captured graph reads private copies of its inputs. An input that is the same buffer as on the
last replay (a weight) is not copied again; a new one (a batch, an updated parameter) is. Its
outputs are copied out of the graph's memory, because the next replay writes there and a
device buffer never changes once made.
"""

from __future__ import annotations

import functools
import logging
import threading
import weakref
from typing import Any, Callable

from hypatia.executors import ALL_CANDIDATES, CUDAGRAPHS, UnknownCandidate, parse

log = logging.getLogger("hypatia.daemon")

AUTO_CUDA = ("aten", "aten" + CUDAGRAPHS, "inductor", "inductor" + CUDAGRAPHS)
AUTO_CPU = ("aten",)


@functools.cache  # asked at every execute, of the daemon's one setting
def candidates(setting: str, device_type: str) -> tuple[str, ...]:
    """The candidates ``HYPATIA_DEVICE_EXECUTORS`` names, ``aten`` first (what runs at once);
    CUDA graphs are left out off a GPU."""
    if setting == "auto":
        return AUTO_CUDA if device_type == "cuda" else AUTO_CPU
    names = [n.strip() for n in setting.split(",") if n.strip()]  # checked when the configuration loads
    names = [n for n in names if device_type == "cuda" or not n.endswith(CUDAGRAPHS)]
    return tuple(dict.fromkeys(["aten", *names]))


class Captured:
    """``fn`` recorded once as a CUDA graph on private copies of ``inputs``, then replayed. With
    ``hold`` (the pool's :meth:`~hypatia.daemon.device_pool.DevicePool.hold_for_executor`), the
    memory it keeps (those copies, the graph's own pool) counts against the device's limit until
    it goes; past the limit it is not made (DeviceFull)."""

    def __init__(self, fn: Callable[..., Any], inputs: list, hold: Callable[[int, str], Callable[[], None]] | None = None):
        import torch

        before = torch.cuda.memory_allocated()
        self.static = [x.clone() for x in inputs]
        self.last: list[Any] = [None] * len(inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: lazy initialization and autotuning stay out of the graph
                fn(*self.static)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            out = fn(*self.static)
        self.tuple_out = isinstance(out, (tuple, list))
        self.outputs = list(out) if self.tuple_out else [out]
        # what stays allocated once captured (other executes running meanwhile blur it a little)
        self.nbytes = max(0, torch.cuda.memory_allocated() - before)
        if hold is not None:
            weakref.finalize(self, hold(self.nbytes, "a captured CUDA graph"))

    def __call__(self, *inputs: Any) -> Any:
        for k, x in enumerate(inputs):
            seen = self.last[k]
            if seen is None or seen() is not x:
                self.static[k].copy_(x)
                self.last[k] = weakref.ref(x)
        self.graph.replay()
        out = [o.clone() for o in self.outputs]
        return tuple(out) if self.tuple_out else out[0]


def build(name: str, executable: Any, inputs: list, hold: Callable[[int, str], Callable[[], None]] | None = None
          ) -> Callable[..., Any]:
    """The callable of candidate ``name`` for ``executable`` (a :class:`~hypatia.daemon.executables.Executable`
    whose ``graph`` is the rebuilt, unplanned graph module), built on this call's ``inputs``;
    ``hold``: see :class:`Captured`."""
    executor, captured = parse(name)
    if executor == "aten":
        fn = executable.forward
    elif executor == "inductor":
        from hypatia.client.executors.inductor import config_patches
        from hypatia.client.graphs import copy_of
        from hypatia.client.torch_internals import inductor_compile

        fn = inductor_compile(_reshaping(copy_of(executable.graph, executable.graph)), inputs, config_patches(False))
    else:
        raise UnknownCandidate(f"{name!r} is not a candidate for the device's graphs")
    return Captured(fn, inputs, hold) if captured else fn


def _reshaping(gm: Any) -> Any:
    """``gm`` with its ``view`` calls as ``reshape``: the recorded graph's views hold for eager's
    strides, and Inductor may lay an intermediate out otherwise (GPT-2's attention did). The
    graph is functional, so nothing depends on a view sharing its base's memory."""
    import torch

    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.view.default:
            node.target = torch.ops.aten.reshape.default
    gm.recompile()
    return gm


class Chosen:
    """The executor a plan names for an executable (chosen by measuring before): built on the
    first call's inputs. One that fails to build or to run gives way to ``aten`` for good."""

    def __init__(self, executable: Any, name: str, hold: Callable[[int, str], Callable[[], None]] | None = None):
        self.lock = threading.Lock()
        self.executable, self.name, self.hold = executable, name, hold
        self.fn: Callable[..., Any] | None = None

    def __call__(self, *inputs: Any) -> Any:
        with self.lock:
            if self.fn is None:
                try:
                    self.fn = build(self.name, self.executable, list(inputs), self.hold)
                except Exception as exc:  # noqa: BLE001 - the graph still runs, as it is
                    self._give_way(exc)
            try:
                return self.fn(*inputs)
            except Exception as exc:  # noqa: BLE001
                if self.fn is self.executable.forward:
                    raise
                self._give_way(exc)
                return self.fn(*inputs)

    def _give_way(self, exc: BaseException) -> None:
        log.warning("device graph executor %s failed (%s: %s); the graph runs under aten from now on",
                    self.name, type(exc).__name__, exc)
        self.fn = self.executable.forward


class Choosing:
    """One executable's measured choice, shared by every session that flushes its structure
    (calls are serialized: the choice counts them, and a captured graph has one set of inputs)."""

    def __init__(self, executable: Any, names: tuple[str, ...], cuda: bool, report: Callable[[str, dict], None],
                 hold: Callable[[int, str], Callable[[], None]] | None = None):
        from hypatia.client.choice import ExecutorChoice

        self.lock = threading.Lock()
        self.choice = ExecutorChoice(list(names), executable.forward,
                                     lambda name, args: build(name, executable, args, hold), cuda=cuda, report=report)

    def __call__(self, *inputs: Any) -> Any:
        with self.lock:
            return self.choice(*inputs)


__all__ = ["ALL_CANDIDATES", "AUTO_CPU", "AUTO_CUDA", "Captured", "Chosen", "Choosing", "build", "candidates"]
