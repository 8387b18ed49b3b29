"""Paths: every fusable region's alternatives laid out as a networkx graph; the plan is the
graph's shortest path under the policy's costs.

Candidates that overlap (``linear_gelu`` inside ``mlp_gelu``) form one cluster; clusters sit in
graph order between join nodes. From join ``k`` one branch per non-overlapping set of the
cluster's candidates leads to join ``k + 1``; the empty set is eager ATen, so eager is always a
candidate. Along a branch each region has one parallel edge per implementation: the fused
kernel of every backend that has one, and on a GPU a host path (copy the inputs to the CPU, run
the CPU kernel, copy the result back) as three edges device -> host -> device. A host path whose
copies alone cost more than the region's eager ops is a redundant round trip and is pruned.

Weights are seconds: a branch enters at the cluster's eager cost and each edge adds what its
implementation saves or loses against the region's own eager cost, so negative edges occur and
the path is found with Bellman-Ford (the graph is a DAG). Costs come from the static model
(HEURISTIC) or from measurements (FASTEST); an implementation that failed its accuracy check
is never an edge.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator

import networkx as nx

from hypatia.canonical import CanonicalGraph
from hypatia.kernels import lookup
from hypatia.kernels.registry import Backend, by_id
from hypatia.planner import costs
from hypatia.planner.counters import counters
from hypatia.planner.extract import Candidate
from hypatia.planner.plan import EAGER, Decision, Region, region_key

MAX_BRANCHES = 128  # non-overlapping sets tried per cluster


@dataclass(frozen=True)
class Measurement:
    median_s: float
    ok: bool  # within tolerance of the float64 reference


Measurements = dict[tuple[str, str], Measurement]  # (region key, implementation id) -> result


@dataclass(frozen=True)
class Choice:
    region: Region  # with the chosen kernel and placement
    cost_s: float
    eager_s: float
    measured: bool


def device_backends(device: str, env: dict | None) -> list[Backend]:
    """The backends that can run a region on ``device`` in this environment."""
    if device == "cuda":
        found = [Backend.GPU_TORCH]
        if (env or {}).get("cupy"):
            found.append(Backend.GPU_CUPY)
        if (env or {}).get("triton"):
            found.append(Backend.GPU_TRITON)
        return found
    return [Backend.CPU_TORCH]


def implementations(graph: CanonicalGraph, cand: Candidate, env: dict | None) -> list[Region]:
    """Every way to run ``cand``: each device backend with a kernel, and the host path."""
    device = costs.node_device(graph, cand.region.output)
    out = []
    for backend in device_backends(device, env):
        spec = lookup(cand.kernel_op, backend, cand.signature)
        if spec is not None:
            out.append(replace(cand.region, kernel=spec.id, placement="device"))
    if device != "cpu":
        spec = lookup(cand.kernel_op, Backend.CPU_TORCH, cand.signature)
        if spec is not None:
            out.append(replace(cand.region, kernel=spec.id, placement="host"))
    return out or [cand.region]


def wanted(graph: CanonicalGraph, cands: list[Candidate], env: dict | None) -> dict[str, list[str]]:
    """Per region key, the implementation ids (eager first) a full measurement of ``cands`` has."""
    out: dict[str, list[str]] = {}
    for cand in cands:
        out.setdefault(region_key(graph, cand.region), [EAGER, *(r.implementation for r in implementations(graph, cand, env))])
    return out


def measurements(traces: dict[tuple[str, str], dict]) -> Measurements:
    """Stored traces (``Store.traces``) as the path planner's measurements; a trace without a
    time (the implementation failed to run) counts as failed."""
    return {k: Measurement((v["median_us"] or float("inf")) / 1e6, bool(v["ok"]) and v["median_us"] is not None)
            for k, v in traces.items()}


def implementation_row(region: Region) -> dict:
    """The ``implementations`` row that plans and traces of ``region``'s implementation name."""
    if region.implementation == EAGER:
        return {"id": EAGER, "op": "aten", "backend": "aten", "signature": "eager", "target": "",
                "description": "the region's own ATen ops, one by one"}
    spec = by_id(region.kernel)
    row = {"id": region.implementation, "op": spec.op, "backend": spec.backend.value, "signature": spec.signature,
           "target": spec.target, "description": spec.description}
    if region.placement == "host":
        row["description"] += "; on the host, with copies to and from the device"
    return row


class _Costs:
    """Per-candidate costs under a model and, where measured, measurements."""

    def __init__(self, graph: CanonicalGraph, model: costs.CostModel, measured: Measurements | None):
        self.graph, self.model, self.measured = graph, model, measured or {}
        self._keys: dict[tuple, str] = {}

    def _measurement(self, region: Region, implementation: str) -> Measurement | None:
        """The measurement of ``region`` run as ``implementation``; its structural key is
        hashed once per region, and not at all when nothing is measured (HEURISTIC)."""
        if not self.measured:
            return None
        ident = (region.rule, region.output, region.nodes)
        if ident not in self._keys:
            self._keys[ident] = region_key(self.graph, region)
        return self.measured.get((self._keys[ident], implementation))

    def eager(self, region: Region) -> tuple[float, bool]:
        hit = self._measurement(region, EAGER)
        if hit is not None:
            return hit.median_s, True
        ceilings = self.model.ceilings(costs.node_device(self.graph, region.output))
        return sum(costs.node_cost(self.graph, i, ceilings) for i in region.nodes), False

    def fused(self, region: Region, eager_measured: bool) -> tuple[float, float, float, bool] | None:
        """(copy in, run, copy out) seconds and whether measured; None when excluded."""
        hit = self._measurement(region, region.implementation)
        if hit is not None:
            return (0.0, hit.median_s, 0.0, True) if hit.ok else None
        if eager_measured:
            return None  # only measured implementations compete with a measured eager
        g, spec = self.graph, by_id(region.kernel)
        device = "cpu" if region.placement == "host" else costs.node_device(g, region.output)
        run = costs.region_cost(g, region.nodes, region.inputs, region.output, spec.launches, self.model.ceilings(device))
        if region.placement == "device":
            return 0.0, run, 0.0, False
        copy_in = sum(self.model.transfer_s(costs.tensor_bytes(g.nodes[j].meta)) for j in set(region.inputs))
        return copy_in, run, self.model.transfer_s(costs.tensor_bytes(g.nodes[region.output].meta)), False


def clusters(cands: list[Candidate]) -> list[list[Candidate]]:
    """Groups of candidates connected by overlap, in graph order."""
    overlap = nx.Graph()
    overlap.add_nodes_from(range(len(cands)))
    owner: dict[int, list[int]] = {}
    for k, c in enumerate(cands):
        for node in c.region.nodes:
            for other in owner.setdefault(node, []):
                overlap.add_edge(other, k)
            owner[node].append(k)
    groups = [sorted(group, key=lambda k: cands[k].region.output) for group in nx.connected_components(overlap)]
    return [[cands[k] for k in group] for group in sorted(groups, key=lambda g: cands[g[0]].region.output)]


def branches(cluster: list[Candidate]) -> Iterator[tuple[Candidate, ...]]:
    """Non-overlapping sets of the cluster's candidates, the empty set (eager) first."""
    found = 0

    def grow(start: int, taken: frozenset[int], chosen: tuple[Candidate, ...]) -> Iterator[tuple[Candidate, ...]]:
        nonlocal found
        if found >= MAX_BRANCHES:
            return
        found += 1
        yield chosen
        for k in range(start, len(cluster)):
            nodes = cluster[k].region.nodes
            if not taken.intersection(nodes):
                yield from grow(k + 1, taken | set(nodes), chosen + (cluster[k],))

    yield from grow(0, frozenset(), ())


def path_graph(graph: CanonicalGraph, cands: list[Candidate], env: dict | None, model: costs.CostModel,
               measured: Measurements | None = None, excluded: frozenset[tuple[int, str]] = frozenset()) -> nx.DiGraph:
    """The alternatives of every cluster between ``("join", 0)`` and ``("join", len(clusters))``."""
    return _path_graph(graph, cands, env, _Costs(graph, model, measured), excluded)


def _path_graph(graph: CanonicalGraph, cands: list[Candidate], env: dict | None, cost: _Costs,
                excluded: frozenset[tuple[int, str]]) -> nx.DiGraph:
    model = cost.model
    g = nx.DiGraph()
    groups = clusters(cands)
    g.add_node(("join", 0))
    for k, cluster in enumerate(groups):
        nodes = set().union(*(c.region.nodes for c in cluster))
        ceilings = model.ceilings(costs.node_device(graph, cluster[0].region.output))
        base = sum(costs.node_cost(graph, i, ceilings) for i in nodes)
        for b, branch in enumerate(branches(cluster)):
            here = ("branch", k, b, 0)
            g.add_edge(("join", k), here, weight=base)
            for i, cand in enumerate(branch):
                nxt = ("branch", k, b, i + 1)
                eager_s, eager_measured = cost.eager(cand.region)
                for region in implementations(graph, cand, env):
                    if (region.output, region.kernel) in excluded:
                        counters["paths.excluded"] += 1
                        continue
                    _add_implementation(g, cost, region, eager_s, eager_measured, here, nxt)
                if not g.has_node(nxt):  # every implementation excluded: the branch ends here
                    break
                here = nxt
            else:
                g.add_edge(here, ("join", k + 1), weight=0.0)
    g.graph["joins"] = len(groups)
    return g


def _add_implementation(g: nx.DiGraph, cost: _Costs, region: Region, eager_s: float, eager_measured: bool,
                        start: tuple, end: tuple) -> None:
    parts = cost.fused(region, eager_measured)
    if parts is None:
        counters["paths.excluded"] += 1
        return
    copy_in, run, copy_out, measured = parts
    choice = Choice(region, copy_in + run + copy_out, eager_s, measured)
    if region.placement == "device":
        via = (*start, region.implementation)
        g.add_edge(start, via, weight=run - eager_s, choice=choice)
        g.add_edge(via, end, weight=0.0)
        return
    if not measured and copy_in + copy_out >= eager_s:
        counters["paths.pruned_round_trips"] += 1  # device -> host -> device can only lose
        return
    to_host, on_host = (*start, region.implementation, "d2h"), (*start, region.implementation, "host")
    g.add_edge(start, to_host, weight=copy_in)
    g.add_edge(to_host, on_host, weight=run - eager_s, choice=choice)
    g.add_edge(on_host, end, weight=copy_out)


def shortest(g: nx.DiGraph) -> list[Choice]:
    """The implementations on the cheapest path from the first join to the last."""
    path = nx.shortest_path(g, ("join", 0), ("join", g.graph["joins"]), weight="weight", method="bellman-ford")
    return [g.edges[a, b]["choice"] for a, b in zip(path, path[1:]) if "choice" in g.edges[a, b]]


def choose(graph: CanonicalGraph, cands: list[Candidate], env: dict | None, model: costs.CostModel,
           measured: Measurements | None = None, excluded: frozenset[tuple[int, str]] = frozenset(),
           ) -> tuple[list[Choice], list[Decision]]:
    """The chosen implementations and one decision per candidate (EAGER where none was taken)."""
    cost = _Costs(graph, model, measured)
    chosen = shortest(_path_graph(graph, cands, env, cost, excluded))
    heuristic = {(c.region.output, c.region.rule): c.region.implementation
                 for c in shortest(_path_graph(graph, cands, env, _Costs(graph, model, None), excluded))} \
        if measured is not None else None
    by_output = {c.region.output: c for c in chosen}
    decisions = []
    for cand in sorted(cands, key=lambda c: (c.region.output, c.rule)):
        pick = by_output.get(cand.region.output)
        if pick is not None and pick.region.rule == cand.rule and pick.region.nodes == cand.region.nodes:
            d = Decision(cand.rule, cand.region.output, pick.region.implementation, pick.cost_s, pick.eager_s, pick.measured)
        else:
            eager_s, measured_eager = cost.eager(cand.region)
            d = Decision(cand.rule, cand.region.output, EAGER, eager_s, eager_s, measured_eager)
        if heuristic is not None:
            impl = heuristic.get((cand.region.output, cand.rule), EAGER)
            hit = None if impl == EAGER else cost._measurement(cand.region, impl)
            d = replace(d, heuristic=impl, heuristic_cost_s=cost.eager(cand.region)[0] if impl == EAGER
                        else (hit.median_s if hit is not None and hit.ok else 0.0))
        decisions.append(d)
    return chosen, decisions
