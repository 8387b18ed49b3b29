"""Executors on the CPU: every executor matches eager (outputs and gradients), the rewritten
graph is operators only, the measured choice never keeps a slower candidate and times whole
steps, the daemon serves the choice to a second process, and Inductor's cache key follows
Hypatia's rules and kernels."""

from __future__ import annotations

import copy
import json
import math
import textwrap
import time

import pytest
import torch

from conftest import daemon_stats
from hypatia.client import choice, graphs as model_graphs
from hypatia.client import executors
from hypatia.client.executors import cudagraphs, inductor
from hypatia.executors import ALL_CANDIDATES
from hypatia.client.torch_internals import inductor_counters, static_input_indices


class Block(torch.nn.Module):
    """Hand-written attention and a GELU MLP: Hypatia rewrites both."""

    def __init__(self, width=32, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width)
        self.fc1, self.fc2 = torch.nn.Linear(width, 2 * width), torch.nn.Linear(2 * width, width)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        att = ((q @ k.transpose(-2, -1)) / math.sqrt(c // self.heads)).softmax(-1) @ v
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, c))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def _training_step_matches_eager(compiled, model, reference, x) -> None:
    """One step: the output, then every parameter's gradient so far, equal to eager's."""
    out, expected = compiled(x), reference(x)
    torch.testing.assert_close(out, expected)
    out.square().mean().backward()
    expected.square().mean().backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def _session():
    from hypatia.client.backend import session

    return session()


@pytest.mark.parametrize("mode", ["inference", "training"])
@pytest.mark.parametrize("executor", ["inductor", "aten", "eager"])
def test_every_executor_matches_eager_with_hypatias_rewrites(home, dynamo_reset, monkeypatch, executor, mode):
    monkeypatch.setenv("HYPATIA_AUTOSTART", "0")
    monkeypatch.setenv("HYPATIA_EXECUTOR", executor)
    torch.manual_seed(0)
    model = Block().train(mode == "training")
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="hypatia")
    for step in range(3):
        x = torch.randn(2, 8, 32)
        if mode == "inference":
            with torch.no_grad():
                torch.testing.assert_close(compiled(x), reference(x))
            continue
        _training_step_matches_eager(compiled, model, reference, x)
    counters = _session().counters
    assert counters[f"executor.{executor}"] == 1 and counters["fallbacks"] == 0, dict(counters)
    (plan,) = [p for _, p in _session().plans]
    assert {"attention", "mlp_gelu"} <= set(plan.rules_fired), plan.rules_fired


class NoGradInside(torch.nn.Module):
    """A training forward that switches grad off around a computation, as rotary embeddings do:
    from a buffer (exact to trace through) or, with ``leak``, from a parameter (not)."""

    def __init__(self, leak: bool = False):
        super().__init__()
        self.leak = leak
        self.lin = torch.nn.Linear(16, 16)
        self.register_buffer("freq", torch.rand(16))

    def forward(self, x):
        with torch.no_grad():
            c = ((self.lin.weight[0] if self.leak else self.freq) * 2).cos()
        return torch.nn.functional.gelu(self.lin(x)) * c + 1.0


@pytest.mark.parametrize("leak", [False, True], ids=["from_a_buffer", "from_a_parameter"])
def test_a_training_graph_that_switches_grad_off_inside_is_rewritten_where_exact(home, dynamo_reset, monkeypatch, leak):
    monkeypatch.setenv("HYPATIA_AUTOSTART", "0")
    torch.manual_seed(0)
    model = NoGradInside(leak)
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="hypatia")
    for _ in range(2):
        _training_step_matches_eager(compiled, model, reference, torch.randn(4, 16))
    counters = _session().counters
    assert counters["fallbacks"] == 0, dict(counters)
    if leak:  # the no-grad value depends on a parameter: dropping the switch would change gradients
        assert counters["graphs_not_rewritten"] == 1 and not _session().plans, dict(counters)
    else:
        assert counters["graphs_not_rewritten"] == 0, dict(counters)
        (plan,) = [p for _, p in _session().plans]
        assert plan.regions, plan


def test_the_rewritten_graph_is_operators_only_and_keeps_dynamos_input_metadata(home, dynamo_reset, monkeypatch):
    monkeypatch.setenv("HYPATIA_AUTOSTART", "0")
    seen = {}

    def spy(gm, example_inputs):
        from hypatia.client.capture import capture
        from hypatia.planner import plan_graph

        model = model_graphs.trace(gm, example_inputs)
        graph, fx_nodes = capture(model.gm)
        plan = plan_graph(graph)
        seen["rewritten"] = model_graphs.rewrite(model, fx_nodes, plan, gm)
        seen["dynamo"], seen["inputs"] = gm, list(example_inputs)
        return gm.forward

    torch.compile(Block(), backend=spy)(torch.randn(2, 8, 32, requires_grad=True))
    rewritten = seen["rewritten"]
    calls = [n.target for n in rewritten.graph.nodes if n.op == "call_function"]
    assert all(isinstance(t, torch._ops.OpOverload) or t.__name__ == "getitem" for t in calls), calls
    assert model_graphs.operators_in(rewritten) == ["hypatia.addmm_activation.default"]  # fc1 + GELU
    assert any("scaled_dot_product" in str(t) for t in calls)  # the attention, as ATen's fused op
    assert not any(str(t) == "aten._softmax.default" for t in calls)
    # the parameters stay static inputs for AOTAutograd and CUDA graphs
    assert static_input_indices(rewritten) == static_input_indices(seen["dynamo"]) != []
    # an ordinary graph of operators: torch.export takes it, hypatia:: operators and all
    inputs = [t.detach() for t in seen["inputs"]]
    exported = torch.export.export(rewritten, tuple(inputs))
    assert "hypatia.addmm_activation" in str(exported.graph)
    torch.testing.assert_close(exported.module()(*inputs), rewritten(*inputs))


def test_a_graph_with_dynamic_shapes_runs_unrewritten(home, dynamo_reset, monkeypatch):
    monkeypatch.setenv("HYPATIA_AUTOSTART", "0")
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    compiled = torch.compile(model, backend="hypatia", dynamic=True)
    with torch.no_grad():
        for batch in (2, 5):
            x = torch.randn(batch, 8)
            torch.testing.assert_close(compiled(x), model(x))
    counters = _session().counters
    assert counters["graphs_not_rewritten"] >= 1 and counters["fallbacks"] == 0, dict(counters)


def test_cuda_graphs_are_refused_where_capture_is_not_safe():
    x = torch.randn(2, 4)
    gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 4))
    assert cudagraphs.refusal(gm, None, [x]) == "not_cuda"

    def running_stats(gm, example_inputs):
        seen["model"] = model_graphs.trace(gm, example_inputs).gm
        return gm.forward

    seen = {}
    torch.compile(torch.nn.BatchNorm1d(4).train(), backend=running_stats)(x)
    assert cudagraphs._mutates_inputs(seen["model"])  # writes its running statistics back
    torch._dynamo.reset()
    torch.compile(torch.nn.BatchNorm1d(4).eval(), backend=running_stats)(x)
    assert not cudagraphs._mutates_inputs(seen["model"])
    torch._dynamo.reset()
    # which candidates each reason leaves: off a GPU none is captured; a graph writing its
    # inputs is still captured by Inductor's reduce-overhead mode, which replays the writes
    graphs = executors.Graphs(gm, [x], "cuda", True, rewritten=lambda: gm)
    assert executors.candidates(graphs, None) == list(ALL_CANDIDATES)
    assert executors.candidates(graphs, "not_cuda") == ["inductor", "aten", "eager"]
    assert executors.candidates(graphs, "input_mutation") == ["inductor", "inductor+cudagraphs", "aten", "eager"]


# -- the measured choice ------------------------------------------------------------------------
def _sleeper(forward_s: float, backward_s: float = 0.0):
    class Slow(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            time.sleep(forward_s)
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            time.sleep(backward_s)
            return grad * 2

    return Slow.apply


def test_the_choice_never_keeps_a_slower_or_failing_candidate():
    runs = {"slow": 0, "fast": 0, "broken": 0}

    def counted(name, fn):
        def call(x):
            runs[name] += 1
            return fn(x)
        return call

    def build(name, args):
        if name == "unbuildable":
            raise RuntimeError("no compiler here")
        if name == "broken":
            return counted("broken", lambda x: (_ for _ in ()).throw(RuntimeError("kernel exploded")))
        return counted("fast", _sleeper(0.0))

    reported = []
    chooser = choice.ExecutorChoice(["slow", "unbuildable", "broken", "fast"], counted("slow", _sleeper(0.004)), build,
                                    cuda=False, report=lambda name, results: reported.append((name, results)))
    per_candidate = choice.WARMUP_CALLS + choice.TIMED_CALLS
    for i in range(2 * per_candidate + 10):
        torch.testing.assert_close(chooser(torch.tensor(float(i))), torch.tensor(2.0 * i))
    (name, results), = reported
    assert name == "fast" and chooser.chosen_name == "fast"
    assert results["slow"].median_s > results["fast"].median_s and results["slow"].samples == choice.TIMED_CALLS
    assert "no compiler here" in results["unbuildable"].error and "kernel exploded" in results["broken"].error
    # the broken candidate ran once (its call was served by the first), then never again
    assert runs["broken"] == 1 and runs["slow"] == per_candidate + 1
    assert runs["fast"] == per_candidate + (2 * per_candidate + 10 - 2 * per_candidate - 1)


def test_the_choice_times_whole_training_steps_forward_and_backward():
    """A candidate with a fast forward and a slow backward loses to one that is slower forward
    but faster in the whole step."""
    reported = []
    candidates = {"fast_forward": _sleeper(0.001, 0.012), "fast_step": _sleeper(0.004, 0.0)}
    chooser = choice.ExecutorChoice(list(candidates), candidates["fast_forward"], lambda name, args: candidates[name],
                                    cuda=False, report=lambda name, results: reported.append((name, results)))
    w = torch.ones(3, requires_grad=True)
    for _ in range(2 * (choice.WARMUP_CALLS + choice.TIMED_CALLS) + 2):
        chooser(w).sum().backward()
    (name, results), = reported
    assert name == "fast_step", {n: (m.median_s, m.with_backward) for n, m in results.items()}
    assert all(m.with_backward == m.samples == choice.TIMED_CALLS for m in results.values())
    assert results["fast_forward"].median_s > 0.012


CHOICE_CLIENT = textwrap.dedent(
    """
    import copy, json, sys, torch
    sys.path.insert(0, {tests!r})
    from test_executors import Block
    from hypatia.client.backend import session
    torch.manual_seed(0)
    model = Block()
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="hypatia")
    for step in range({steps}):
        x = torch.randn(2, 8, 32)
        out, expected = compiled(x), reference(x)
        torch.testing.assert_close(out, expected)
        out.square().mean().backward(); expected.square().mean().backward()
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad)
            p.grad = q.grad = None
    print(json.dumps({{"counters": dict(session().counters), "choices": list(session().choices)}}))
    """
)


@pytest.mark.slow
def test_the_measured_choice_is_stored_and_served_to_a_second_process(home):
    import os

    # background tuning would supersede the measured plan revision with a tuned one
    home.hypatiad("start", extra_env={"HYPATIA_BACKGROUND_TUNING": "0"})
    env = {"HYPATIA_EXECUTOR": "auto"}
    steps = 3 * (choice.WARMUP_CALLS + choice.TIMED_CALLS) + 2  # inductor, aten and eager on a CPU
    code = CHOICE_CLIENT.format(tests=os.path.dirname(__file__), steps=steps)
    first = json.loads(home.python(code, extra_env=env, timeout=300).stdout.strip().splitlines()[-1])
    (measured,) = first["choices"]
    chosen = measured.pop("chosen")
    assert set(measured) == {"inductor", "aten", "eager"} and first["counters"]["executor_measurements"] == 1
    assert measured[chosen]["median_us"] == min(m["median_us"] for m in measured.values() if not m["error"])
    stats = daemon_stats(home.config)
    assert stats["executors"]["choices"] == 1 and stats["executors"]["stale_reports"] == 0
    (row,) = json.loads(home.ctl("plans", "--json").stdout)
    shown = home.ctl("plans", row["graph_key"][:16]).stdout
    assert f"executor: {chosen}" in shown and all(name in shown for name in measured), shown

    second = json.loads(home.python(CHOICE_CLIENT.format(tests=os.path.dirname(__file__), steps=3), extra_env=env,
                                    timeout=300).stdout.strip().splitlines()[-1])
    counters = second["counters"]
    assert counters["daemon_hits"] == 1 and counters["executor_from_daemon"] == 1, counters
    assert counters[f"executor.{chosen}"] == 1 and "executor_measurements" not in counters and not second["choices"]


# -- Inductor's caches ---------------------------------------------------------------------------
def _compile_once(x):
    import torch._inductor.config

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Block().eval()
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=True):
        torch.testing.assert_close(torch.compile(model, backend="hypatia")(x), model(x))
    return inductor_counters()


@pytest.mark.slow
def test_inductors_cache_key_changes_when_hypatias_rules_or_kernels_change(home, dynamo_reset, monkeypatch, tmp_path):
    from hypatia.planner import passes

    monkeypatch.setenv("HYPATIA_AUTOSTART", "0")
    monkeypatch.setenv("HYPATIA_EXECUTOR", "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    x = torch.randn(2, 8, 32)

    def hits(before, after):
        return sum(after.get(k, 0) - before.get(k, 0) for k in after if k.endswith("_hit"))

    start = _compile_once(x)
    again = _compile_once(x)
    assert hits(start, again) >= 1, (start, again)  # same rules and kernels: Inductor's cache hits
    # the attention family switched off: the rewritten graph differs, and so does the key
    monkeypatch.setattr(passes, "FAMILIES", tuple(f for f in passes.FAMILIES if f.name != "attention"))
    fewer = _compile_once(x)
    assert hits(again, fewer) == 0, (again, fewer)
    monkeypatch.undo()
    monkeypatch.setenv("HYPATIA_AUTOSTART", "0")
    monkeypatch.setenv("HYPATIA_EXECUTOR", "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    # the same graph, but other kernels behind its hypatia:: operators: the pass's uuid misses
    monkeypatch.setattr(inductor.HypatiaPass, "uuid", lambda self: "hypatia-another-kernel-library")
    changed = _compile_once(x)
    assert hits(fewer, changed) == 0, (fewer, changed)
    assert inductor.counters["graphs_lowered"] >= 1  # the pass ran on every compile that missed
