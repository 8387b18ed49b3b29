"""Delta debugging over an FX graph's nodes: the smallest sub-graph that still fails.

A candidate keeps a set of the graph's computing nodes (``call_function``, ``call_method``,
``call_module``; a ``getitem`` goes with the node whose tuple it reads). Every value a kept node reads from a node not kept becomes a new input, fed
with what that node computed on the original inputs (the original graph is interpreted once);
the candidate returns the kept nodes nothing kept reads, and kept original outputs. ``ddmin``
shrinks the kept set until no single node can be removed (1-minimal) and the failure stays.
"""

from __future__ import annotations

import logging
import operator
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx

from hypatia.planner.footprint import tensors_in

log = logging.getLogger("hypatia.debug")

COMPUTING = ("call_function", "call_method", "call_module")

Fails = Callable[[torch.fx.GraphModule, list], "str | None"]


class NotTraceable(Exception):
    """A candidate cannot be traced to ATen operators: not a graph Hypatia would compile."""


class DoesNotFail(Exception):
    """The graph given to :func:`minify` does not fail its check: there is nothing to shrink."""


@dataclass(frozen=True)
class Minified:
    """A smallest failing graph: the module, its inputs, the failure's text, how many
    candidates were tested, and how many computing nodes the original had."""

    gm: torch.fx.GraphModule
    inputs: list
    failure: str
    tests: int
    original_nodes: int
    minimal: bool = True  # False: the test or time budget ran out first (still failing, maybe larger)

    @property
    def nodes(self) -> list[torch.fx.Node]:
        """The minimal graph's computing nodes."""
        return [n for n in self.gm.graph.nodes if n.op in COMPUTING]


def computing_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op in COMPUTING]


def _is_getitem(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem


def with_getitems(keep: set[torch.fx.Node]) -> set[torch.fx.Node]:
    """``keep`` and the ``getitem`` nodes reading the kept nodes' tuple results: a part of a
    result is kept exactly when the node making it is, so no input is ever a tuple."""
    return keep | {u for n in keep for u in n.users if _is_getitem(u)}


def node_values(gm: torch.fx.GraphModule, inputs: Sequence[Any]) -> dict[torch.fx.Node, Any]:
    """What every node of ``gm`` computes on ``inputs`` (placeholders included); where the
    graph raises, the values of the nodes before the one that raised."""
    interpreter = torch.fx.Interpreter(gm, garbage_collect_values=False)
    try:
        with torch.no_grad():
            interpreter.run(*inputs)
    except Exception as exc:  # noqa: BLE001 - the failure being minified, perhaps
        log.debug("the graph raised while its values were computed: %s", exc)
    return dict(interpreter.env)


def _nodes_in(arg: Any) -> list[torch.fx.Node]:
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg(arg, found.append)
    return found


def subgraph(gm: torch.fx.GraphModule, values: dict[torch.fx.Node, Any],
             keep: set[torch.fx.Node]) -> tuple[torch.fx.GraphModule, list]:
    """The candidate of ``gm`` keeping the computing nodes ``keep``, and its inputs."""
    order = [n for n in gm.graph.nodes if n in keep]
    outputs = next(n for n in gm.graph.nodes if n.op == "output")
    original_outputs = set(_nodes_in(outputs.args))
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    inputs: list = []
    for node in order:  # every value read from outside the kept set is a new input
        for used in node.all_input_nodes:
            if used not in keep and used not in env:
                placeholder = graph.placeholder(used.name)
                placeholder.meta = dict(used.meta)
                value = values[used]
                if isinstance(value, torch.Tensor):
                    placeholder.meta["val"] = value
                env[used] = placeholder
                inputs.append(value)
    for node in order:
        env[node] = graph.node_copy(node, lambda n: env[n])
    read = {u for n in order for u in n.all_input_nodes if u in keep}
    results = [env[n] for n in order if n not in read or n in original_outputs]
    graph.output(tuple(results))
    graph.lint()
    return torch.fx.GraphModule(gm, graph), inputs


def ddmin(items: list, fails: Callable[[list], str | None], *, max_tests: int = 500,
          failure: str | None = None, deadline: float | None = None) -> tuple[list, str, int, bool]:
    """Zeller's ddmin over ``items`` (order kept): (a failing subset, its failure, the number of
    tests run, whether the subset is 1-minimal: False when ``max_tests`` or the ``deadline``
    (a ``time.monotonic()`` value) stopped it first). ``fails(subset)`` says why a subset fails,
    or None; it is assumed to fail on all of ``items`` (``failure`` is that text, asked for
    when not given)."""
    tests = 0
    cache: dict[tuple, str | None] = {}

    def spent() -> bool:
        return tests >= max_tests or (deadline is not None and time.monotonic() >= deadline)

    def test(subset: list) -> str | None:
        nonlocal tests
        key = tuple(id(x) for x in subset)
        if key not in cache:
            tests += 1
            cache[key] = fails(subset) if subset else None
        return cache[key]

    if failure is None:
        failure = test(items)
        if failure is None:
            raise DoesNotFail("the whole graph passes its check")
    current, n = list(items), 2
    while len(current) >= 2 and not spent():
        chunks = _split(current, n)
        reduced = False
        for chunk in chunks:  # a chunk alone fails: keep only it
            why = None if spent() else test(chunk)
            if why is not None:
                current, failure, n, reduced = chunk, why, 2, True
                break
        if not reduced and n > 2:
            for k in range(len(chunks)):  # the complement of a chunk fails: drop the chunk
                if spent():
                    break
                complement = [x for j, c in enumerate(chunks) if j != k for x in c]
                why = test(complement)
                if why is not None:
                    current, failure, n, reduced = complement, why, max(n - 1, 2), True
                    break
        if not reduced and not spent():
            if n >= len(current):
                return current, failure, tests, True
            n = min(len(current), 2 * n)
    minimal = len(current) < 2
    if not minimal:
        log.info("the minifier stopped after %d tests with %d nodes left", tests, len(current))
    return current, failure, tests, minimal


def _split(items: list, n: int) -> list[list]:
    size, extra = divmod(len(items), n)
    chunks, start = [], 0
    for k in range(n):
        end = start + size + (1 if k < extra else 0)
        if end > start:
            chunks.append(items[start:end])
        start = end
    return chunks


def minify(gm: torch.fx.GraphModule, inputs: list, fails: Fails, *, max_tests: int = 500,
           budget_s: float | None = None) -> Minified:
    """The smallest sub-graph of ``gm`` (with its inputs) for which ``fails`` still returns a
    failure, within ``max_tests`` candidates and ``budget_s`` seconds; :class:`DoesNotFail`
    when ``gm`` passes. ``fails`` should catch what it runs and return the message (a compile
    error or an exception is a failure like any other; one it lets out counts as a pass)."""
    deadline = None if budget_s is None else time.monotonic() + budget_s
    values = node_values(gm, inputs)
    nodes = [n for n in computing_nodes(gm) if not _is_getitem(n)]

    def fails_on(subset: list) -> str | None:
        candidate, candidate_inputs = subgraph(gm, values, with_getitems(set(subset)))
        try:
            return fails(candidate, candidate_inputs)
        except Exception as exc:  # noqa: BLE001 - a check that breaks is not the failure looked for
            log.debug("the check raised on a candidate: %s", exc)
            return None

    whole = _guarded(fails, gm, list(inputs))
    if whole is None:
        raise DoesNotFail("the graph passes its check")
    kept, failure, tests, minimal = ddmin(nodes, fails_on, max_tests=max_tests - 1, failure=whole, deadline=deadline)
    small, small_inputs = subgraph(gm, values, with_getitems(set(kept)))
    return Minified(small, small_inputs, failure, tests + 1, len(computing_nodes(gm)), minimal)


def _guarded(fails: Fails, gm: torch.fx.GraphModule, inputs: list) -> str | None:
    try:
        return fails(gm, inputs)
    except Exception as exc:  # noqa: BLE001 - see minify
        return f"{type(exc).__name__}: {exc}"


# -- checks ---------------------------------------------------------------------------------
def fused_graph(gm: torch.fx.GraphModule, inputs: list) -> tuple[torch.fx.GraphModule, Any]:
    """``gm`` as Hypatia runs it: traced to ATen operators, planned in this process and
    rewritten with its regions' kernels; (the rewritten module, the plan). Raises
    :class:`NotTraceable` for a graph that cannot be traced, and whatever planning or
    rewriting raises (a compile error)."""
    from hypatia.client import capture, graphs
    from hypatia.planner import plan_graph
    from hypatia.planner.executable import apply_plan

    try:
        model = graphs.trace(gm, inputs)
    except graphs.NotRewritable as exc:
        raise NotTraceable(str(exc)) from exc
    graph, fx_nodes = capture.capture(model.gm)
    plan = plan_graph(graph)
    return apply_plan(model.gm, fx_nodes, plan), plan


def compare(actual: Any, expected: Any, atol: float | None = None, rtol: float | None = None) -> str | None:
    """None when every tensor of ``actual`` is close to ``expected``'s, else what differs."""
    if (atol is None) != (rtol is None):  # assert_close takes both or neither
        atol, rtol = atol or 0.0, rtol or 0.0
    got, want = tensors_in(actual), tensors_in(expected)
    if len(got) != len(want):
        return f"{len(got)} tensors returned, {len(want)} expected"
    for k, (a, b) in enumerate(zip(got, want)):
        try:
            torch.testing.assert_close(a, b, atol=atol, rtol=rtol, equal_nan=True)
        except AssertionError as exc:
            return f"output {k}: {str(exc).strip().splitlines()[0]} ({_max_abs(a, b)})"
    return None


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> str:
    try:
        return f"max abs err {(a.double() - b.double()).abs().max().item():.3g}"
    except Exception:  # noqa: BLE001 - shapes or dtypes differ: the first line said so
        return "not comparable"


def accuracy_check(atol: float | None = None, rtol: float | None = None) -> Fails:
    """Fails when Hypatia's fused graph differs from the graph run eagerly (past tolerance),
    cannot be planned or rewritten (a compile error) or raises; passes when nothing was fused
    and for a graph that cannot be traced."""
    def fails(gm: torch.fx.GraphModule, inputs: list) -> str | None:
        with torch.no_grad():
            expected = gm(*inputs)
            try:
                fused, plan = fused_graph(gm, inputs)
            except NotTraceable as exc:
                log.debug("not traceable: %s", exc)
                return None
            except Exception as exc:  # noqa: BLE001 - a compile error is a failure
                return f"compile error: {type(exc).__name__}: {exc}"[:500]
            if not plan.regions:
                return None
            try:
                actual = fused(*inputs)
            except Exception as exc:  # noqa: BLE001 - raising is a failure too
                return f"{type(exc).__name__}: {exc}"
        why = compare(actual, expected, atol, rtol)
        rules = ", ".join(r.rule for r in plan.regions)
        return None if why is None else f"fused ({rules}) differs from eager: {why}"
    return fails


def raises_check(kind: type[BaseException] | str) -> Fails:
    """Fails when Hypatia's fused graph raises an exception of type ``kind`` (by name), as it
    is built or as it runs."""
    name = kind if isinstance(kind, str) else kind.__name__

    def fails(gm: torch.fx.GraphModule, inputs: list) -> str | None:
        try:
            fused, plan = fused_graph(gm, inputs)
        except NotTraceable as exc:
            log.debug("not traceable: %s", exc)
            return None
        except Exception as exc:  # noqa: BLE001 - a compile error of the kind looked for, or another
            return f"{name}: {exc}"[:500] if type(exc).__name__ == name else None
        try:
            with torch.no_grad():
                fused(*inputs)
        except Exception as exc:  # noqa: BLE001 - the exception looked for, or another
            if type(exc).__name__ == name:
                return f"{name}: {exc}"[:500]
        return None
    return fails
