"""When the minifier runs: on demand (:func:`minify_model`) and by itself when artifacts are on
(``HYPATIA_ARTIFACTS``): a region failing strict validation, an executor raising at run time.

The automatic triggers never raise: a problem of their own is logged once and the run goes on.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.fx

from hypatia.debug.folder import process_folder
from hypatia.debug.delta import DoesNotFail, Minified, accuracy_check, computing_nodes, minify, raises_check
from hypatia.debug.repro import write_repro

log = logging.getLogger("hypatia.debug")

# The most candidates an automatic trigger tests (each traces and plans a graph), and the
# longest it shrinks before it writes what it has.
AUTO_MAX_TESTS = 200
AUTO_BUDGET_S = 120.0

_warned: set[str] = set()


def _once(kind: str, message: str, exc: BaseException) -> None:
    if kind not in _warned:
        _warned.add(kind)
        log.warning("%s: %s: %s (the run goes on)", message, type(exc).__name__, exc)
    else:
        log.debug("%s", message, exc_info=exc)


def repro_path(root: str | os.PathLike, graph: int, what: str) -> Path:
    """A new ``repros/repro-<NNN>-<what>.py`` in this process's artifacts folder."""
    folder = process_folder(root) / "repros"
    folder.mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "_-." else "_" for c in what)[:60] or "graph"
    path, k = folder / f"repro-{graph:03d}-{safe}.py", 2
    while path.exists():
        path, k = folder / f"repro-{graph:03d}-{safe}-{k}.py", k + 1
    return path


def region_repro(root: str | os.PathLike, graph: int, fx_nodes: list[torch.fx.Node], region: Any,
                 detail: str) -> Path | None:
    """Write the repro of a region that failed strict validation: its unfused operators (the
    region is the unit its kernel replaces, so it is not shrunk further), the input draw on which
    the kernel fails, and validation's own check. None (logged once) when it cannot be written."""
    try:
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        from hypatia.client import validate
        from hypatia.kernels import load_kernel
        from hypatia.planner import regions

        with unset_fake_temporarily():
            reference = validate.region_module(fx_nodes, region)
            kernel = load_kernel(region.kernel, region.placement)
            draws = [validate.random_inputs(fx_nodes, region, positive) for positive in (False, True)]
            failing, failure, tests = draws[0], detail, 0
            for draw in draws:
                tests += 1
                try:
                    result = regions.check(lambda *xs: kernel(*xs, *region.consts), regions.Reference(reference, [draw]))
                    why = None if result.ok else result.detail
                except Exception as exc:  # noqa: BLE001 - raising is the failure
                    why = f"{type(exc).__name__}: {exc}"
                if why is not None:
                    failing, failure = draw, why
                    break
            minified = Minified(reference, list(failing), failure, tests, len(computing_nodes(reference)))
            path = repro_path(root, graph, region.rule)
            return write_repro(minified, path, what=f"fused region {region.rule} ({region.kernel}, {region.placement}) "
                               "failed strict validation", check="kernel", source=f"graph {graph:03d}, strict validation",
                               kernel=(region.kernel, region.placement, tuple(region.consts)))
    except Exception as exc:  # noqa: BLE001 - never break the user's run
        _once("region", "could not write the repro of a region that failed validation", exc)
        return None


def executor_repro(root: str | os.PathLike, graph: int, gm: torch.fx.GraphModule, args: list,
                   error: BaseException) -> Path | None:
    """Write the repro of Dynamo's graph ``gm`` whose executor raised ``error`` on ``args``,
    minified against "Hypatia's fused graph raises the same exception type" (unshrunk, and
    said so, when that does not reproduce in this process). None (logged once) on a problem."""
    try:
        name = type(error).__name__
        with torch.no_grad():
            try:
                minified = minify(gm, list(args), raises_check(name), max_tests=AUTO_MAX_TESTS,
                                  budget_s=AUTO_BUDGET_S)
            except DoesNotFail:
                nodes = len(computing_nodes(gm))
                minified = Minified(gm, list(args), f"{name}: {error} (not reproduced by the in-process plan: "
                                    "the executor's own code raised)"[:500], 1, nodes)
        path = repro_path(root, graph, "executor")
        return write_repro(minified, path, what=f"the executor raised {name} at run time",
                           check=f"raises:{name}", source=f"graph {graph:03d}, run time")
    except Exception as exc:  # noqa: BLE001 - never break the user's run
        _once("executor", "could not write the repro of a graph whose executor raised", exc)
        return None


def capture_graphs(model: Any, inputs: list) -> list[tuple[torch.fx.GraphModule, list]]:
    """Dynamo's graphs of ``model(*inputs)`` with the tensors each was called with."""
    graphs: list[tuple[torch.fx.GraphModule, list]] = []

    def recorder(gm: torch.fx.GraphModule, example_inputs: list) -> Any:
        calls: list = []
        graphs.append((gm, calls))

        def run(*args: Any) -> Any:
            if not calls:
                calls.extend(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args)
            return gm.forward(*args)
        return run

    torch.compile(model, backend=recorder, fullgraph=False)(*inputs)
    return [(gm, calls) for gm, calls in graphs if calls]


def minify_model(model: Any, inputs: list, check: str = "accuracy", out: str | os.PathLike = "repro.py", *,
                 atol: float | None = None, rtol: float | None = None, max_tests: int = 500) -> Path:
    """Capture ``model(*inputs)``'s Dynamo graphs, find the first that fails ``check`` under
    Hypatia ("accuracy": the fused graph differs from eager past tolerance; "runs": the fused
    graph raises), minify it and write its repro to ``out``. Raises :class:`DoesNotFail` when
    no graph fails."""
    if check not in ("accuracy", "runs"):
        raise ValueError(f"check={check!r}: use 'accuracy' or 'runs'")
    with torch.no_grad():
        captured = capture_graphs(model, list(inputs))
    label = type(model).__name__
    for index, (gm, args) in enumerate(captured, 1):
        if check == "accuracy":
            fails, script_check = accuracy_check(atol, rtol), "accuracy"
        else:
            kind = _raised(gm, args)
            if kind is None:
                continue
            fails, script_check = raises_check(kind), f"raises:{kind}"
        try:
            minified = minify(gm, args, fails, max_tests=max_tests)
        except DoesNotFail:
            continue
        what = "Hypatia's fused graph differs from eager" if check == "accuracy" else \
            f"Hypatia's fused graph raises {script_check[7:]}"
        return write_repro(minified, out, what=what, check=script_check, atol=atol, rtol=rtol,
                           source=f"hypatia.debug.minify_model({label}), graph {index} of {len(captured)}")
    raise DoesNotFail(f"none of the {len(captured)} graphs of {label} fails the {check} check")


def _raised(gm: torch.fx.GraphModule, args: list) -> str | None:
    """The type name of what Hypatia's fused ``gm`` raises on ``args``, or None."""
    from hypatia.debug.delta import fused_graph

    try:
        fused, _ = fused_graph(gm, args)
        fused(*args)
    except Exception as exc:  # noqa: BLE001 - the failure looked for
        return type(exc).__name__
    return None
