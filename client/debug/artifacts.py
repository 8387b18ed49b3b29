"""One compiled graph's folder, ``graph-<NNN>-<label>/``, and one small function per file.

Each writer takes what it writes and returns the path it wrote (None when there was nothing to
write); :func:`write_graph` runs them all for a :class:`~hypatia.debug.trail.Trail`, each on
its own, so that one that fails costs only its file.
"""

from __future__ import annotations

import keyword
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx

from hypatia.client.torch_internals import aot_graphs, static_input_indices
from hypatia.debug.drawing import regions_svg
from hypatia.debug.folder import write_json, write_text
from hypatia.debug.rewrites import rewrites
from hypatia.debug.trail import Trail
from hypatia.planner.footprint import tensors_in

UNPLANNED = "unplanned"


@dataclass(frozen=True)
class GraphArtifacts:
    """The folder of the ``index``-th graph a process compiled (1-based)."""

    path: Path
    index: int
    label: str

    @classmethod
    def create(cls, process_dir: Path, index: int, graph_key: str | None) -> "GraphArtifacts":
        label = re.sub(r"[^A-Za-z0-9_.-]", "_", graph_key[:12]) if graph_key else UNPLANNED
        path = Path(process_dir) / f"graph-{index:03d}-{label}"
        path.mkdir(parents=True, exist_ok=True)
        return cls(path, index, label)


# -- statistics ---------------------------------------------------------------------------------


def op_name(node: torch.fx.Node) -> str:
    """A node's operator as people read it: ``aten.addmm.default``, ``torch.relu``,
    ``method.view``, ``module.Linear``."""
    target = node.target
    if node.op == "call_method":
        return f"method.{target}"
    if node.op == "call_module":
        sub = node.graph.owning_module.get_submodule(target) if node.graph.owning_module is not None else None
        return f"module.{type(sub).__name__ if sub is not None else target}"
    if isinstance(target, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        return str(target)
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)
    module = "torch" if module.startswith("torch") and hasattr(torch, name) else module
    return f"{module}.{name}" if module else name


def _value(node: torch.fx.Node) -> Any:
    return node.meta.get("val", node.meta.get("example_value"))


def nbytes(t: torch.Tensor) -> int:
    """A tensor's size in bytes (0 where its shape is symbolic)."""
    try:
        return int(t.numel()) * t.element_size()
    except (TypeError, ValueError, RuntimeError):
        return 0


def graph_stats(gm: torch.fx.GraphModule, example_inputs: list | None = None) -> dict:
    """Nodes, operator and dtype counts, and memory estimates: parameter bytes (the inputs Dynamo
    marks as parameters or buffers, and attributes the graph reads), activation bytes (every
    value a node computes, as its metadata gives it)."""
    nodes = list(gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    ops = Counter(op_name(n) for n in nodes if n.op in ("call_function", "call_method", "call_module"))
    dtypes: Counter = Counter()
    activation = 0
    for n in nodes:
        tensors = tensors_in(_value(n))
        dtypes.update(str(t.dtype).removeprefix("torch.") for t in tensors)
        if n.op in ("call_function", "call_method", "call_module"):
            activation += sum(nbytes(t) for t in tensors)
    parameters = 0
    for i in static_input_indices(gm):
        value = example_inputs[i] if example_inputs is not None and i < len(example_inputs) else _value(placeholders[i])
        parameters += sum(nbytes(t) for t in tensors_in(value))
    for n in (n for n in nodes if n.op == "get_attr"):
        try:
            parameters += sum(nbytes(t) for t in tensors_in(_attr(gm, n.target)))
        except AttributeError:
            pass
    return {"nodes": len(nodes), "ops": dict(sorted(ops.items())), "dtypes": dict(sorted(dtypes.items())),
            "parameter_bytes": parameters, "activation_bytes": activation, "inputs": len(placeholders)}


def _attr(gm: torch.nn.Module, target: str) -> Any:
    value: Any = gm
    for part in str(target).split("."):
        value = getattr(value, part)
    return value


# -- the files ------------------------------------------------------------------------------------


def readable(gm: torch.fx.GraphModule, header: str = "") -> str:
    """A graph as Python a person reads (``print_readable``), under a comment ``header``."""
    text = gm.print_readable(print_output=False)
    # a graph made from a lambda prints as ``class <lambda>(...)``: not Python
    name = re.match(r"class ([^(]*)\(", text)
    if name and (not name.group(1).isidentifier() or keyword.iskeyword(name.group(1))):
        text = "class GraphModule(" + text[name.end():]
    lines = "".join(f"# {line}\n" for line in header.splitlines()) if header else ""
    return lines + text + ("" if text.endswith("\n") else "\n")


def write_dynamo(g: GraphArtifacts, gm: torch.fx.GraphModule) -> Path:
    return write_text(g.path / "dynamo.py", readable(gm, "Dynamo's graph, as the backend received it"))


def write_stats(g: GraphArtifacts, gm: torch.fx.GraphModule, example_inputs: list,
                model_gm: torch.fx.GraphModule | None = None) -> Path:
    stats = graph_stats(gm, example_inputs)
    if model_gm is not None:  # the ATen operators Hypatia planned on
        aten = graph_stats(model_gm)
        stats["aten"] = {"nodes": aten["nodes"], "ops": aten["ops"]}
    return write_json(g.path / "stats.json", stats)


def write_aot(g: GraphArtifacts, gm: torch.fx.GraphModule, example_inputs: list, training: bool) -> list[Path]:
    """``aot_forward.py`` and ``aot_backward.py`` (training) or ``aot_inference.py``."""
    out = []
    for name, aot_gm in aot_graphs(gm, example_inputs, training).items():
        out.append(write_text(g.path / f"aot_{name}.py", readable(aot_gm, f"AOTAutograd's {name} graph of Dynamo's graph")))
    return out


def write_plan(g: GraphArtifacts, plan: Any) -> Path:
    return write_json(g.path / "plan.json", plan.to_recipe())


def write_executed(g: GraphArtifacts, trail: Trail) -> Path:
    """The graph the executor runs: the rewritten graph (for Inductor, the one it was given), or
    Dynamo's where nothing was rewritten."""
    executor = (trail.executor or "").split("+")[0]
    if executor == "inductor" and trail.rewritten is not None:
        gm, what = (trail.for_inductor(), "the rewritten graph Inductor compiles (regions it sees through)") \
            if trail.for_inductor is not None else (trail.gm, "Dynamo's graph: no rewritten region is left for Inductor")
    elif executor == "eager" or trail.rewritten is None:
        gm, what = trail.gm, "Dynamo's graph: nothing was rewritten" if trail.rewritten is None else "Dynamo's graph (eager)"
    else:
        gm, what = trail.rewritten(), "the rewritten graph: every planned region replaced by its kernel"
    return write_text(g.path / "executed.py", readable(gm, f"executor {trail.executor}: {what}"))


def summary(trail: Trail, index: int) -> dict:
    plan = trail.plan
    keys = trail.keys or (None, None, None)
    return {
        "index": index, "phase": trail.phase, "graph_key": keys[0], "workload_key": keys[1], "env_key": keys[2],
        "model": trail.label, "from_daemon": trail.from_daemon, "warm_start": trail.warm_start,
        "executor": trail.executor, "executor_candidates": list(trail.candidates), "compile_id": trail.compile_id,
        "regions": [{"rule": r.rule, "kernel": r.kernel, "placement": r.placement, "nodes": list(r.nodes),
                     "output": r.output} for r in (plan.regions if plan is not None else ())],
        "fallbacks": [{"reason": reason} for reason in trail.fallbacks],
        "violations": list(trail.violations),
        "verdicts": [{"rule": v.rule, "kernel": v.kernel, "passed": v.ok, "detail": v.detail, "output": v.region,
                      "max_abs_err": v.max_abs_err, "max_rel_err": v.max_rel_err} for v in trail.verdicts],
    }


def write_summary(g: GraphArtifacts, trail: Trail, extra: dict | None = None) -> Path:
    return write_json(g.path / "summary.json", summary(trail, g.index) | (extra or {}))


def write_rewrites(g: GraphArtifacts, trail: Trail) -> Path | None:
    if trail.plan is None:
        return None
    return write_json(g.path / "rewrites.json", rewrites(trail))


def write_kernels(g: GraphArtifacts, trail: Trail) -> list[Path]:
    """``kernels/<NNNN>-<rule>.cu``: the source of every generated (NVRTC) kernel a region runs."""
    from hypatia.kernels.registry import Backend, by_id

    out = []
    for r in trail.plan.regions if trail.plan is not None else ():
        spec = by_id(r.kernel)
        if spec.backend is not Backend.GPU_CUPY or spec.op != "pointwise" or r.placement != "device":
            continue
        from hypatia.kernels.pointwise_cuda import program_source

        dtypes = None
        if trail.fx_nodes is not None:
            vals = [trail.fx_nodes[i].meta.get("val") for i in r.inputs]
            dtypes = [v.dtype for v in vals] if all(isinstance(v, torch.Tensor) for v in vals) else None
        out.append(write_text(g.path / "kernels" / f"{r.output:04d}-{r.rule}.cu", program_source(r.consts[-1], dtypes)))
    return out


def write_drawing(g: GraphArtifacts, trail: Trail) -> Path | None:
    """``regions.svg``: the model graph with the plan's regions coloured (where both exist)."""
    if trail.fx_nodes is None or trail.plan is None:
        return None
    svg = regions_svg(trail.fx_nodes, trail.plan.regions)
    return write_text(g.path / "regions.svg", svg) if svg is not None else None


def write_inductor(g: GraphArtifacts, codes: list[tuple[dict, str]]) -> list[Path]:
    """``inductor/<NN>-<name>.py``: Inductor's output code, one file per compiled graph
    (forward, backward), in the order Inductor wrote them."""
    folder = g.path / "inductor"
    start = len(list(folder.glob("*.py"))) if folder.exists() else 0
    out = []
    for k, (metadata, code) in enumerate(codes, start + 1):
        name = Path(str(metadata.get("filename") or "output_code")).stem
        out.append(write_text(folder / f"{k:02d}-{re.sub(r'[^A-Za-z0-9_-]', '_', name)[:40]}.py", code))
    return out


def write_graph(process_dir: Path, index: int, trail: Trail) -> tuple[GraphArtifacts, list[tuple[str, BaseException]]]:
    """Every file of the graph's folder that applies; returns the folder and, per file that
    could not be written, its name and the error."""
    keys = trail.keys
    g = GraphArtifacts.create(process_dir, index, keys[0] if keys is not None and trail.plan is not None else None)
    errors: list[tuple[str, BaseException]] = []
    training = trail.phase == "training"
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("summary.json", lambda: write_summary(g, trail)),
        ("stats.json", lambda: write_stats(g, trail.gm, trail.example_inputs, trail.model.gm if trail.model else None)),
        ("dynamo.py", lambda: write_dynamo(g, trail.gm)),
        ("aot", lambda: write_aot(g, trail.gm, trail.example_inputs, training)),
        ("rewrites.json", lambda: write_rewrites(g, trail)),
        ("plan.json", lambda: write_plan(g, trail.plan) if trail.plan is not None else None),
        ("executed.py", lambda: write_executed(g, trail)),
        ("kernels", lambda: write_kernels(g, trail)),
        ("regions.svg", lambda: write_drawing(g, trail)),
    ]
    for name, step in steps:
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - one file lost, not the folder
            errors.append((name, exc))
    return g, errors
