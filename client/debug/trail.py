"""What one graph's compile decided, gathered as it goes, for the artifacts folder to write.

The backend fills a :class:`Trail` for every graph (a few attribute assignments, nothing
computed); only with ``HYPATIA_ARTIFACTS`` set is it handed to the writer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Trail:
    """One graph's compile: Dynamo's graph and inputs, and what each step made of it (None where
    the step did not run)."""

    gm: Any
    example_inputs: list
    phase: str
    compile_id: str | None = None
    model: Any = None  # hypatia.client.graphs.ModelGraph
    fx_nodes: list | None = None
    graph: Any = None  # the canonical graph
    env: dict | None = None
    keys: tuple[str, str, str] | None = None
    label: str = ""
    from_daemon: bool = False
    warm_start: bool = False
    planned: Any = None  # the plan as planned or served, before validation
    plan: Any = None  # the plan that runs
    verdicts: list = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    violations: list[dict] = field(default_factory=list)  # accelerator adapters' (Violation.to_dict)
    executor: str | None = None
    candidates: list[str] = field(default_factory=list)  # executors measured as the model runs
    rewritten: Callable[[], Any] | None = None
    for_inductor: Callable[[], Any] | None = None
