"""The names of the executors a graph can run under (the shared vocabulary of clients, daemon
and store; the executors themselves live in :mod:`hypatia.client.executors`).

A candidate is an executor, with ``+cudagraphs`` when its graph is captured and replayed as CUDA
graphs: ``"inductor"``, ``"inductor+cudagraphs"``, ``"aten"``, ``"eager+cudagraphs"``, ...
"""

from __future__ import annotations

EXECUTORS = ("inductor", "aten", "eager")
DEFAULT = "inductor"  # what a graph runs at once, before anything is measured
CUDAGRAPHS = "+cudagraphs"


class UnknownCandidate(ValueError):
    """A candidate name that is not an executor, optionally with ``+cudagraphs``."""


def parse(candidate: str) -> tuple[str, bool]:
    """``(executor, captured)`` of a candidate name."""
    if not isinstance(candidate, str):
        raise UnknownCandidate(f"a candidate is a name, not {type(candidate).__name__}")
    name, plus, rest = candidate.partition("+")
    if name not in EXECUTORS or (plus and rest != CUDAGRAPHS[1:]):
        raise UnknownCandidate(
            f"{candidate!r} is not a candidate: one of {', '.join(EXECUTORS)}, each optionally with {CUDAGRAPHS}")
    return name, bool(plus)


ALL_CANDIDATES = tuple(e + suffix for e in EXECUTORS for suffix in ("", CUDAGRAPHS))
