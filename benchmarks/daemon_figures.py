"""Daemon figures: plan-hit round trip, canonicalize + hash time by graph size, planning time (and
its e-graph rewrite part),
and the per-call overhead of a compiled callable over eager on a tiny graph."""

from __future__ import annotations

import statistics
import time

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from benchmarks.plan_requests import plan_request
from benchmarks.timing import per_call_us
from hypatia.canonical import CanonicalGraph
from hypatia.client.capture import capture
from hypatia.client.rpc import DaemonClient
from hypatia.config import Config
from hypatia.planner import plan_graph
from hypatia.planner.counters import counters


def _chain_graph(nodes: int) -> torch.fx.GraphModule:
    """A pointwise chain with about ``nodes`` ATen nodes (two per step)."""
    def f(x):
        for _ in range(nodes // 2):
            x = x.sin() * 1.5
        return x
    return make_fx(f, tracing_mode="fake")(torch.randn(16, 16))


def _median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _plan_medians_s(graph: CanonicalGraph, repeats: int) -> tuple[float, float]:
    """Median time of ``plan_graph(graph)`` and of its e-graph rewrite pass (the planner's
    ``rewrite_seconds`` counter over the same call)."""
    total, rewrite = [], []
    for _ in range(repeats):
        before = counters["rewrite_seconds"]
        t0 = time.perf_counter()
        plan_graph(graph)
        total.append(time.perf_counter() - t0)
        rewrite.append(counters["rewrite_seconds"] - before)
    return statistics.median(total), statistics.median(rewrite)


def canonicalize_rows(sizes: tuple[int, ...], repeats: int) -> list[dict]:
    rows = []
    for n in sizes:
        gm = _chain_graph(n)
        graph, _ = capture(gm)
        wire = graph.to_wire()
        plan_s, rewrite_s = _plan_medians_s(graph, repeats)
        rows.append({
            "figure": "canonicalize",
            "nodes": len(graph.nodes),
            "capture_and_hash_ms": round(_median_s(lambda: capture(gm), repeats) * 1e3, 3),
            "daemon_rehash_ms": round(_median_s(lambda: CanonicalGraph.from_wire(wire), repeats) * 1e3, 3),
            "plan_ms": round(plan_s * 1e3, 3),
            "rewrite_ms": round(rewrite_s * 1e3, 3),
        })
    return rows


def round_trip_row(config: Config, requests: int) -> dict:
    """p50/p99 of a get_plan that hits the daemon's warm cache, over the real ipc socket."""
    inputs = [torch.randn(8, 16), torch.randn(32, 16), torch.randn(32)]
    gm = make_fx(lambda x, w, b: torch.nn.functional.linear(x, w, b).relu(), tracing_mode="fake")(*inputs)
    request = plan_request(gm, inputs, "linear_relu")
    # HEURISTIC: a FASTEST lookup of an untuned plan would start a tuning that runs during the samples
    lookup = request.get_plan("HEURISTIC")
    client = DaemonClient(config)
    try:
        client.call("make_plan", request.make_plan("HEURISTIC"))
        samples = []
        for _ in range(requests):
            t0 = time.perf_counter()
            reply = client.call("get_plan", lookup)
            samples.append((time.perf_counter() - t0) * 1e6)
            assert reply["plan"] is not None, "the round-trip benchmark expected a plan-cache hit"
    finally:
        client.close()
    samples.sort()
    return {
        "figure": "plan_hit_round_trip",
        "requests": requests,
        "p50_us": round(samples[len(samples) // 2], 1),
        "p99_us": round(samples[min(len(samples) - 1, int(len(samples) * 0.99))], 1),
        "mean_us": round(statistics.fmean(samples), 1),
    }


def overhead_row(device: str) -> dict:
    """Per-call time of a tiny graph: eager, Hypatia-compiled and Inductor-compiled."""
    x = torch.randn(8, device=device)

    def tiny(t):
        return t * 2 + 1

    torch._dynamo.reset()
    hyp = torch.compile(tiny, backend="hypatia")
    ind = torch.compile(tiny)
    with torch.no_grad():
        eager_us = per_call_us(lambda: tiny(x), device)
        hyp_us = per_call_us(lambda: hyp(x), device)
        ind_us = per_call_us(lambda: ind(x), device)
    return {
        "figure": "per_call_overhead",
        "device": device,
        "eager_us": eager_us,
        "hypatia_us": hyp_us,
        "inductor_us": ind_us,
        "hypatia_overhead_us": round(hyp_us - eager_us, 3),
        "inductor_overhead_us": round(ind_us - eager_us, 3),
    }


def run(device: str, quick: bool, budget_s: float, config: Config) -> dict:
    rows = [round_trip_row(config, 300 if quick else 5000)]
    rows += canonicalize_rows((100, 1000) if quick else (100, 1000, 5000), 3 if quick else 5)
    rows.append(overhead_row(device))
    return {"rows": rows, "notes": []}
